"""One scoring path for every front door (Score, ScoreStream, the HTTP protocols): the request's
bounds, the named scorer, and the counts by outcome."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import Counter

from rlhf_mesh.services.reward.registry import ScorerRegistry
from rlhf_mesh.services.reward.reward_model import InvalidSample
from rlhf_mesh.services.reward.scorers import ScoringError
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import reward_pb2

REQUESTS = Counter("rlhf_mesh_reward_requests_total", "Scoring requests.", ["model", "status"])
SAMPLES = Counter("rlhf_mesh_reward_samples_total", "Samples by outcome.", ["model", "status"])


class ScoreDispatcher:
    """Validates a request's samples and scores them with the scorer it names."""

    def __init__(self, registry: ScorerRegistry, settings: RewardSettings) -> None:
        self.registry = registry
        self.settings = settings

    async def score(self, name: str, samples: list[reward_pb2.ScoreSample], *, caller: str = ""
                    ) -> tuple[str, list[reward_pb2.ScoreResult]]:
        """Scores of `samples` by the scorer `name` (empty: the default), and its name; raises
        InvalidSample or ScoringError. `caller` names who calls (a token's holder, or the peer
        address): callers share the batches and workers fairly."""
        s = self.settings
        if not samples:
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT, "samples is empty")
        if len(samples) > s.max_request_samples:
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{len(samples)} samples, more than max_request_samples={s.max_request_samples}")
        for i, sample in enumerate(samples):  # refused before the tokenizer's memory grows with it
            size = sample.ByteSize()
            if size > s.max_sample_bytes:
                raise InvalidSample(i, f"is {size} bytes, more than max_sample_bytes={s.max_sample_bytes}")
        with self.registry.get(name).lease() as scorer:
            try:
                results = await scorer.score(samples, caller=caller)
            except asyncio.CancelledError:
                SAMPLES.labels(scorer.name, "cancelled").inc(len(samples))
                raise
            except ScoringError as err:
                outcome = "rejected" if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED else err.code.name.lower()
                SAMPLES.labels(scorer.name, outcome).inc(len(samples))
                raise
        SAMPLES.labels(scorer.name, "ok").inc(len(samples))
        return scorer.name, results

    async def score_request(self, name: str, samples: list[reward_pb2.ScoreSample], *, caller: str = ""
                            ) -> tuple[str, list[reward_pb2.ScoreResult]]:
        """`score` as one request (a Score call or an HTTP one), counted by outcome."""
        label = self.registry.label(name)
        try:
            scored = await self.score(name, samples, caller=caller)
        except InvalidSample:
            REQUESTS.labels(label, "invalid").inc()
            raise
        except ScoringError as err:
            REQUESTS.labels(label, err.code.name.lower()).inc()
            raise
        REQUESTS.labels(label, "ok").inc()
        return scored
