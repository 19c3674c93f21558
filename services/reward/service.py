"""The RewardService servicer and its place on the shared server bootstrap."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from prometheus_client import Counter

from rlhf_mesh.hub import resolve_model
from rlhf_mesh.services.reward.batcher import Batcher
from rlhf_mesh.services.reward.function_pool import FunctionFailed, FunctionPool
from rlhf_mesh.services.reward.model import InvalidSample, RewardModel
from rlhf_mesh.services.reward.scorers import (
    CompositeScorer,
    FunctionScorer,
    ModelScorer,
    Scorer,
    ScoringError,
)
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import common_pb2, reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

REQUESTS = Counter("rlhf_mesh_reward_requests_total", "Scoring requests.", ["model", "status"])
SAMPLES = Counter("rlhf_mesh_reward_samples_total", "Samples by outcome.", ["model", "status"])


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Validates, scores with the named model, function or composite, answers in request order.
    `score` is the one path of the gRPC and HTTP front doors."""

    def __init__(self, settings: RewardSettings, load: Callable[[str, str], RewardModel]) -> None:
        self.settings = settings
        self.load = load
        self.scorers: dict[str, Scorer] = {}
        self.default = ""
        self._reloading: set[str] = set()

    def add(self, scorer: Scorer | RewardModel) -> Scorer | None:
        """Serve a model (with a batcher of its own), function or composite under its name;
        returns the scorer it replaces."""
        if isinstance(scorer, RewardModel):
            model, s = scorer, self.settings
            batcher = Batcher(
                model.name, model.score, max_batch_tokens=s.max_batch_tokens, max_wait_ms=s.max_wait_ms,
                max_queue_samples=s.max_queue_samples,
                max_padding_ratio=s.max_padding_ratio if model.pads_batches else 1.0,
            )
            batcher.start()
            scorer = ModelScorer(model, batcher)
        replaced = self.scorers.get(scorer.name)
        self.scorers[scorer.name] = scorer
        self.default = self.default or scorer.name
        return replaced

    def scorer(self, name: str) -> Scorer:
        found = self.scorers.get(name or self.default)
        if found is None:
            raise ScoringError(grpc.StatusCode.NOT_FOUND,
                               f"no reward model named {name!r}; served: {sorted(self.scorers)}")
        return found

    def label(self, name: str) -> str:
        """The metrics label of a requested name (callers must not grow the label set)."""
        name = name or self.default
        return name if name in self.scorers else "<unknown>"

    async def score(self, name: str, samples: list[reward_pb2.ScoreSample]) -> tuple[str, list[reward_pb2.ScoreResult]]:
        """Scores of `samples` by the scorer `name` (empty: the default), and its name; raises
        InvalidSample or ScoringError."""
        if not samples:
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT, "samples is empty")
        if len(samples) > self.settings.max_request_samples:
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT, f"{len(samples)} samples, more than "
                               f"max_request_samples={self.settings.max_request_samples}")
        for i, sample in enumerate(samples):  # refused before the tokenizer's memory grows with it
            size = sample.ByteSize()
            if size > self.settings.max_sample_bytes:
                raise InvalidSample(i, f"is {size} bytes, more than max_sample_bytes={self.settings.max_sample_bytes}")
        with self.scorer(name).lease() as scorer:
            try:
                results = await scorer.score(samples)
            except asyncio.CancelledError:
                SAMPLES.labels(scorer.name, "cancelled").inc(len(samples))
                raise
            except ScoringError as err:
                outcome = "rejected" if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED else err.code.name.lower()
                SAMPLES.labels(scorer.name, outcome).inc(len(samples))
                raise
        SAMPLES.labels(scorer.name, "ok").inc(len(samples))
        return scorer.name, results

    async def score_request(self, name: str, samples: list[reward_pb2.ScoreSample]
                            ) -> tuple[str, list[reward_pb2.ScoreResult]]:
        """`score` as one request (a Score call or an HTTP one), counted by outcome."""
        label = self.label(name)
        try:
            scored = await self.score(name, samples)
        except InvalidSample:
            REQUESTS.labels(label, "invalid").inc()
            raise
        except ScoringError as err:
            REQUESTS.labels(label, err.code.name.lower()).inc()
            raise
        REQUESTS.labels(label, "ok").inc()
        return scored

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        try:
            name, results = await self.score_request(request.model, list(request.samples))
        except InvalidSample as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except ScoringError as err:
            await context.abort(err.code, str(err))
        return reward_pb2.ScoreResponse(results=results, model=name)

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
                reply.model, (result,) = await self.score(request.model, [request.sample])
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
        return reward_pb2.ListModelsResponse(
            models=[s.info(is_default=name == self.default) for name, s in self.scorers.items()]
        )

    async def ReloadModel(self, request: reward_pb2.ReloadModelRequest, context: grpc.aio.ServicerContext):
        """Load and warm `path` as `name` beside the serving model, then swap; calls already queued
        finish on the old one, which is then closed. A failed load changes nothing."""
        if not request.name or not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give the model's name and path")
        if request.name in self.scorers and not isinstance(self.scorers[request.name], ModelScorer):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{request.name!r} is a reward function or composite, not a model")
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
        if isinstance(replaced, ModelScorer):
            asyncio.create_task(replaced.retire())  # noqa: RUF006 - runs until its last call ends
        return reward_pb2.ReloadModelResponse(model=self.scorers[request.name].info(
            is_default=request.name == self.default))


class RewardService:
    """RewardService on the shared bootstrap: loads every model and function, warms them, serves
    gRPC (and the HTTP protocols of other frameworks on http_port)."""

    name = "reward"

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.models = [(name, resolve_model(path)) for name, path in settings.named_models()]  # fail fast
        self.servicer = RewardServicer(settings, self._load)
        self.pool: FunctionPool | None = None
        self.http = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)
        return [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name]

    async def start(self) -> None:
        s = self.settings
        for name, path in self.models:
            model = await asyncio.to_thread(self._load, name, path)
            self.servicer.add(model)
            log.info("loaded reward model %s from %s (version %s, max length %d, %s)",
                     name, path, model.version, model.max_length, model.backend)
        functions = s.named_functions()
        if functions:
            self.pool = FunctionPool(s.function_workers, s.function_timeout_s)
            for name, spec in functions:
                try:
                    await self.pool.check(spec)
                except FunctionFailed as err:
                    raise RuntimeError(f"reward function {name}={spec}: {err}") from None
                self.servicer.add(FunctionScorer(name, spec, self.pool))
                log.info("serving reward function %s (%s)", name, spec)
        for name, parts in s.composites():
            self.servicer.add(CompositeScorer(name, parts, self.servicer.scorer))
            log.info("serving composite reward %s = %s", name, " + ".join(f"{w:g}*{p}" for w, p in parts))
        if s.http_port is not None:
            from rlhf_mesh.services.reward.http import RewardHttp

            self.http = RewardHttp(self.servicer, s)
            port = await self.http.start(s.http_host, s.http_port)
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
            model = RewardModel(name, path, dtype=s.dtype, device=s.device, max_length=s.max_length,
                                truncation=s.truncation)
        model.score([[0] * 8, [0] * 16])  # warm-up
        return model

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        for scorer in self.servicer.scorers.values():
            if isinstance(scorer, ModelScorer):
                await scorer.close()
        if self.pool is not None:
            self.pool.close()
