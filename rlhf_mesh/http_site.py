"""Serving an aiohttp application on a port that answers over IPv4 and IPv6.

asyncio's `create_server` (and so aiohttp) sets IPV6_V6ONLY when it binds `::`, so such a
port refuses 127.0.0.1. An empty host (or `::`, `[::]`) binds one dual-stack socket instead.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

from aiohttp import web

ALL_HOSTS = ("", "::", "[::]", "0.0.0.0")


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
                     ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `application` on host:port (0 picks a free one); returns the runner and the bound port."""
    runner = web.AppRunner(application, access_log=None)
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
