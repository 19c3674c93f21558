"""Serving an aiohttp application on a service's HTTP port (the RewardService's JSON protocols,
the FeedbackService's rater page): both address families, timeouts on slow and idle
connections, and errors in one JSON shape that quote nothing the client sent.

- asyncio's `create_server` (and so aiohttp) sets IPV6_V6ONLY when it binds `::`, so such a
  port refuses 127.0.0.1. An empty host (or `::`, `[::]`) binds one dual-stack socket instead.
- A connection is closed when a request's line and headers take longer than
  `http_header_timeout_s` from their first byte, or when it waits longer than
  `http_idle_timeout_s` for a request (from its opening or the last reply); a body that takes
  longer than `http_body_timeout_s` after its headers gets 408.
- aiohttp answers a malformed request line or header (an `Authorization` line with a stray CR,
  a header over 8190 bytes) with a 400 that quotes the offending bytes, and logs them in a
  traceback: a bearer token would be in both. Here the 400 says what is wrong in words of its
  own, and so does the log line.
- Every error, aiohttp's own 404/405/413/500 included, is `{"error": {"message", "type",
  "param", "code"}}`, vLLM's (and OpenAI's) shape, unless the application passes its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import grpc
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from pydantic import BaseModel, Field

from rlhf_mesh.security import TokenAuth, bearer_token

log = logging.getLogger(__name__)

ALL_HOSTS = ("", "::", "[::]", "0.0.0.0")
ErrorReply = Callable[[int, str], web.Response]


class HttpPortSettings(BaseModel):
    """Timeouts of a service's HTTP port (mixed into the settings of the services that have one)."""

    http_header_timeout_s: float = Field(
        20.0, gt=0, description="HTTP ports: longest a request's line and headers may take from their first byte; "
        "then the connection is closed")
    http_body_timeout_s: float = Field(
        120.0, gt=0, description="HTTP ports: longest a request's body may take to arrive after its headers; then 408")
    http_idle_timeout_s: float = Field(
        60.0, gt=0, description="HTTP ports: longest a connection may wait for a request (keep-alive); then it is "
        "closed")


class BodyTimeout(asyncio.TimeoutError):
    """A request body that did not arrive within http_body_timeout_s (raised by its reads)."""


class Refused(Exception):
    """A request refused before any work: its HTTP status, a message for the caller and the
    field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param

    def reply(self) -> web.Response:
        return error_reply(self.status, str(self), self.param)


AUTH_STATUS = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403}


def caller(request: web.Request, auth: TokenAuth | None, method: str) -> str:
    """Who calls: the holder of the bearer token, which must grant `method`'s role (else 401 /
    403), or the peer's address where no token file is set. Checked before the body is read."""
    if auth is None:
        return request.remote or ""
    header = request.headers.get("Authorization", "")
    refused = auth.check(method, [("authorization", header)])
    if refused is not None:
        raise Refused(AUTH_STATUS[refused[0]], refused[1])
    holder = auth.holder(bearer_token(header) or "")
    return holder.name if holder is not None else request.remote or ""


async def read_body(request: web.Request, limit: int) -> bytes:
    """A JSON body, refused as soon as it (inflated, for a compressed one) passes `limit` bytes."""
    if request.content_type != "application/json":
        raise Refused(415, "the body must be JSON, sent as Content-Type: application/json")
    if request.charset is not None and request.charset.lower() not in ("utf-8", "utf8"):
        raise Refused(400, f"charset={request.charset}: the body must be UTF-8")
    too_large = f"the body is more than max_message_bytes={limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, too_large)
    compressed = "Content-Encoding" in request.headers
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                chunks.clear()  # freed now, not when the refusal's traceback is collected
                raise Refused(413, too_large + (" once inflated" if compressed else ""))
            chunks.append(chunk)
    except BodyTimeout as err:
        raise Refused(408, str(err)) from None
    except web.RequestPayloadError:
        raise Refused(400, "the body does not match its Content-Encoding or Content-Length") from None
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The body's JSON value, or a 400 that says why not."""
    try:
        return json.loads(raw.decode())
    except RecursionError:
        raise Refused(400, "the body is not JSON this server reads: nested too deeply") from None
    except ValueError as err:  # bad syntax, not UTF-8, an integer of over 4300 digits
        raise Refused(400, f"the body must be JSON: {err}") from None


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """An error in vLLM's (and OpenAI's) shape: {"error": {"message", "type", "param", "code"}}."""
    phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    kind = phrase if phrase.endswith("Error") else f"{phrase}Error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_reply(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


def _malformed(exc: BaseException | None, limit: int) -> str:
    """What is wrong with a request aiohttp's parser refused, without quoting any of it."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return f"a request line or header is longer than {limit} bytes"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "not an HTTP request"
    if isinstance(exc, http_exceptions.BadStatusLine | http_exceptions.InvalidURLError):
        return "malformed request line"
    if isinstance(exc, http_exceptions.ContentEncodingError):
        return "unsupported Content-Encoding"
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return "malformed body framing (Content-Length, Transfer-Encoding)"
    return "malformed request header (each line must be NAME: VALUE and end with CRLF)"


class _Connection(RequestHandler):
    """aiohttp's connection with a header timeout, and answers to malformed requests that
    quote nothing."""

    def __init__(self, manager: _Server, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._reply = manager.reply
        self._header_timeout_s = manager.header_timeout_s
        self._headers_due: asyncio.TimerHandle | None = None
        self._last_body = None  # payload of the last request whose headers arrived

    def data_received(self, data: bytes) -> None:
        between_requests = not self._request_in_progress and (self._last_body is None or self._last_body.is_eof())
        if data and self._headers_due is None and between_requests:
            self._headers_due = self._loop.call_later(self._header_timeout_s, self._headers_late)
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None
            if self._messages:
                self._last_body = self._messages[-1][1]

    def _headers_late(self) -> None:
        self._headers_due = None
        log.info("closed a connection from %s: its request headers took over %g s (http_header_timeout_s)",
                 self.peername[0] if isinstance(self.peername, tuple) else "?", self._header_timeout_s)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, http_exceptions.HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        what = _malformed(exc, self.max_line_size)
        log.warning("refused a request from %s: %s", request.remote, what)
        reply = self._reply(status, what)
        reply.force_close()
        return reply

    def log_exception(self, *args, **kwargs) -> None:
        # A body that broke off or does not decode: the client's fault, already answered; the
        # lingering read of its rest raises it again.
        if isinstance(kwargs.get("exc_info"), web.RequestPayloadError):
            what = " ".join(str(kwargs["exc_info"]).split())
            log.info("dropped a connection whose request body was malformed: %s", what)
            return
        super().log_exception(*args, **kwargs)


class _Server(web.Server):
    """aiohttp's server, making `_Connection`s."""

    def __init__(self, made: web.Server, header_timeout_s: float, reply: ErrorReply) -> None:
        super().__init__(made.request_handler, request_factory=made.request_factory,
                         handler_cancellation=made.handler_cancellation, loop=made._loop, **made._kwargs)
        self.header_timeout_s = header_timeout_s
        self.reply = reply

    def __call__(self) -> _Connection:
        return _Connection(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    def __init__(self, application: web.Application, header_timeout_s: float, reply: ErrorReply, **kwargs) -> None:
        super().__init__(application, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._reply = reply

    async def _make_server(self) -> web.Server:
        return _Server(await super()._make_server(), self._header_timeout_s, self._reply)


def _guard(settings: HttpPortSettings, reply: ErrorReply):
    """The outermost middleware: the body's deadline, and every error in `reply`'s shape."""
    body_timeout_s = settings.http_body_timeout_s

    def expire(body) -> None:
        if not body.is_eof():
            body.set_exception(BodyTimeout(
                f"the body did not arrive within {body_timeout_s:g} s (http_body_timeout_s)"))

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        deadline = None if request.content.is_eof() else request.loop.call_later(body_timeout_s, expire,
                                                                                request.content)
        try:
            return await handler(request)
        except BodyTimeout as err:
            response = reply(408, str(err))
        except web.HTTPException as err:
            if err.status < 400:
                raise
            response = reply(err.status, _http_error(request, err))
            if "Allow" in err.headers:
                response.headers["Allow"] = err.headers["Allow"]
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = reply(500, "internal error (the server's log has the details)")
        finally:
            if deadline is not None:
                deadline.cancel()
        if response.status in (408, 413) or response.status >= 500:
            response.force_close()
        return response

    return guard


def _http_error(request: web.Request, err: web.HTTPException) -> str:
    if isinstance(err, web.HTTPMethodNotAllowed):
        return f"{request.method} is not allowed here; allowed: {', '.join(sorted(err.allowed_methods))}"
    if isinstance(err, web.HTTPNotFound):
        return f"no such path: {request.path}"
    default = f"{err.status}: {err.reason}"
    return err.reason if err.text in (None, default) else err.text


def _dual_stack_socket(port: int) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple = ("::", port)
    except OSError:  # no IPv6 on this host
        sock, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def start_site(application: web.Application, host: str, port: int,
                     ssl_context: ssl.SSLContext | None = None, *, settings: HttpPortSettings | None = None,
                     reply: ErrorReply = error_reply, cancel_on_disconnect: bool = False,
                     ) -> tuple[web.AppRunner, int]:
    """Serve `application` on host:port (0 picks a free one) with `settings`' timeouts and
    errors made by `reply`; returns the runner and the bound port. With `cancel_on_disconnect`,
    a handler is cancelled when its client goes away (aiohttp 3.x no longer does so itself)."""
    settings = settings or HttpPortSettings()
    application.middlewares.insert(0, _guard(settings, reply))
    runner = _Runner(application, settings.http_header_timeout_s, reply, access_log=None,
                     keepalive_timeout=settings.http_idle_timeout_s, handler_cancellation=cancel_on_disconnect)
    await runner.setup()
    try:
        if host in ALL_HOSTS:
            site: web.BaseSite = web.SockSite(runner, _dual_stack_socket(port), ssl_context=ssl_context)
        else:
            site = web.TCPSite(runner, host.strip("[]"), port, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


def ssl_context(cert: Path | None, key: Path | None, client_ca: Path | None) -> ssl.SSLContext | None:
    """TLS for an HTTP port from a service's tls_cert and tls_key (None without a cert); with
    `client_ca`, clients must present a certificate it signed."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
