"""What the RewardService serves by name: models (each with its batcher), functions and
composites, and the reloads that swap a model for a new one while calls go on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from rlhf_mesh.services.reward.batcher import Batcher
from rlhf_mesh.services.reward.reward_model import RewardModel
from rlhf_mesh.services.reward.scorers import ModelScorer, Scorer, ScoringError
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import reward_pb2

log = logging.getLogger(__name__)


class ScorerRegistry:
    """Name -> scorer; the first one added is the default (an empty name in a request)."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.scorers: dict[str, Scorer] = {}
        self.default = ""

    def add(self, scorer: Scorer | RewardModel) -> Scorer | None:
        """Serve a model (with a batcher of its own), function or composite under its name;
        returns the scorer it replaces."""
        if isinstance(scorer, RewardModel):
            model, s = scorer, self.settings
            batcher = Batcher(
                model.name, model.score, max_batch_tokens=s.max_batch_tokens, max_wait_ms=s.max_wait_ms,
                max_queued_tokens=s.max_queued_tokens, max_queued_samples=s.max_queued_samples,
                max_padding_ratio=s.max_padding_ratio if model.pads_batches else 1.0, fair=s.fair_batches,
            )
            batcher.start()
            scorer = ModelScorer(model, batcher)
        replaced = self.scorers.get(scorer.name)
        self.scorers[scorer.name] = scorer
        self.default = self.default or scorer.name
        return replaced

    def get(self, name: str) -> Scorer:
        """The scorer `name` (empty: the default); ScoringError NOT_FOUND otherwise."""
        found = self.scorers.get(name or self.default)
        if found is None:
            raise ScoringError(grpc.StatusCode.NOT_FOUND,
                               f"no reward model named {name!r}; served: {sorted(self.scorers)}")
        return found

    def label(self, name: str) -> str:
        """The metrics label of a requested name (callers must not grow the label set)."""
        name = name or self.default
        return name if name in self.scorers else "<unknown>"

    def infos(self) -> list[reward_pb2.RewardModelInfo]:
        return [s.info(is_default=name == self.default) for name, s in self.scorers.items()]

    async def close(self) -> None:
        for scorer in self.scorers.values():
            if isinstance(scorer, ModelScorer):
                await scorer.close()


class ModelReloader:
    """ReloadModel: load and warm the new model beside the serving one, then swap; calls already
    queued finish on the old one, which is then closed. A failed load changes nothing."""

    def __init__(self, registry: ScorerRegistry, load: Callable[[str, str], RewardModel]) -> None:
        self.registry = registry
        self.load = load
        self._reloading: set[str] = set()

    async def reload(self, name: str, path: str) -> reward_pb2.RewardModelInfo:
        """The new model's info; raises ScoringError (INVALID_ARGUMENT, ABORTED, FAILED_PRECONDITION)."""
        scorers = self.registry.scorers
        if not name or not path:
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT, "give the model's name and path")
        if name in scorers and not isinstance(scorers[name], ModelScorer):
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{name!r} is a reward function or composite, not a model")
        if name in self._reloading:
            raise ScoringError(grpc.StatusCode.ABORTED, f"model {name!r} is being reloaded already")
        self._reloading.add(name)
        try:
            model = await asyncio.to_thread(self.load, name, path)
        except Exception as err:  # whatever the loader raises, the old model keeps serving
            log.warning("reload of %s from %s failed: %s", name, path, err)
            raise ScoringError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"cannot load {path!r} as {name!r}: {err}") from None
        finally:
            self._reloading.discard(name)  # before the reply: its caller may retry at once
        replaced = self.registry.add(model)
        log.info("reloaded reward model %s from %s (version %s)", model.name, model.path, model.version)
        if isinstance(replaced, ModelScorer):
            asyncio.create_task(replaced.retire())  # noqa: RUF006 - runs until its last call ends
        return scorers[name].info(is_default=name == self.registry.default)
