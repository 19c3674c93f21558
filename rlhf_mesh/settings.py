"""Settings of every service: defaults < YAML file (--config) < environment < command-line flags."""

from __future__ import annotations

import argparse
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, FilePath, ValidationError, model_validator
from pydantic_settings import (
    CLI_SUPPRESS,
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_yaml_file: ContextVar[Path | None] = ContextVar("_yaml_file", default=None)

S = TypeVar("S", bound="FileSettings")


class SettingsError(ValueError):
    """Settings that do not validate, with a message naming the offending keys."""


def warn_renamed(old: str, new: str) -> None:
    """The one warning of a deprecated name (a settings key, its variable or flag, a CLI flag)."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {new}", FutureWarning,
                  stacklevel=2)


def old_name_of(new: str) -> Any:
    """A settings field that is the deprecated old name of the field `new`, declared with `new`'s type:

        client_tls_ca: FilePath | None = old_name_of("services_tls_ca")

    It is read from YAML, the environment and flags like any key (hidden from --help, left out of
    dumps); FileSettings moves its value to `new` with a warning. Setting both differently is an error.
    """
    return Field(None, exclude=True, description=CLI_SUPPRESS, json_schema_extra={"renamed_to": new})


class FileSettings(BaseSettings):
    """Settings from defaults, a YAML file (--config), the environment and flags; unknown keys refused."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="RLHF_MESH_")

    @classmethod
    def renamed(cls) -> dict[str, str]:
        """Deprecated names of this class's settings: old -> new."""
        return {name: field.json_schema_extra["renamed_to"] for name, field in cls.model_fields.items()
                if isinstance(field.json_schema_extra, dict) and "renamed_to" in field.json_schema_extra}

    @model_validator(mode="after")
    def _moved_to_new_names(self) -> FileSettings:
        # An "after" validator of the base class: it runs before the subclasses' own, which see the new names.
        prefix = self.model_config.get("env_prefix", "")
        for old, new in self.renamed().items():
            if old not in self.model_fields_set:
                continue
            value = self.__dict__[old]
            if new in self.model_fields_set and getattr(self, new) != value:
                raise ValueError(f"{old} is the old name of {new}: set only {new}")
            warn_renamed(f"{old} ({prefix}{old.upper()}, --{old.replace('_', '-')})",
                         f"{new} ({prefix}{new.upper()}, --{new.replace('_', '-')})")
            setattr(self, new, value)
            self.__dict__[old] = None
            self.model_fields_set.discard(old)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _yaml_file.get()
        yaml = (YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),) if yaml_file else ()
        return (init_settings, env_settings, *yaml)


class ServiceSettings(FileSettings):
    """What every gRPC server shares; each service subclasses it with its own env prefix."""

    host: str = Field("[::]", description="address to listen on")
    port: int = Field(50050, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus HTTP port (0 picks a free one)")
    metrics_host: str | None = Field(
        None, description="address the metrics port listens on (default: host; a wildcard such as [::] means "
        "every IPv4 interface)"
    )
    drain_notice_s: float = Field(
        1.0, ge=0, description="on SIGTERM, how long health reports NOT_SERVING before new calls are refused"
    )
    drain_grace_s: float = Field(30.0, gt=0, description="then, the time in-flight calls get to finish")
    max_message_bytes: int = Field(64 << 20, gt=0, description="largest gRPC message received or sent")
    max_concurrent_rpcs: int = Field(1024, gt=0, description="calls served at once; more get RESOURCE_EXHAUSTED")
    max_inflight_bytes: int = Field(
        256 << 20, gt=0, description="bytes of request messages handled at once, server-wide (a request stream "
        "counts the message it is on); a request past it gets RESOURCE_EXHAUSTED. At least max_message_bytes"
    )
    max_stream_s: float | None = Field(
        None, gt=0, description="longest a streaming call may last before DEADLINE_EXCEEDED (default: no limit)"
    )
    reflection: bool = Field(False, description="enable gRPC server reflection")
    log_level: str = Field("INFO", description="logging level")

    # Security (README, Security): TLS when tls_cert is set, mutual TLS when tls_client_ca is too.
    tls_cert: FilePath | None = Field(None, description="PEM server certificate chain; turns TLS on")
    tls_key: FilePath | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: FilePath | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)"
    )
    tokens_file: FilePath | None = Field(
        None, description="YAML file of bearer tokens and their roles; turns token checks on"
    )
    health_port: int | None = Field(
        None, ge=0, le=65535, description="plaintext port serving only grpc.health.v1, for probes that cannot "
        "speak TLS (kubelet); health on the main port needs no token either"
    )

    @model_validator(mode="after")
    def _limits_fit(self) -> ServiceSettings:
        if self.max_inflight_bytes < self.max_message_bytes:
            raise ValueError(f"max_inflight_bytes ({self.max_inflight_bytes}) is below max_message_bytes "
                             f"({self.max_message_bytes}): a request of the largest size could never be served")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> ServiceSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self


def load_settings(cls: type[S], argv: list[str], prog: str) -> S:
    """Build `cls` from `--config FILE` (YAML), the environment and the flags in `argv`.

    Flags are the field names in kebab case (`--max-message-bytes`). Unknown flags exit
    with usage; unknown or invalid keys anywhere raise SettingsError naming them.
    """
    peel = argparse.ArgumentParser(add_help=False)
    peel.add_argument("--config", type=Path)
    known, rest = peel.parse_known_args(argv)
    if known.config is not None and not known.config.is_file():
        raise SettingsError(f"--config {known.config}: no such file")
    cli = CliSettingsSource(
        cls, cli_prog_name=prog, cli_kebab_case=True, cli_implicit_flags=True, cli_avoid_json=True
    )
    token = _yaml_file.set(known.config)
    try:
        return cls(_cli_settings_source=cli(args=rest))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise SettingsError(f"invalid settings for {prog}: {problems}") from None
    finally:
        _yaml_file.reset(token)
