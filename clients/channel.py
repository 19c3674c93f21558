"""gRPC channels as every rlhf-mesh client opens them: deadlines, retries, sizes, TLS."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from rlhf_mesh.server import channel_options

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class TlsConfig:
    """Server CA, and a client certificate for mutual TLS, as PEM file paths."""

    root_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.root_cert), read(self.client_key), read(self.client_cert))


def service_config(service: str, max_attempts: int = 5) -> str:
    """round_robin over every resolved address (headless Services) and retries of UNAVAILABLE."""
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": service}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
    })


def _options(service: str, max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        *channel_options(max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(service)),
    ]


def open_channel(address: str, service: str, *, tls: TlsConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A blocking channel to `address` configured for `service` (its full proto name)."""
    options = _options(service, max_message_bytes)
    if tls is not None:
        return grpc.secure_channel(address, tls.credentials(), options=options)
    return grpc.insecure_channel(address, options=options)


def open_aio_channel(address: str, service: str, *, tls: TlsConfig | None = None,
                     max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """The asyncio twin of open_channel."""
    options = _options(service, max_message_bytes)
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=options)
