"""Waiting for a server's `grpc.health.v1` status."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_mesh.clients.channel import TlsConfig, open_channel


def wait_until_serving(
    address: str,
    timeout_s: float,
    service: str = "",
    alive: Callable[[], bool] | None = None,
    tls: TlsConfig | None = None,
) -> None:
    """Block until `address` reports SERVING for `service` ("" is the whole server).

    Raises TimeoutError after `timeout_s`, or RuntimeError as soon as `alive()` is false
    (for a server started as a child process that exited). Health needs no token.
    """
    deadline = time.monotonic() + timeout_s
    health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    with open_channel(address, health, tls=tls, health_checked=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = "unreachable"
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"server at {address} exited before it was SERVING")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                status = err.code().name
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} not SERVING after {timeout_s:.0f}s (last status {status})")
