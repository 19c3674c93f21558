"""What the RewardService scores with, behind one interface: `await scorer.score(samples)`.

- `ModelScorer`: a reward model and its batcher (cross-request batching, a queue bounded in
  samples and tokens, admission before tokenizing, batches shared fairly between callers).
- `FunctionScorer`: a reward function, run in the worker pool (rlhf_mesh/worker_pool.py).
- `CompositeScorer`: a weighted sum of models and functions (TRL's `reward_weights`); the
  components of one call run concurrently, every component's score comes back beside the
  total, and a component that returns None for a sample is skipped (adds nothing).
Each raises InvalidSample (a sample, INVALID_ARGUMENT) or ScoringError (the call's status).
`caller` names who calls (a token's holder, or the peer address), for fair sharing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from rlhf_mesh import reward_functions as functions
from rlhf_mesh.services.reward.batcher import Batcher, NeverFits, QueueFull
from rlhf_mesh.services.reward.reward_model import InvalidSample, RewardModel
from rlhf_mesh.v1 import reward_pb2
from rlhf_mesh.worker_pool import (
    CallTooLarge,
    FunctionFailed,
    FunctionPool,
    FunctionTimedOut,
    PoolFull,
)


class ScoringError(Exception):
    """A status for the caller (the whole call, or one item of a stream); an overload
    (RESOURCE_EXHAUSTED) says when to retry."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class Scorer:
    """A named thing that scores samples; `lease` holds it for the length of a call."""

    name: str

    @contextlib.contextmanager
    def lease(self) -> Iterator[Scorer]:
        yield self

    async def score(self, samples: list[reward_pb2.ScoreSample], *, caller: str = "") -> list[reward_pb2.ScoreResult]:
        raise NotImplementedError

    def info(self, is_default: bool) -> reward_pb2.RewardModelInfo:
        raise NotImplementedError


@dataclass(eq=False)
class ModelScorer(Scorer):
    """A model and its batcher; counts the calls using them so a replaced one is closed only
    after its last call finished."""

    model: RewardModel
    batcher: Batcher
    calls: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.model.name

    @contextlib.contextmanager
    def lease(self) -> Iterator[ModelScorer]:
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

    def info(self, is_default: bool) -> reward_pb2.RewardModelInfo:
        info = self.model.info(is_default=is_default)
        info.kind = reward_pb2.SCORER_KIND_MODEL
        return info

    async def score(self, samples: list[reward_pb2.ScoreSample], *, caller: str = "") -> list[reward_pb2.ScoreResult]:
        model, tokenization = self.model, self.model.tokenization
        try:
            # Admitted on a bound from the sizes, before the work; tokenized off the event loop.
            with self.batcher.reserve(len(samples), sum(map(tokenization.bound, samples))) as room:
                encoded = await asyncio.to_thread(lambda: [tokenization.encode(i, s) for i, s in enumerate(samples)])
                futures = self.batcher.submit([e.ids for e in encoded], caller, room)
        except NeverFits as err:
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the call can never fit the queue of model {self.name}: {err}; split it") from None
        except QueueFull as err:
            raise ScoringError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"reward queue is full ({err}); retry in {err.retry_after_s:.2g} s",
                               retry_after_s=err.retry_after_s) from None
        try:
            scores = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        return [
            reward_pb2.ScoreResult(score=s, truncated=e.truncated, num_tokens=len(e.ids), model_version=model.version)
            for s, e in zip(scores, encoded, strict=True)
        ]


def function_inputs(samples: list[reward_pb2.ScoreSample]) -> tuple[list, list[str], dict[str, list]]:
    """TRL's (prompts, completions, kwargs) of the samples (rlhf_mesh/reward_functions.py)."""
    prompts, completions = [], []
    for i, sample in enumerate(samples):
        kind = sample.WhichOneof("input")
        if kind == "text":
            prompts.append(sample.text.prompt)
            completions.append(sample.text.response)
        elif kind == "query":
            text, prompt = sample.query.text, sample.query.prompt
            prompts.append(prompt)
            completions.append(text[len(prompt):] if text.startswith(prompt) else text)
        elif kind == "chat" and sample.chat.messages and sample.chat.messages[-1].role == "assistant":
            *before, last = sample.chat.messages
            prompts.append([{"role": m.role, "content": m.content} for m in before])
            completions.append(last.content)
        elif kind == "chat":
            raise InvalidSample(i, "a reward function scores the last message of a chat: it must be the assistant's")
        else:
            raise InvalidSample(i, "reward functions score text (text, query or chat), not token_ids"
                                if kind == "token_ids" else "has no input: set text, query, chat or token_ids")
    for i, sample in enumerate(samples):
        reserved = sorted(functions.RESERVED & sample.metadata.keys())
        if reserved:
            raise InvalidSample(i, f"metadata key {reserved[0]!r} is reserved: reward functions get "
                                f"{', '.join(sorted(functions.RESERVED))} as arguments of their own")
    keys = sorted({key for sample in samples for key in sample.metadata})
    kwargs = {key: [s.metadata.get(key) for s in samples] for key in keys}
    kwargs["reference"] = [s.reference if s.reference else None for s in samples]
    return prompts, completions, kwargs


@dataclass(eq=False)
class FunctionScorer(Scorer):
    """A reward function named by the operator: a built-in or package.module:callable."""

    name: str
    spec: str
    pool: FunctionPool

    def info(self, is_default: bool) -> reward_pb2.RewardModelInfo:
        return reward_pb2.RewardModelInfo(name=self.name, path=self.spec, kind=reward_pb2.SCORER_KIND_FUNCTION,
                                          backend="function", is_default=is_default)

    async def score(self, samples: list[reward_pb2.ScoreSample], *, caller: str = "") -> list[reward_pb2.ScoreResult]:
        prompts, completions, kwargs = function_inputs(samples)
        try:
            scores = await self.pool.call(self.spec, prompts, completions, kwargs, caller=caller)
        except CallTooLarge as err:
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT, f"reward function {self.name}: {err}") from None
        except PoolFull as err:
            raise ScoringError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"reward function {self.name}: {err}",
                               retry_after_s=err.retry_after_s) from None
        except FunctionTimedOut as err:
            raise ScoringError(grpc.StatusCode.DEADLINE_EXCEEDED, f"reward function {self.name}: {err}") from None
        except FunctionFailed as err:
            raise ScoringError(grpc.StatusCode.INTERNAL, f"reward function {self.name}: {err}") from None
        return [reward_pb2.ScoreResult(score=0.0, skipped=True) if s is None else reward_pb2.ScoreResult(score=s)
                for s in scores]


@dataclass(eq=False)
class CompositeScorer(Scorer):
    """Σ weight · score over the parts that apply to a sample; the parts are looked up at each
    call, so a reloaded model is used at once."""

    name: str
    parts: list[tuple[float, str]]
    lookup: Callable[[str], Scorer]

    def info(self, is_default: bool) -> reward_pb2.RewardModelInfo:
        return reward_pb2.RewardModelInfo(
            name=self.name, kind=reward_pb2.SCORER_KIND_COMPOSITE, backend="composite", is_default=is_default,
            parts=[reward_pb2.CompositePart(name=part, weight=weight) for weight, part in self.parts])

    async def score(self, samples: list[reward_pb2.ScoreSample], *, caller: str = "") -> list[reward_pb2.ScoreResult]:
        with contextlib.ExitStack() as leases:
            scorers = [leases.enter_context(self.lookup(part).lease()) for _, part in self.parts]
            per_part = await asyncio.gather(*(scorer.score(samples, caller=caller) for scorer in scorers))
        results = []
        for i in range(len(samples)):
            components = [
                reward_pb2.ComponentScore(name=part, weight=weight, score=scored[i].score, skipped=scored[i].skipped)
                for (weight, part), scored in zip(self.parts, per_part, strict=True)
            ]
            applied = [c for c in components if not c.skipped]
            results.append(reward_pb2.ScoreResult(
                score=sum(c.weight * c.score for c in applied), skipped=not applied, components=components,
                truncated=any(scored[i].truncated for scored in per_part),
                num_tokens=max(scored[i].num_tokens for scored in per_part)))
        return results
