"""The GenerationService servicer and its place on the shared server bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter

from rlhf_mesh.hub import resolve_model
from rlhf_mesh.services.generation import prompts
from rlhf_mesh.services.generation import sessions as recorded
from rlhf_mesh.services.generation.catch_up import catch_up
from rlhf_mesh.services.generation.engine import PolicyEngine, QueueFull
from rlhf_mesh.services.generation.sessions import SESSION_ID
from rlhf_mesh.services.generation.settings import GenerationSettings
from rlhf_mesh.services.generation.staging import (
    BaseFile,
    NotServable,
    StagingFile,
    StaleBase,
    StaleVersion,
    WeightRejected,
    adapter_folder,
    check_adapter,
    check_delta,
    check_manifest,
    remove_orphans,
)
from rlhf_mesh.v1 import generation_pb2, generation_pb2_grpc, session_pb2, session_pb2_grpc

log = logging.getLogger(__name__)

REQUESTS = Counter("rlhf_mesh_generation_requests_total", "Generate calls by outcome.", ["status"])


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Validates, waits for the policy version asked for, admits, streams samples as they finish."""

    def __init__(self, settings: GenerationSettings, engine: PolicyEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.base: BaseFile | None = None  # the last in-band push in full: what a delta applies to
        self.http_port = 0  # the OpenAI-compatible port, once it listens

    def _replace_base(self, base: BaseFile | None) -> None:
        if self.base is not None:
            self.base.close()
        self.base = base

    def close(self) -> None:
        self._replace_base(None)

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async def refuse(code: grpc.StatusCode, message: str) -> None:
            REQUESTS.labels(code.name.lower()).inc()
            await context.abort(code, message)

        if self.engine.broken:
            await refuse(grpc.StatusCode.UNAVAILABLE, f"not serving: {self.engine.broken}")
        try:
            plan = await asyncio.to_thread(prompts.plan, request, self.engine.tokenizer, self.engine.limits)
        except prompts.InvalidRequest as err:
            await refuse(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        wanted = request.min_policy_version
        if wanted > self.engine.version and not await self.engine.wait_for_version(wanted, self._wait_s(context)):
            await refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"min_policy_version {wanted} was not reached before the deadline; serving {self.engine.version}",
            )
        try:
            self.engine.admit(plan)
        except QueueFull as err:
            await refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, f"generation queue is full ({err}); retry later")
        status = "cancelled"
        try:
            async for event in self.engine.generate(plan, request.stream_tokens):
                yield event
            status = "ok"
        finally:
            REQUESTS.labels(status).inc()

    def _wait_s(self, context: grpc.aio.ServicerContext) -> float:
        """How long a call may wait for its min_policy_version: answer just before its deadline,
        so the caller gets FAILED_PRECONDITION rather than DEADLINE_EXCEEDED."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.settings.max_version_wait_s
        return max(0.0, min(remaining - min(0.25, remaining / 10), self.settings.max_version_wait_s))

    async def PushWeights(self, request_iterator: AsyncIterator[generation_pb2.PushWeightsRequest],
                          context: grpc.aio.ServicerContext):
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("manifest"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the manifest")
        async with _refusals(context):
            return await self.install(first.manifest, request_iterator)

    async def install(self, manifest: generation_pb2.WeightManifest,
                      messages: AsyncIterator[generation_pb2.PushWeightsRequest | generation_pb2.FetchWeightsResponse]
                      ) -> generation_pb2.PushWeightsResponse:
        """Stage, verify and serve an in-band push (or a peer's stream of its weights); raises
        UpdateInProgress, StaleVersion, StaleBase, NotServable or WeightRejected, and then nothing
        changed. An adapter push (`lora_adapter`) becomes the served adapter, the base stays."""
        async with self._updating(manifest) as load_as:
            started = time.perf_counter()
            staging = await asyncio.to_thread(StagingFile, self.settings.weight_staging_dir, manifest, self.base)
            try:
                async for message in messages:
                    if not message.HasField("chunk"):
                        raise WeightRejected("only chunks may follow the manifest")
                    staging.write(message.chunk)
                received = time.perf_counter()
                await asyncio.to_thread(staging.verify)
                verified = time.perf_counter()
                if manifest.HasField("lora_adapter"):  # generation goes on meanwhile: nothing pauses
                    folder = adapter_folder(staging.keep(), manifest)
                    apply_ms, paused_ms = await self.engine.serve_adapter(folder, manifest.policy_version), 0.0
                else:
                    self._replace_base(None)  # the served weights change: the old base serves no delta any more
                    _, apply_ms, paused_ms = await self.engine.apply_staged(staging.path, load_as,
                                                                            manifest.policy_version)
                    if self.settings.keep_weight_base:
                        self._replace_base(BaseFile(staging.keep(), manifest))
            finally:
                staging.close()
            timings = generation_pb2.WeightUpdateTimings(
                transfer_ms=(received - started) * 1000, verify_ms=(verified - received) * 1000,
                apply_ms=apply_ms, paused_ms=paused_ms)
            return generation_pb2.PushWeightsResponse(
                policy_version=self.engine.version, received_bytes=staging.received_bytes, timings=timings)

    async def FetchWeights(self, request: generation_pb2.FetchWeightsRequest, context: grpc.aio.ServicerContext):
        served, base = self.engine.version, self.base
        if served <= request.above_version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this replica serves policy version {served}, not one above {request.above_version}")
        if base is None or base.version != served:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this replica keeps no full copy of version {served} (it came by a collective push "
                                "or is a LoRA adapter, or keep_weight_base is off)")
        reader = base.reopen()  # opened now: a push that replaces the base meanwhile leaves it readable
        messages = reader.messages()
        try:
            for message in messages:
                yield message
        finally:
            messages.close()
            reader.close()

    async def InitWeightTransfer(self, request: generation_pb2.InitWeightTransferRequest,
                                 context: grpc.aio.ServicerContext):
        if request.backend != generation_pb2.COLLECTIVE_BACKEND_GLOO:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "backend: only COLLECTIVE_BACKEND_GLOO is served by this build")
        if not request.master_address or not request.master_port or request.world_size < 2:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "master_address, master_port and world_size >= 2 are required")
        workers = self.engine.workers
        if request.rank_offset < 1 or request.rank_offset + workers > request.world_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"rank_offset {request.rank_offset} with {workers} workers does not fit "
                                f"world_size {request.world_size} after the sender's rank 0")
        timeout_s = (request.timeout_ms or 60_000) / 1000
        if timeout_s > self.settings.max_collective_timeout_s:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"timeout_ms {request.timeout_ms} is above max_collective_timeout_s="
                                f"{self.settings.max_collective_timeout_s:g}")
        await self.engine.join_group(request.master_address, request.master_port, request.world_size,
                                     request.rank_offset, timeout_s)
        return generation_pb2.InitWeightTransferResponse(worker_count=workers)

    async def PushWeightsCollective(self, request: generation_pb2.PushWeightsCollectiveRequest,
                                    context: grpc.aio.ServicerContext):
        manifest = request.manifest
        if not self.engine.in_group:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this replica's workers are in no weight-transfer group: call InitWeightTransfer first")
        if manifest.HasField("base_version") or manifest.HasField("lora_adapter"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "delta and adapter pushes are in-band only (PushWeights)")
        async with _refusals(context), self._updating(manifest) as load_as:
            self._replace_base(None)  # the base will no longer be the served version
            transfer_ms, apply_ms, paused_ms = await self.engine.receive_collective(manifest, load_as)
            timings = generation_pb2.WeightUpdateTimings(  # digests are checked as tensors arrive
                transfer_ms=transfer_ms, verify_ms=0, apply_ms=apply_ms, paused_ms=paused_ms)
            return generation_pb2.PushWeightsCollectiveResponse(
                policy_version=self.engine.version, received_bytes=sum(t.size_bytes for t in manifest.tensors),
                timings=timings)

    @contextlib.asynccontextmanager
    async def _updating(self, manifest: generation_pb2.WeightManifest):
        """One update at a time, and a manifest that fits the policy (else the refusal's exception)."""
        if self.engine.updating:
            raise UpdateInProgress("another weight update is in progress; retry after it")
        async with self.engine.update_lock:
            if manifest.HasField("lora_adapter"):
                check_adapter(manifest, self.engine.layout, self.engine.max_lora_rank, self.engine.version)
                yield {}
                return
            if self.engine.adapter is not None:  # samples report the adapter's version: the base stays
                raise NotServable(f"this replica serves a LoRA adapter (policy version {self.engine.version}): "
                                  "push adapters, or restart it to push full weights")
            load_as = check_manifest(manifest, self.engine.names, self.engine.dtype, self.engine.version)
            check_delta(manifest, self.base, self.engine.version)
            yield load_as

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        info = self.engine.info()
        info.openai_http_port = self.http_port
        return info


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """The gRPC twin of the HTTP port's session endpoints, and the stream that hands closed
    sessions to a learner (through the EnvironmentService)."""

    DEFAULT_TAKE = 64

    def __init__(self, sessions: recorded.Sessions) -> None:
        self.sessions = sessions

    async def OpenSession(self, request: session_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext):
        s = request.sampling
        if s.HasField("n") or s.stop or s.stop_token_ids or s.ignore_eos:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "sampling: only temperature, top_p, top_k, max_tokens and seed are imposed")
        if not SESSION_ID.fullmatch(request.session_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "session_id: 1 to 256 visible ASCII characters")
        sampling = {f: getattr(s, f) for f in ("temperature", "top_p", "top_k", "max_tokens", "seed") if s.HasField(f)}
        if sampling.get("max_tokens", 1) < 1 or not sampling.get("temperature", 0) >= 0 or not \
                0 < sampling.get("top_p", 1) <= 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "sampling: max_tokens >= 1, temperature >= 0 and top_p in (0, 1] are needed")
        async with _session_errors(context):
            self.sessions.open(request.session_id, sampling)
        return session_pb2.OpenSessionResponse()

    async def RewardSession(self, request: session_pb2.RewardSessionRequest, context: grpc.aio.ServicerContext):
        if not abs(request.reward) < float("inf"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "reward: a finite number is required")
        async with _session_errors(context):
            session = self.sessions.reward(request.session_id, request.reward, request.call_id or None,
                                           close=not request.keep_open)
        return session_pb2.RewardSessionResponse(branch_count=len(session.branches), closed=session.closed)

    async def GetSession(self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext):
        async with _session_errors(context):
            session = (self.sessions.take_one if request.take else self.sessions.get)(request.session_id)
        return session_pb2.GetSessionResponse(episodes=recorded.episodes(session), closed=session.closed,
                                              fork_count=session.forks)

    async def TakeSessions(self, request: session_pb2.TakeSessionsRequest, context: grpc.aio.ServicerContext):
        limit = request.max_sessions if request.HasField("max_sessions") else self.DEFAULT_TAKE
        if limit < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_sessions must be >= 1")
        wait_s = request.wait_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = max(0.0, min(wait_s, remaining - min(0.25, remaining / 10)))
        for session in await self.sessions.wait_taken(limit, wait_s):
            yield session_pb2.TakeSessionsResponse(session_id=session.id, episodes=recorded.episodes(session))


@contextlib.asynccontextmanager
async def _session_errors(context: grpc.aio.ServicerContext):
    try:
        yield
    except recorded.SessionError as err:
        code = {404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ALREADY_EXISTS,
                429: grpc.StatusCode.RESOURCE_EXHAUSTED}.get(
            err.status, grpc.StatusCode.FAILED_PRECONDITION)
        await context.abort(code, str(err))


class UpdateInProgress(RuntimeError):
    """Another weight update runs (ABORTED: retry after it)."""


@contextlib.asynccontextmanager
async def _refusals(context: grpc.aio.ServicerContext):
    """The status of each refusal of an update. Sent once the update lock is released, so the
    caller may push again as soon as it has it."""
    try:
        yield
    except UpdateInProgress as err:
        await context.abort(grpc.StatusCode.ABORTED, str(err))
    except (StaleVersion, StaleBase, NotServable) as err:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
    except WeightRejected as err:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


class GenerationService:
    """GenerationService on the shared bootstrap: starts vLLM, warms it, serves."""

    name = "generation"

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self.engine = PolicyEngine(settings, resolve_model(settings.model))  # a wrong model fails the start here
        self.servicer = GenerationServicer(settings, self.engine)
        self.sessions = recorded.Sessions(settings.max_sessions, settings.max_session_tokens, settings.session_idle_s,
                                          settings.max_total_session_tokens)
        self.http = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        name = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.sessions), server)
        # FetchWeights yields its replies serialized (BaseFile.messages): no serializer, bytes pass
        # through. Registered handlers take precedence over the generated generic one.
        server.add_registered_method_handlers(name, {"FetchWeights": grpc.unary_stream_rpc_method_handler(
            self.servicer.FetchWeights, request_deserializer=generation_pb2.FetchWeightsRequest.FromString)})
        return [name, session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name]

    async def start(self) -> None:
        for orphan in remove_orphans(self.settings.weight_staging_dir):
            log.info("removed %s, left by a process that is gone", orphan)
        await self.engine.start()
        if self.settings.catch_up_from:  # before SERVING: the learner then finds this replica current
            await catch_up(self.settings, self.engine.version, self.servicer.install)
        info = self.engine.info()
        log.info("serving %s (policy version %d, max_model_len %d, %s)",
                 info.model_id, info.policy_version, info.max_model_len_tokens, info.dtype)
        s = self.settings
        if s.http_port is not None:
            from rlhf_mesh.services.generation.openai_api import OpenAIPort

            self.http = OpenAIPort(s, self.engine, self.sessions)
            port = self.servicer.http_port = await self.http.start(s.host if s.http_host is None else s.http_host,
                                                                   s.http_port)
            log.info("OpenAI-compatible HTTP (/v1/chat/completions, /v1/completions, /v1/models, sessions) on "
                     "port %d", port)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        self.servicer.close()
        await self.engine.close()
