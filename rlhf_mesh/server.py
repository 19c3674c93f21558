"""The one bootstrap every rlhf-mesh gRPC server runs on.

`grpc.aio` server with bounded concurrency and message sizes, optional TLS / mutual TLS and
bearer tokens with roles (rlhf_mesh.security), `grpc.health.v1` (SERVING only once the service
has loaded and warmed its model; optionally also on a plaintext health-only port), optional
reflection, an interceptor that turns unexpected exceptions into INTERNAL (logged, never sent
to the client), Prometheus metrics on their own HTTP port, and SIGTERM/SIGINT -> NOT_SERVING
-> drain -> stop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http.server import HTTPServer
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from rlhf_mesh.clients.channel import channel_options
from rlhf_mesh.hub import ModelNotFound
from rlhf_mesh.security import ADMIN, TokenAuth, required_role, server_credentials
from rlhf_mesh.settings import ServiceSettings, SettingsError, load_settings

log = logging.getLogger(__name__)

# Calls to these stay open while the model loads and while draining.
_ALWAYS_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

RPCS = Counter("rlhf_mesh_rpcs_total", "Finished RPCs.", ["service", "method", "code"])
RPC_SECONDS = Histogram(
    "rlhf_mesh_rpc_duration_seconds", "RPC handling time.", ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300),
)
INFLIGHT_BYTES = Gauge(
    "rlhf_mesh_request_bytes_in_flight", "Bytes of request messages being handled (max_inflight_bytes).", ["service"]
)


class Service(Protocol):
    """What a service hands to `serve`."""

    name: str  # short name: "reward", "generation", ...

    def register(self, server: grpc.aio.Server) -> list[str]:
        """Add the servicers to `server`; return their full service names."""

    async def start(self) -> None:
        """Load and warm the model; the service is SERVING once this returns."""

    async def close(self) -> None:
        """Release what start() acquired; called after the server drained."""

    # Optional: a service whose work ends (the learner) sets `finished: asyncio.Event` to stop
    # the server and gives the process's `exit_code: int`; `draining()` is called as the drain
    # begins, so long work can wind down while calls in flight finish.


@dataclass
class Running:
    """A started server: its ports and the means to stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics: HTTPServer
    stopping: asyncio.Event
    health_server: grpc.aio.Server | None = None  # the plaintext health-only port, when configured

    @property
    def metrics_port(self) -> int:
        return self.metrics.server_port


class _Guard(grpc.aio.ServerInterceptor):
    """Admission before work (tokens and roles from the call's metadata, unavailable until ready, the
    bytes of requests in flight), stream time limit, exceptions -> INTERNAL, RPC metrics."""

    def __init__(self, service: str, ready: Callable[[], bool], auth: TokenAuth | None,
                 max_stream_s: float | None, max_inflight_bytes: int) -> None:
        self._service = service
        self._ready = ready
        self._auth = auth
        self._max_stream_s = max_stream_s
        self._inflight = _InFlight(service, max_inflight_bytes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(_ALWAYS_OPEN):
            return handler
        refused = self._refusal(method, details.invocation_metadata or ())
        if refused is not None:
            # A request-streaming handler that never reads: grpc hands a unary handler its message
            # (up to max_message_bytes) before calling it, this one gets the call without it.
            return grpc.stream_unary_rpc_method_handler(self._refuse(method, *refused))
        kind = _handler_kind(handler)
        behavior = getattr(handler, kind)
        parse = _parser(handler.request_deserializer)
        limit_s = self._max_stream_s if kind != "unary_unary" else None
        if kind.endswith("_stream"):
            wrap = self._wrap_stream(method, behavior, parse, limit_s)
        else:
            wrap = self._wrap_unary(method, behavior, parse, limit_s)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        # Requests arrive as bytes: their size is charged to the in-flight budget before they are parsed.
        return factory(wrap, request_deserializer=None, response_serializer=handler.response_serializer)

    def _refusal(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[grpc.StatusCode, str] | None:
        if self._auth is not None:
            denied = self._auth.check(method, metadata)
            if denied is not None:
                return denied
        if not self._ready():
            return grpc.StatusCode.UNAVAILABLE, f"{self._service} service is not ready yet"
        return None

    def _refuse(self, method: str, code: grpc.StatusCode, message: str) -> Callable[..., Awaitable[None]]:
        async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
            started = time.perf_counter()
            try:
                await context.abort(code, message)
            finally:
                self._observe(method, context, started)

        return refuse

    async def _fail(self, method: str, context: grpc.aio.ServicerContext) -> None:
        ref = uuid.uuid4().hex[:12]
        log.exception("unexpected error in %s (ref %s)", method, ref)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the server log")

    async def _too_long(self, context: grpc.aio.ServicerContext, limit_s: float) -> None:
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the call ran past this server's max_stream_s={limit_s:g}"
        )

    def _observe(self, method: str, context: grpc.aio.ServicerContext, started: float) -> None:
        code = context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        short = method.rsplit("/", 1)[-1]
        RPCS.labels(self._service, short, name).inc()
        RPC_SECONDS.labels(self._service, short).observe(time.perf_counter() - started)

    def _wrap_unary(
        self, method: str, behavior: Callable[..., Awaitable[Any]], parse: Callable[[bytes], Any],
        limit_s: float | None,
    ) -> Callable[..., Awaitable[Any]]:
        async def guarded(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            held = _Held(self._inflight)
            try:
                request = _request(raw, parse, held)
                async with asyncio.timeout(limit_s) as budget:
                    return await behavior(request, context)
            except _Refused as err:
                await context.abort(err.code, str(err), err.trailers)
            except TimeoutError:
                if not budget.expired():
                    await self._fail(method, context)
                await self._too_long(context, limit_s)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                await self._fail(method, context)
            finally:
                held.release()
                self._observe(method, context, started)

        return guarded

    def _wrap_stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]], parse: Callable[[bytes], Any],
        limit_s: float | None,
    ) -> Callable[..., AsyncIterator[Any]]:
        async def guarded(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            held = _Held(self._inflight)
            responses = None
            deadline = None if limit_s is None else time.monotonic() + limit_s
            try:
                responses = behavior(_request(raw, parse, held), context)
                while True:
                    # No `async with timeout` here: it must not span a yield of a generator.
                    remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    try:
                        response = await asyncio.wait_for(anext(responses), remaining)
                    except StopAsyncIteration:
                        break
                    yield response
            except _Refused as err:
                await context.abort(err.code, str(err), err.trailers)
            except TimeoutError:
                if deadline is None or time.monotonic() < deadline:
                    await self._fail(method, context)
                await self._too_long(context, limit_s)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                await self._fail(method, context)
            finally:
                if responses is not None:
                    await responses.aclose()
                held.release()
                self._observe(method, context, started)

        return guarded


class _Refused(Exception):
    """A request the guard turns into `code` with this message; raised rather than aborted where a
    servicer reads its request stream in another task than the one writing replies (an abort there
    would race the write on the same call)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    trailers: tuple[tuple[str, str], ...] = ()


class _Overloaded(_Refused):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    # Bytes in flight drain within a message's handling: gRPC's own retry policy waits this long.
    trailers = (("grpc-retry-pushback-ms", "250"),)


class _InFlight:
    """The bytes of request messages received and not yet done with, server-wide, and their limit."""

    def __init__(self, service: str, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._gauge = INFLIGHT_BYTES.labels(service)

    def add(self, size: int) -> None:
        self.size += size
        self._gauge.set(self.size)


class _Held:
    """What one call holds of the in-flight budget: its request message for a unary request, the
    message last handed to the servicer for a request stream, until the call ends."""

    def __init__(self, inflight: _InFlight) -> None:
        self._inflight = inflight
        self._size = 0

    def take(self, size: int) -> None:
        """Hold `size` bytes instead of what was held; _Overloaded if they do not fit."""
        self.release()
        budget = self._inflight
        if budget.size + size > budget.limit:
            raise _Overloaded(f"the server is handling {budget.size} bytes of requests and this {size}-byte one "
                              f"would pass its max_inflight_bytes={budget.limit}; retry shortly")
        budget.add(size)
        self._size = size

    def release(self) -> None:
        self._inflight.add(-self._size)
        self._size = 0


def _parser(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """The handler's deserializer, raising _Refused (INVALID_ARGUMENT) where grpc would say INTERNAL."""
    if deserialize is None:
        return lambda data: data
    name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    expected = name.full_name if name is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as err:  # any parse failure: the caller's bad bytes
            raise _Refused(f"request is not a valid {expected}: {err}") from None

    return parse


def _request(raw: bytes | AsyncIterator[bytes], parse: Callable[[bytes], Any], held: _Held) -> Any:
    """What the servicer gets: a unary request charged and parsed, or a request stream whose
    messages are charged and parsed one by one as the servicer reads them."""
    if isinstance(raw, bytes):
        held.take(len(raw))
        return parse(raw)
    return _checked(raw, parse, held)


async def _checked(requests: AsyncIterator[bytes], parse: Callable[[bytes], Any], held: _Held) -> AsyncIterator[Any]:
    """The messages of a request stream; the first that does not fit or parse raises _Refused naming its index."""
    index = 0
    async for raw in requests:
        try:
            held.take(len(raw))
            request = parse(raw)
        except _Refused as err:
            raise type(err)(f"stream message {index}: {err}") from None
        yield request
        index += 1


def _handler_kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


async def start(service: Service, settings: ServiceSettings) -> Running:
    """Bind, start and load `service`; health turns SERVING once `service.start()` returns."""
    ready = False
    auth = TokenAuth(settings.tokens_file) if settings.tokens_file else None
    guard = _Guard(service.name, lambda: ready, auth, settings.max_stream_s, settings.max_inflight_bytes)
    server = grpc.aio.server(
        interceptors=[guard],
        options=[
            *channel_options(settings.max_message_bytes),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = service.register(server)
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert is not None:
        port = server.add_secure_port(
            address, server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        )
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    health_server = None
    if settings.health_port is not None:
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        if health_server.add_insecure_port(f"{settings.host}:{settings.health_port}") == 0:
            raise OSError(f"cannot bind {settings.host}:{settings.health_port}")
        await health_server.start()
    metrics_host = settings.metrics_host or settings.host
    metrics, _ = start_http_server(settings.metrics_port, addr=_http_address(metrics_host))
    await server.start()
    log.info("%s: gRPC on port %d of %s (%s%s), metrics on http port %d of %s; loading", service.name, port,
             settings.host, "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext",
             ", tokens" if auth else "", metrics.server_port, metrics_host)
    if auth is None and not _loopback(settings.host):
        log.warning("%s: no tokens_file, and %s is not a loopback address: anyone who reaches this port may call "
                    "every RPC, the admin RPCs (%s) too; set tokens_file, or host 127.0.0.1", service.name,
                    settings.host, ", ".join(_admin_rpcs(names)) or "none")
    await service.start()
    ready = True
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s: SERVING", service.name)
    return Running(server, health_servicer, port, metrics, asyncio.Event(), health_server)


def _http_address(host: str) -> str:
    """`host` as an HTTP server binds it: gRPC's wildcards (`[::]`, `0.0.0.0`) as every IPv4 interface."""
    host = host.strip("[]")
    return "0.0.0.0" if host in ("", "::", "0.0.0.0") else host


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to any interface
        return False


def _admin_rpcs(services: list[str]) -> list[str]:
    """The RPCs of `services` that need the admin role."""
    pool = descriptor_pool.Default()
    return [method.name for name in services for method in pool.FindServiceByName(name).methods
            if required_role(f"/{name}/{method.name}") == ADMIN]


async def drain(running: Running, service: Service, grace_s: float, notice_s: float = 0.0) -> None:
    """NOT_SERVING; `notice_s` later stop taking calls; let in-flight ones finish for up to `grace_s`; close."""
    log.info("%s: draining (notice %.1fs, grace %.1fs)", service.name, notice_s, grace_s)
    if getattr(service, "draining", None) is not None:
        service.draining()
    await running.health.enter_graceful_shutdown()
    # Clients that watch health (ours do) send new calls elsewhere once they see NOT_SERVING.
    await asyncio.sleep(notice_s)
    await running.server.stop(grace_s)
    if running.health_server is not None:
        await running.health_server.stop(None)
    running.metrics.shutdown()
    await service.close()
    log.info("%s: stopped", service.name)


async def serve(service: Service, settings: ServiceSettings) -> None:
    """Run `service` until SIGTERM or SIGINT, then drain and stop."""
    running = await start(service, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, running.stopping.set)
    waits = [running.stopping.wait()]
    if getattr(service, "finished", None) is not None:
        waits.append(service.finished.wait())
    _, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], return_when=asyncio.FIRST_COMPLETED)
    for waiting in pending:
        waiting.cancel()
    await drain(running, service, settings.drain_grace_s, settings.drain_notice_s)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(settings_cls: type[ServiceSettings], make_service: Callable[[Any], Service], argv: list[str], prog: str) -> int:
    """Entry point of `rlhf-mesh serve X`: settings, logging, serve until signalled."""
    try:
        settings = load_settings(settings_cls, argv, prog)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        service = make_service(settings)
    except ModelNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    asyncio.run(serve(service, settings))
    code = getattr(service, "exit_code", 0)
    # Everything is drained and closed; skip interpreter finalization, where native threads
    # (vLLM's, torch's) can abort the process and turn a clean stop into a crash code.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
