"""The RewardService servicer and its place on the shared server bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter

from rlhf_mesh.hub import resolve_model
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


@dataclass
class Served:
    """A model and its batcher; counts the calls using them so a replaced one is closed only
    after its last call finished."""

    model: RewardModel
    batcher: Batcher
    calls: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Served]:
        self.calls += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.calls -= 1
            if self.calls == 0:
                self.idle.set()

    async def retire(self) -> None:
        if self.calls:
            await self.idle.wait()
        await self.close()

    async def close(self) -> None:
        await self.batcher.close()
        self.model.close()


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Validates, queues samples on the model's batcher, answers in request order."""

    def __init__(self, settings: RewardSettings, load: Callable[[str, str], RewardModel]) -> None:
        self.settings = settings
        self.load = load
        self.served: dict[str, Served] = {}
        self.default = ""
        self._reloading: set[str] = set()

    def add(self, model: RewardModel) -> Served | None:
        """Serve `model` under its name; returns the one it replaces."""
        batcher = Batcher(
            model.name, model.score, max_batch_tokens=self.settings.max_batch_tokens,
            max_wait_ms=self.settings.max_wait_ms, max_queue_samples=self.settings.max_queue_samples,
            max_padding_ratio=self.settings.max_padding_ratio if model.pads_batches else 1.0,
        )
        batcher.start()
        replaced = self.served.get(model.name)
        self.served[model.name] = Served(model, batcher)
        self.default = self.default or model.name
        return replaced

    def _served(self, name: str) -> Served:
        served = self.served.get(name or self.default)
        if served is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"no reward model named {name!r}; loaded: {sorted(self.served)}")
        return served

    async def _score(self, served: Served, encoded: list[Encoded]) -> list[reward_pb2.ScoreResult]:
        model = served.model
        try:
            futures = served.batcher.submit([e.ids for e in encoded])
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
        label = name if name in self.served else "<unknown>"  # callers must not grow the label set
        try:
            with self._served(request.model).lease() as served:
                results = await self._score_request(served, request)
        except InvalidSample as err:
            REQUESTS.labels(label, "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except _Abort as err:
            REQUESTS.labels(label, err.code.name.lower()).inc()
            await context.abort(err.code, str(err))
        REQUESTS.labels(label, "ok").inc()
        return reward_pb2.ScoreResponse(results=results, model=served.model.name)

    async def _score_request(self, served: Served,
                             request: reward_pb2.ScoreRequest) -> list[reward_pb2.ScoreResult]:
        model = served.model
        count = len(request.samples)
        if count == 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "samples is empty")
        if count > self.settings.max_request_samples:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} samples, more than max_request_samples={self.settings.max_request_samples}",
            )
        encoded = await asyncio.to_thread(lambda: [self._encode(model, i, s) for i, s in enumerate(request.samples)])
        return await self._score(served, encoded)

    def _encode(self, model: RewardModel, index: int, sample: reward_pb2.ScoreSample) -> Encoded:
        """Token ids of one sample; an oversized one is refused before the tokenizer's memory grows with it."""
        size = sample.ByteSize()
        if size > self.settings.max_sample_bytes:
            raise InvalidSample(index, f"is {size} bytes, more than max_sample_bytes={self.settings.max_sample_bytes}")
        return model.tokenization.encode(index, sample)

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
                with self._served(request.model).lease() as served:
                    reply.model = served.model.name
                    encoded = await asyncio.to_thread(self._encode, served.model, 0, request.sample)
                    reply.result.CopyFrom((await self._score(served, [encoded]))[0])
            except InvalidSample as err:
                reply.error.CopyFrom(common_pb2.ItemError(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"sample: {err.problem}"))
            except _Abort as err:
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
        return reward_pb2.ListModelsResponse(
            models=[s.model.info(is_default=name == self.default) for name, s in self.served.items()]
        )

    async def ReloadModel(self, request: reward_pb2.ReloadModelRequest, context: grpc.aio.ServicerContext):
        """Load and warm `path` as `name` beside the serving model, then swap; calls already queued
        finish on the old one, which is then closed. A failed load changes nothing."""
        if not request.name or not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give the model's name and path")
        if request.name in self._reloading:
            await context.abort(grpc.StatusCode.ABORTED, f"model {request.name!r} is being reloaded already")
        self._reloading.add(request.name)
        try:
            model, error = await asyncio.to_thread(self.load, request.name, request.path), None
        except Exception as err:  # whatever the loader raises, the old model keeps serving
            model, error = None, err
        finally:
            self._reloading.discard(request.name)  # before the reply: its caller may retry at once
        if model is None:
            log.warning("reload of %s from %s failed: %s", request.name, request.path, error)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"cannot load {request.path!r} as {request.name!r}: {error}")
        replaced = self.add(model)
        log.info("reloaded reward model %s from %s (version %s)", model.name, model.path, model.version)
        if replaced is not None:
            asyncio.create_task(replaced.retire())  # noqa: RUF006 - runs until its last call ends
        return reward_pb2.ReloadModelResponse(model=model.info(is_default=request.name == self.default))


class RewardService:
    """RewardService on the shared bootstrap: loads every model, warms it, serves."""

    name = "reward"

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.models = [(name, resolve_model(path)) for name, path in settings.named_models()]  # fail fast
        self.servicer = RewardServicer(settings, self._load)

    def register(self, server: grpc.aio.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)
        return [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name]

    async def start(self) -> None:
        for name, path in self.models:
            model = await asyncio.to_thread(self._load, name, path)
            self.servicer.add(model)
            log.info("loaded reward model %s from %s (version %s, max length %d, %s)",
                     name, path, model.version, model.max_length, model.backend)

    def _load(self, name: str, path: str) -> RewardModel:
        """Load and warm a model (at start and on ReloadModel): a folder or a hub id."""
        s = self.settings
        path = resolve_model(path)
        if s.backend == "vllm":
            from rlhf_mesh.services.reward.vllm_backend import VllmRewardModel

            model = VllmRewardModel(name, path, dtype=s.dtype, max_length=s.max_length, truncation=s.truncation,
                                    kv_cache_gib=s.kv_cache_gib)
        else:
            model = RewardModel(name, path, dtype=s.dtype, device=s.device, max_length=s.max_length,
                                truncation=s.truncation)
        model.score([[0] * 8, [0] * 16])  # warm-up
        return model

    async def close(self) -> None:
        for served in self.servicer.served.values():
            await served.close()
