"""The RewardService servicer and its place on the shared server bootstrap."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter

from rlhf_mesh.services.reward.batcher import Batcher, QueueFull
from rlhf_mesh.services.reward.model import Encoded, InvalidSample, RewardModel
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import common_pb2, reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

REQUESTS = Counter("rlhf_mesh_reward_requests_total", "Scoring requests.", ["model", "status"])
SAMPLES = Counter("rlhf_mesh_reward_samples_total", "Samples by outcome.", ["model", "status"])


class _Abort(Exception):
    """A status for the caller (the whole call, or one item of a stream)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Validates, queues samples on the model's batcher, answers in request order."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.models: dict[str, RewardModel] = {}
        self.batchers: dict[str, Batcher] = {}
        self.default = ""

    def add(self, model: RewardModel) -> None:
        batcher = Batcher(
            model.name, model.score, max_batch_tokens=self.settings.max_batch_tokens,
            max_wait_ms=self.settings.max_wait_ms, max_queue_samples=self.settings.max_queue_samples,
        )
        batcher.start()
        self.models[model.name], self.batchers[model.name] = model, batcher
        self.default = self.default or model.name

    def _model(self, name: str) -> RewardModel:
        model = self.models.get(name or self.default)
        if model is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"no reward model named {name!r}; loaded: {sorted(self.models)}")
        return model

    async def _score(self, model: RewardModel, encoded: list[Encoded]) -> list[reward_pb2.ScoreResult]:
        try:
            futures = self.batchers[model.name].submit([e.ids for e in encoded])
        except QueueFull as err:
            SAMPLES.labels(model.name, "rejected").inc(len(encoded))
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"reward queue is full ({err}); retry later") from None
        try:
            scores = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            SAMPLES.labels(model.name, "cancelled").inc(len(encoded))
            raise
        SAMPLES.labels(model.name, "ok").inc(len(encoded))
        return [
            reward_pb2.ScoreResult(score=s, truncated=e.truncated, num_tokens=len(e.ids), model_version=model.version)
            for s, e in zip(scores, encoded, strict=True)
        ]

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        name = request.model or self.default
        label = name if name in self.models else "<unknown>"  # callers must not grow the label set
        try:
            model = self._model(request.model)
            count = len(request.samples)
            if count == 0:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "samples is empty")
            if count > self.settings.max_request_samples:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{count} samples, more than max_request_samples={self.settings.max_request_samples}",
                )
            encoded = await asyncio.to_thread(
                lambda: [model.tokenization.encode(i, s) for i, s in enumerate(request.samples)]
            )
            results = await self._score(model, encoded)
        except InvalidSample as err:
            REQUESTS.labels(label, "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except _Abort as err:
            REQUESTS.labels(label, err.code.name.lower()).inc()
            await context.abort(err.code, str(err))
        REQUESTS.labels(label, "ok").inc()
        return reward_pb2.ScoreResponse(results=results, model=model.name)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[reward_pb2.ScoreStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reward_pb2.ScoreStreamResponse]:
        """Items are scored concurrently (at most max_request_samples in flight per stream)
        and answered as they finish; a bad item gets an ItemError and the stream goes on."""
        replies: asyncio.Queue[reward_pb2.ScoreStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.max_request_samples)
        pending: set[asyncio.Task[None]] = set()

        async def one(request: reward_pb2.ScoreStreamRequest) -> None:
            reply = reward_pb2.ScoreStreamResponse(request_id=request.request_id)
            try:
                model = self._model(request.model)
                reply.model = model.name
                encoded = model.tokenization.encode(0, request.sample)
                reply.result.CopyFrom((await self._score(model, [encoded]))[0])
            except InvalidSample as err:
                reply.error.CopyFrom(common_pb2.ItemError(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"sample: {err.problem}"))
            except _Abort as err:
                reply.error.CopyFrom(common_pb2.ItemError(code=err.code.value[0], message=str(err)))
            finally:
                slots.release()
            await replies.put(reply)

        async def read() -> None:
            async for request in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(one(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*list(pending))
            await replies.put(None)

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
        return reward_pb2.ListModelsResponse(
            models=[m.info(is_default=name == self.default) for name, m in self.models.items()]
        )


class RewardService:
    """RewardService on the shared bootstrap: loads every model, warms it, serves."""

    name = "reward"

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.servicer = RewardServicer(settings)

    def register(self, server: grpc.aio.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)
        return [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name]

    async def start(self) -> None:
        for name, path in self.settings.named_models():
            model = await asyncio.to_thread(self._load, name, path)
            await asyncio.to_thread(model.score, [[0] * 8, [0] * 16])  # warm-up
            self.servicer.add(model)
            log.info("loaded reward model %s from %s (version %s, max length %d, %s)",
                     name, path, model.version, model.max_length, model.backend)

    def _load(self, name: str, path: str) -> RewardModel:
        s = self.settings
        if s.backend == "vllm":
            from rlhf_mesh.services.reward.vllm_backend import VllmRewardModel

            return VllmRewardModel(name, path, dtype=s.dtype, max_length=s.max_length, truncation=s.truncation)
        return RewardModel(name, path, dtype=s.dtype, device=s.device, max_length=s.max_length,
                           truncation=s.truncation)

    async def close(self) -> None:
        for batcher in self.servicer.batchers.values():
            await batcher.close()
