"""Catching up from a peer at start: a replica that starts (added, or restarted) pulls the newest
policy version its peers serve before it reports SERVING, so the learner finds it current.

The peers are every address of `catch_up_from` (a headless Service's name). The one serving the
newest version streams its weights (FetchWeights: its kept copy of its last in-band push, with the
manifest), and they are staged, verified and committed exactly as a push to this replica is. A
replica that cannot catch up (no peer, none past version 0, or every one failing) serves what it
loaded and says why; the learner repairs it as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import Gauge

from rlhf_mesh.clients.channel import client_credentials, resolve
from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.services.generation.settings import GenerationSettings
from rlhf_mesh.v1 import generation_pb2

log = logging.getLogger(__name__)

CATCH_UP_SECONDS = Gauge("rlhf_mesh_generation_catch_up_seconds",
                         "How long this replica's catch-up from a peer took (fetch, verify, apply); 0: none.")

Install = Callable[..., Awaitable[generation_pb2.PushWeightsResponse]]  # GenerationServicer.install


async def catch_up(settings: GenerationSettings, served_version: int, install: Install) -> int | None:
    """The version caught up to, or None when this replica goes on with what it serves."""
    target = settings.catch_up_from
    try:
        peers = await asyncio.to_thread(resolve, target)
    except (OSError, ValueError) as err:  # no replica ready yet: the name resolves to none
        log.info("catch-up: no peers at %s (%s); serving policy version %d", target, err, served_version)
        return None
    credentials = client_credentials(settings.catch_up_token_file, settings.catch_up_tls_ca, settings.tls_cert,
                                     settings.tls_key, settings.catch_up_tls_server_name)
    clients = [AsyncGenerationClient(a, timeout_s=settings.catch_up_timeout_s, **credentials) for a in peers]
    try:
        infos = await asyncio.gather(*(c.model_info(timeout_s=30) for c in clients), return_exceptions=True)
        ranked = sorted(((info.policy_version, client) for info, client in zip(infos, clients, strict=True)
                         if isinstance(info, generation_pb2.GetModelInfoResponse)
                         and info.policy_version > served_version), key=lambda pair: -pair[0])
        for version, client in ranked:
            started = time.perf_counter()
            try:
                messages = aiter(client.stub.FetchWeights(generation_pb2.FetchWeightsRequest(
                    above_version=served_version), timeout=settings.catch_up_timeout_s))
                first = await anext(messages)
                if not first.HasField("manifest"):
                    raise ValueError("the peer's stream does not start with a manifest")
                reply = await install(first.manifest, messages)
            except grpc.aio.AioRpcError as err:
                log.warning("catch-up: %s (version %d) failed: %s: %s", client.address, version, err.code().name,
                            err.details())
                continue
            except (ValueError, RuntimeError, StopAsyncIteration) as err:  # refused as a push would be
                log.warning("catch-up: the weights of %s (version %d) were refused: %s", client.address, version,
                            err or "an empty stream")
                continue
            seconds = time.perf_counter() - started
            CATCH_UP_SECONDS.set(seconds)
            t = reply.timings
            log.info("catch-up: policy version %d from %s (%.1f MB in %.2f s: transfer %.0f ms, verify %.0f ms, "
                     "apply %.0f ms)", reply.policy_version, client.address, reply.received_bytes / 1e6, seconds,
                     t.transfer_ms, t.verify_ms, t.apply_ms)
            return reply.policy_version
        log.info("catch-up: no peer of %s serves a version above %d that it can send (%s); serving it", target,
                 served_version, ", ".join(f"{c.address}: {_said(i)}" for i, c in zip(infos, clients, strict=True)))
        return None
    finally:
        for client in clients:
            await client.close()


def _said(info: generation_pb2.GetModelInfoResponse | BaseException) -> str:
    if isinstance(info, generation_pb2.GetModelInfoResponse):
        return f"version {info.policy_version}"
    return info.code().name if isinstance(info, grpc.aio.AioRpcError) else repr(info)
