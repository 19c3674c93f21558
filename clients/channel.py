"""gRPC channels as every rlhf-mesh client opens them: deadlines, retries, sizes, TLS."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Self

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


class _Client:
    """A stub of `service` on a channel, with a default deadline for every call."""

    service: str  # full proto name, e.g. "rlhf_mesh.v1.RewardService"
    stub_class: type

    def __init__(self, address: str, channel: grpc.Channel | grpc.aio.Channel, timeout_s: float) -> None:
        self.address = address
        self.channel = channel
        self.stub = self.stub_class(channel)
        self.timeout_s = timeout_s

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s


class Client(_Client):
    """Base of the blocking clients; use as a context manager or call close()."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, tls: TlsConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(address, open_channel(address, self.service, tls=tls, max_message_bytes=max_message_bytes),
                         timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Client):
    """Base of the asyncio clients; use with `async with` or await close()."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, tls: TlsConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(
            address, open_aio_channel(address, self.service, tls=tls, max_message_bytes=max_message_bytes), timeout_s
        )

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
