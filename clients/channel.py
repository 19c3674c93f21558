"""gRPC channels as every rlhf-mesh client opens them: deadlines, retries, sizes, TLS."""

from __future__ import annotations

import json
import socket
import threading
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message-size and keepalive options shared by servers and clients."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclass(frozen=True)
class TlsConfig:
    """Server CA, and a client certificate for mutual TLS, as PEM file paths."""

    root_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None  # the name the server's certificate must carry, when not the address's host

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.root_cert), read(self.client_key), read(self.client_cert))


def client_credentials(token_file: Path | None = None, tls_ca: Path | None = None, tls_cert: Path | None = None,
                       tls_key: Path | None = None, tls_server_name: str | None = None) -> dict[str, Any]:
    """The `tls` and `token` arguments of the clients, from file paths (TLS when a CA or cert is given)."""
    tls = None
    if tls_ca or tls_cert:
        tls = TlsConfig(root_cert=tls_ca, client_cert=tls_cert, client_key=tls_key, server_name=tls_server_name)
    return {"tls": tls, "token": Path(token_file).read_text().strip() if token_file else None}


def resolve(target: str) -> list[str]:
    """HOST:PORT for every address `target` (HOST:PORT) resolves to: every replica behind a
    headless Service's DNS name. Raises socket.gaierror for a name that resolves to none."""
    host, _, port = target.rpartition(":")
    infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    return sorted({f"[{i[4][0]}]:{port}" if ":" in i[4][0] else f"{i[4][0]}:{port}" for i in infos})


def service_config(service: str, retries: bool = True, health_checked: bool = True) -> str:
    """round_robin over every resolved address (headless Services), and with `retries` up to 5
    attempts of a call that fails UNAVAILABLE (a replica that restarts or drains).

    With `health_checked`, only replicas whose grpc.health.v1 reports `service` SERVING get
    calls: one that drains or still loads its model is skipped until it serves.
    """
    health = {"healthCheckConfig": {"serviceName": service}} if health_checked else {}
    retry = {"retryPolicy": {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }} if retries else {}
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        **health,
        "methodConfig": [{"name": [{"service": service}], **retry}],
    })


def _options(service: str, max_message_bytes: int, tls: TlsConfig | None, health_checked: bool,
             retries: bool) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        *channel_options(max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(service, retries, health_checked)),
        # A restarted replica is found again within 2 s (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def _with_token(details: Any, token: str) -> tuple[tuple[str, str], ...]:
    return (*(details.metadata or ()), ("authorization", f"Bearer {token}"))


class _SyncCallDetails(
    namedtuple("_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncCallDetails(details.method, details.timeout, _with_token(details, self._token),
                                details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary
    intercept_stream_unary = intercept_unary_unary
    intercept_stream_stream = intercept_unary_unary


def _async_bearer_tokens(token: str) -> list[grpc.aio.ClientInterceptor]:
    """The asyncio twin of _BearerToken: one interceptor per kind of call, since grpc.aio files an
    interceptor under the first kind it implements only (one of all four would miss streaming calls)."""

    async def intercept(self: object, continuation, details: grpc.aio.ClientCallDetails, request):
        return await continuation(details._replace(metadata=grpc.aio.Metadata(*_with_token(details, token))), request)

    kinds = {grpc.aio.UnaryUnaryClientInterceptor: "intercept_unary_unary",
             grpc.aio.UnaryStreamClientInterceptor: "intercept_unary_stream",
             grpc.aio.StreamUnaryClientInterceptor: "intercept_stream_unary",
             grpc.aio.StreamStreamClientInterceptor: "intercept_stream_stream"}
    return [type(f"_BearerToken{kind.__name__}", (kind,), {method: intercept})() for kind, method in kinds.items()]


def open_channel(address: str, service: str, *, tls: TlsConfig | None = None, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, health_checked: bool = True,
                 retries: bool = True) -> grpc.Channel:
    """A blocking channel to `address` configured for `service` (its full proto name).

    `token` goes with every call as `authorization: Bearer <token>`; give `tls` with it, a
    token sent in plaintext can be read on the way. `health_checked`, `retries`: see
    service_config; a caller with a retry policy of its own opens channels without one, so
    that the two do not multiply.
    """
    options = _options(service, max_message_bytes, tls, health_checked, retries)
    if tls is not None:
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


def open_aio_channel(address: str, service: str, *, tls: TlsConfig | None = None, token: str | None = None,
                     max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: bool = True) -> grpc.aio.Channel:
    """The asyncio twin of open_channel."""
    options = _options(service, max_message_bytes, tls, health_checked=True, retries=retries)
    interceptors = _async_bearer_tokens(token) if token else None
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


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
    """Base of the blocking clients; use as a context manager or call close().

    `retries=False`: the channel does not retry UNAVAILABLE itself (the caller does; see open_channel).
    """

    def __init__(self, address: str, *, timeout_s: float = 60.0, tls: TlsConfig | None = None,
                 token: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 retries: bool = True) -> None:
        channel = open_channel(address, self.service, tls=tls, token=token, max_message_bytes=max_message_bytes,
                               retries=retries)
        super().__init__(address, channel, timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C can land inside grpc's own bookkeeping of a call, after which close() waits
            # forever; the program is stopping, so the close must not hold it up.
            threading.Thread(target=self.close, daemon=True).start()
            return
        self.close()


class AsyncClient(_Client):
    """Base of the asyncio clients; use with `async with` or await close()."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, tls: TlsConfig | None = None,
                 token: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 retries: bool = True) -> None:
        channel = open_aio_channel(address, self.service, tls=tls, token=token,
                                   max_message_bytes=max_message_bytes, retries=retries)
        super().__init__(address, channel, timeout_s)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
