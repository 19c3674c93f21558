"""The RewardService servicer and its place on the shared server bootstrap."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator

import grpc

from rlhf_mesh.hub import resolve_model
from rlhf_mesh.security import TokenAuth, caller_name
from rlhf_mesh.services.reward.dispatch import ScoreDispatcher
from rlhf_mesh.services.reward.registry import ModelReloader, ScorerRegistry
from rlhf_mesh.services.reward.reward_model import InvalidSample, RewardModel, TransformersRewardModel
from rlhf_mesh.services.reward.scorers import CompositeScorer, FunctionScorer, ScoringError
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from rlhf_mesh.worker_pool import FunctionFailed, FunctionPool

log = logging.getLogger(__name__)


def retry_pushback(err: ScoringError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata by which gRPC's own retry policy waits as long as the server asks."""
    if err.retry_after_s is None:
        return ()
    return (("grpc-retry-pushback-ms", str(math.ceil(err.retry_after_s * 1000))),)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """The gRPC front door: validate, call the dispatcher or the reloader, reply."""

    def __init__(self, dispatcher: ScoreDispatcher, reloader: ModelReloader) -> None:
        self.dispatcher = dispatcher
        self.reloader = reloader
        self.settings = dispatcher.settings
        self.auth = TokenAuth(self.settings.tokens_file) if self.settings.tokens_file else None

    def caller(self, context: grpc.aio.ServicerContext) -> str:
        return caller_name(context, self.auth)

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        try:
            name, results = await self.dispatcher.score_request(request.model, list(request.samples),
                                                                caller=self.caller(context))
        except InvalidSample as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except ScoringError as err:
            await context.abort(err.code, str(err), trailing_metadata=retry_pushback(err))
        return reward_pb2.ScoreResponse(results=results, model=name)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[reward_pb2.ScoreStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reward_pb2.ScoreStreamResponse]:
        """Items are scored concurrently (at most max_request_samples in flight per stream)
        and answered as they finish; a bad item gets an ItemError and the stream goes on."""
        replies: asyncio.Queue[reward_pb2.ScoreStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.max_request_samples)
        pending: set[asyncio.Task[None]] = set()
        caller = self.caller(context)

        async def one(request: reward_pb2.ScoreStreamRequest) -> None:
            reply = reward_pb2.ScoreStreamResponse(request_id=request.request_id)
            try:
                reply.model, (result,) = await self.dispatcher.score(request.model, [request.sample], caller=caller)
                reply.result.CopyFrom(result)
            except InvalidSample as err:
                reply.error.CopyFrom(common_pb2.ItemError(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"sample: {err.problem}"))
            except ScoringError as err:
                reply.error.CopyFrom(common_pb2.ItemError(code=err.code.value[0], message=str(err)))
            finally:
                slots.release()
            await replies.put(reply)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*list(pending))
            finally:  # also when the request stream fails, so the replies below end
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # re-raises a failure of the request stream
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def ListModels(self, request: reward_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        return reward_pb2.ListModelsResponse(models=self.reloader.registry.infos())

    async def ReloadModel(self, request: reward_pb2.ReloadModelRequest, context: grpc.aio.ServicerContext):
        try:
            info = await self.reloader.reload(request.name, request.path)
        except ScoringError as err:
            await context.abort(err.code, str(err))
        return reward_pb2.ReloadModelResponse(model=info)


class RewardService:
    """RewardService on the shared bootstrap: loads every model and function, warms them, serves
    gRPC (and the HTTP protocols of other frameworks on http_port)."""

    name = "reward"

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.models = [(name, resolve_model(path)) for name, path in settings.named_models()]  # fail fast
        self.registry = ScorerRegistry(settings)
        self.dispatcher = ScoreDispatcher(self.registry, settings)
        self.servicer = RewardServicer(self.dispatcher, ModelReloader(self.registry, self._load))
        self.pool: FunctionPool | None = None
        self.http = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)
        return [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name]

    async def start(self) -> None:
        s = self.settings
        for name, path in self.models:
            model = await asyncio.to_thread(self._load, name, path)
            self.registry.add(model)
            log.info("loaded reward model %s from %s (version %s, max length %d, %s)",
                     name, path, model.version, model.max_length, model.backend)
        functions = s.named_functions()
        if functions:
            self.pool = FunctionPool(
                [spec for _, spec in functions], workers=s.function_workers, timeout_s=s.function_timeout_s,
                max_queued_samples=s.function_max_queued_samples, workers_per_caller=s.function_workers_per_caller,
                memory_mb=s.function_worker_memory_mb)
            for name, spec in functions:
                try:
                    await self.pool.check(spec)
                except FunctionFailed as err:
                    raise RuntimeError(f"reward function {name}={spec}: {err}") from None
                self.registry.add(FunctionScorer(name, spec, self.pool))
                log.info("serving reward function %s (%s)", name, spec)
        for name, parts in s.composites():
            self.registry.add(CompositeScorer(name, parts, self.registry.get))
            log.info("serving composite reward %s = %s", name, " + ".join(f"{w:g}*{p}" for w, p in parts))
        if s.http_port is not None:
            from rlhf_mesh.services.reward.http import RewardHttp

            self.http = RewardHttp(self.dispatcher, s)
            port = await self.http.start(s.host if s.http_host is None else s.http_host, s.http_port)
            log.info("reward HTTP (OpenRLHF /get_reward, vLLM /classify and /pooling, /v1/score) on port %d", port)

    def _load(self, name: str, path: str) -> RewardModel:
        """Load and warm a model (at start and on ReloadModel): a folder or a hub id."""
        s = self.settings
        path = resolve_model(path)
        if s.backend == "vllm":
            from rlhf_mesh.services.reward.vllm_backend import VllmRewardModel

            model = VllmRewardModel(name, path, dtype=s.dtype, max_length=s.max_length, truncation=s.truncation,
                                    kv_cache_gib=s.kv_cache_gib)
        else:
            model = TransformersRewardModel(name, path, dtype=s.dtype, device=s.device, max_length=s.max_length,
                                truncation=s.truncation)
        model.score([[0] * 8, [0] * 16])  # warm-up
        return model

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        await self.registry.close()
        if self.pool is not None:
            self.pool.close()
