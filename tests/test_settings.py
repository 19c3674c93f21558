"""Settings precedence and validation: defaults < YAML < environment < flags."""

from __future__ import annotations

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.settings import ServiceSettings, SettingsError, load_settings


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_DEMO_")
    models: list[str] = Field(default_factory=list)


def test_precedence(tmp_path, monkeypatch):
    config = tmp_path / "s.yaml"
    config.write_text("port: 1000\nmetrics_port: 1001\ndrain_grace_s: 3\n")
    assert load_settings(DemoSettings, [], "x").port == 50050
    assert load_settings(DemoSettings, ["--config", str(config)], "x").port == 1000
    monkeypatch.setenv("RLHF_MESH_DEMO_PORT", "2000")
    settings = load_settings(DemoSettings, ["--config", str(config)], "x")
    assert (settings.port, settings.metrics_port) == (2000, 1001)
    settings = load_settings(
        DemoSettings, ["--config", str(config), "--port", "3000", "--models", "a=/m/a", "--models", "/m/b"], "x"
    )
    assert (settings.port, settings.drain_grace_s, settings.models) == (3000, 3.0, ["a=/m/a", "/m/b"])


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("port: 1\nunknown: 2\n", "unknown: Extra inputs are not permitted"),
        ("port: 99999\n", "port: Input should be less than or equal to 65535"),
        ("drain_grace_s: soon\n", "drain_grace_s: Input should be a valid number"),
    ],
)
def test_invalid_yaml_names_the_key(tmp_path, yaml_text, expected):
    config = tmp_path / "s.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SettingsError, match=expected):
        load_settings(DemoSettings, ["--config", str(config)], "x")


def test_missing_config_file_and_unknown_flag(tmp_path):
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(DemoSettings, ["--config", str(tmp_path / "nope.yaml")], "x")
    with pytest.raises(SystemExit) as exit_:
        load_settings(DemoSettings, ["--no-such-flag", "1"], "x")
    assert exit_.value.code == 2


def test_env_values_are_validated(monkeypatch):
    monkeypatch.setenv("RLHF_MESH_DEMO_PORT", "not-a-port")
    with pytest.raises(SettingsError, match="port"):
        load_settings(DemoSettings, [], "x")


def test_tls_settings_must_be_complete(tmp_path):
    cert = tmp_path / "server.pem"
    cert.write_text("not read at validation")
    with pytest.raises(SettingsError, match="tls_cert and tls_key go together"):
        load_settings(DemoSettings, ["--tls-cert", str(cert)], "x")
    with pytest.raises(SettingsError, match=r"tls_client_ca .* needs tls_cert"):
        load_settings(DemoSettings, ["--tls-client-ca", str(cert)], "x")
    with pytest.raises(SettingsError, match="tokens_file: Path does not point to a file"):
        load_settings(DemoSettings, ["--tokens-file", str(tmp_path / "missing.yaml")], "x")
