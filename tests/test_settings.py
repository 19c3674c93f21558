"""Settings precedence and validation: defaults < YAML < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.settings import ServiceSettings, SettingsError, load_settings, old_name_of


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


class RenamedSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_DEMO_")
    composite: list[str] = Field(default_factory=list)
    ca_file: Path | None = None
    reward: list[str] | None = old_name_of("composite")
    old_ca: Path | None = old_name_of("ca_file")


@pytest.mark.parametrize("source", ["yaml", "env", "flag"])
def test_an_old_name_still_works_with_a_warning_naming_the_new_one(tmp_path, monkeypatch, source):
    args = []
    if source == "yaml":
        (tmp_path / "s.yaml").write_text("reward: [total=1*rm]\nold_ca: /ca.pem\n")
        args = ["--config", str(tmp_path / "s.yaml")]
    elif source == "env":
        monkeypatch.setenv("RLHF_MESH_DEMO_REWARD", '["total=1*rm"]')
        monkeypatch.setenv("RLHF_MESH_DEMO_OLD_CA", "/ca.pem")
    else:
        args = ["--reward", "total=1*rm", "--old-ca", "/ca.pem"]
    with pytest.warns(FutureWarning) as warned:
        settings = load_settings(RenamedSettings, args, "x")
    assert (settings.composite, settings.ca_file) == (["total=1*rm"], Path("/ca.pem"))
    messages = sorted(str(w.message) for w in warned)
    assert "use composite (RLHF_MESH_DEMO_COMPOSITE, --composite)" in messages[1]
    assert messages[1].startswith("reward (RLHF_MESH_DEMO_REWARD, --reward) is deprecated")
    assert messages[0].startswith("old_ca (RLHF_MESH_DEMO_OLD_CA, --old-ca) is deprecated")
    # What a dump writes (the demo hands the learner its settings so) has the new names only.
    assert settings.model_dump(exclude_unset=True) == {"composite": ["total=1*rm"], "ca_file": Path("/ca.pem")}


def test_the_new_name_gives_no_warning_and_both_names_must_agree(recwarn):
    settings = load_settings(RenamedSettings, ["--composite", "total=1*rm"], "x")
    assert settings.composite == ["total=1*rm"] and not [w for w in recwarn if w.category is FutureWarning]
    same = load_settings(RenamedSettings, ["--composite", "a=1*b", "--reward", "a=1*b"], "x")
    assert same.composite == ["a=1*b"]
    with pytest.raises(SettingsError, match="reward is the old name of composite: set only composite"):
        load_settings(RenamedSettings, ["--composite", "a=1*b", "--reward", "c=1*d"], "x")


def test_every_renamed_setting_of_the_services(tmp_path):
    """The real renames: the learner's services_* (no clash with its server's tls_client_ca), the reward
    service's --composite, the demo's reward_model_path."""
    from rlhf_mesh.demo import DemoSettings
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.reward.settings import RewardSettings

    ca = tmp_path / "ca.pem"
    ca.write_text("read when the channel is made")
    (tmp_path / "p.jsonl").write_text("")
    learner = ["--policy", "p", "--generation", "g:1", "--reward", "r:2", "--prompts", str(tmp_path / "p.jsonl")]
    with pytest.warns(FutureWarning, match="use services_tls_ca"):
        settings = load_settings(LearnerSettings, [*learner, "--client-tls-ca", str(ca)], "x")
    assert settings.services_tls_ca == ca and settings.tls_client_ca is None
    assert load_settings(LearnerSettings, [*learner, "--services-tls-ca", str(ca)], "x").credentials()["tls"]
    with pytest.warns(FutureWarning, match="use composite"):
        reward = load_settings(RewardSettings, ["--model", "rm=/m", "--function", "math",
                                                "--reward", "total=0.8*rm+0.2*math"], "x")
    assert reward.composites() == [("total", [(0.8, "rm"), (0.2, "math")])]
    with pytest.warns(FutureWarning), pytest.raises(SettingsError, match=r"composite total: \['nope'\] are not"):
        load_settings(RewardSettings, ["--model", "rm=/m", "--reward", "total=1*nope"], "x")  # checked as new
    with pytest.warns(FutureWarning, match="use reward_model_path"):
        assert load_settings(DemoSettings, ["--reward", "/rm"], "x").reward_model_path == "/rm"


def test_collective_address_defaults_to_this_hosts_address_towards_the_replica(tmp_path):
    """A cross-host collective push needs the address the replicas reach this host at, not 127.0.0.1."""
    import socket

    import psutil

    from rlhf_mesh.services.learner.settings import LearnerSettings

    (tmp_path / "p.jsonl").write_text("")
    base = ["--policy", "p", "--generation", "g:1", "--reward", "r:2", "--prompts", str(tmp_path / "p.jsonl")]
    settings = load_settings(LearnerSettings, base, "x")
    assert settings.collective_host("localhost:50051") == "127.0.0.1"
    own = [a.address for addresses in psutil.net_if_addrs().values() for a in addresses
           if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not own:
        pytest.skip("this machine has no IPv4 address but loopback")
    assert settings.collective_host(f"{own[0]}:50051") == own[0]
    pinned = load_settings(LearnerSettings, [*base, "--collective-address", "10.1.2.3"], "x")
    assert pinned.collective_host(f"{own[0]}:50051") == "10.1.2.3"
    with pytest.raises(RuntimeError, match="set collective_address"):
        settings.collective_host("no-such-host.invalid:50051")
