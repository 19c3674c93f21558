"""Rollouts: stream samples from every generation replica and score each one as it arrives.

The step's prompts are split into one contiguous shard per replica. Finished samples go
to the RewardService while generation goes on, so scoring overlaps generation. Sampling
seeds depend on the global prompt index, so the rollouts do not depend on how prompts
were split across replicas, nor on which replica generates them after a failure.

Replicas restart: a Generate stream that fails is retried with backoff for the samples it
had not delivered (on the next replica in turn, which first gets `repair`: the learner
re-pushes its weights to a replica that came back at an older version); samples already
received are kept and never counted twice. Score calls are retried the same way (retry.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient, to_sample
from rlhf_mesh.services.learner.data import Prompt
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.retry import Retry
from rlhf_mesh.v1 import generation_pb2, reward_pb2


@dataclass
class Rollout:
    """One sampled response with its score."""

    prompt_index: int  # in the step's batch
    sample_index: int  # among the samples of its prompt
    prompt_ids: list[int]
    response_ids: list[int]
    sampler_logprobs: list[float]  # the generator's log-probs of response_ids
    text: str
    finished: bool  # ended with EOS (or a stop token), not cut at the length limit
    policy_version_start: int
    policy_version_end: int
    score: float = 0.0
    components: dict[str, float] = field(default_factory=dict)  # a composite's parts that applied to it
    loss_mask: list[int] | None = None  # an episode's: 1 on the tokens the policy sampled (None: all of them)
    trains: bool = True  # False: in the batch (its group's baseline, the statistics) but out of the loss


@dataclass
class Collected:
    """A step's rollouts in (prompt, sample) order, with the time each phase took."""

    rollouts: list[Rollout]
    generate_s: float  # first request to last sample
    score_tail_s: float  # last sample to last score: the scoring that did not overlap generation
    scalars: dict[str, float] = field(default_factory=dict)  # what the collector reports (episodes/*)


def _score_input(prompt: Prompt, text: str, reference: str | None
                 ) -> tuple[str, str] | list[dict[str, str]] | reward_pb2.ScoreSample:
    """What the reward service scores: (prompt, response) or the chat, with the reference when there is one."""
    plain = (prompt, text) if isinstance(prompt, str) else [*prompt, {"role": "assistant", "content": text}]
    if reference is None:
        return plain
    sample = to_sample(plain)
    sample.reference = reference
    return sample


def component_means(rollouts: list[Rollout]) -> dict[str, float]:
    """`rewards/<component>_mean` of a composite reward, over the rollouts it applied to."""
    scores: dict[str, list[float]] = {}
    for rollout in rollouts:
        for name, score in rollout.components.items():
            scores.setdefault(name, []).append(score)
    return {f"rewards/{name}_mean": sum(values) / len(values) for name, values in sorted(scores.items())}


def shards(count: int, parts: int) -> list[range]:
    """`count` indices in `parts` contiguous, nearly equal ranges (empty ones dropped)."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def runs(indices: Sequence[int]) -> list[range]:
    """Sorted indices as contiguous ranges: [1, 2, 3, 7] -> [range(1, 4), range(7, 8)]."""
    out: list[range] = []
    for i in sorted(indices):
        if out and out[-1].stop == i:
            out[-1] = range(out[-1].start, i + 1)
        else:
            out.append(range(i, i + 1))
    return out


class RolloutCollector:
    """One step's rollouts: `n` samples of every prompt across `generators`, each scored as it arrives."""

    def __init__(
        self, generators: Sequence[AsyncGenerationClient], reward: AsyncRewardClient, prompts: Sequence[Prompt], *,
        n: int, max_tokens: int, temperature: float, seed: int, min_policy_version: int, reward_model: str,
        timeout_s: float, retry: Retry | None = None, references: Sequence[str | None] | None = None,
        repair: Callable[[AsyncGenerationClient], Awaitable[None]] | None = None,
    ) -> None:
        self.generators, self.reward, self.prompts, self.references = generators, reward, prompts, references
        self.n, self.seed, self.timeout_s, self.retry, self.repair = n, seed, timeout_s, retry or Retry(), repair
        self.sampling = {"n": n, "max_tokens": max_tokens, "temperature": temperature,
                         "min_policy_version": min_policy_version}
        self.reward_model = reward_model
        self.received: dict[tuple[int, int], Rollout] = {}
        self.unscored: list[Rollout] = []
        self.arrived = asyncio.Event()
        self.generating = True

    async def run(self) -> Collected:
        started = time.perf_counter()
        scorer = asyncio.create_task(self._score())
        try:
            await asyncio.gather(*(self._generate(k, indices)
                                   for k, indices in enumerate(shards(len(self.prompts), len(self.generators)))))
            generated = time.perf_counter()
            self.generating = False
            self.arrived.set()
            await scorer
        finally:
            scorer.cancel()
        done = time.perf_counter()
        if len(self.received) != len(self.prompts) * self.n:
            raise LearnerError(f"expected {len(self.prompts) * self.n} samples, got {len(self.received)}")
        rollouts = sorted(self.received.values(), key=lambda r: (r.prompt_index, r.sample_index))
        return Collected(rollouts, generate_s=generated - started, score_tail_s=done - generated)

    async def _score(self) -> None:
        """One Score call at a time for every sample that finished meanwhile: few calls, and
        the scoring of early samples overlaps the generation of later ones."""
        while self.generating or self.unscored:
            await self.arrived.wait()
            self.arrived.clear()
            batch = self.unscored[:]
            del self.unscored[:]
            if not batch:
                continue
            inputs = [_score_input(self.prompts[r.prompt_index], r.text,
                                   self.references and self.references[r.prompt_index]) for r in batch]
            reply = await self.retry.call(
                lambda _, inputs=inputs: self.reward.score(inputs, model=self.reward_model, timeout_s=self.timeout_s),
                lambda _: f"reward service {self.reward.address}")
            for rollout, result in zip(batch, reply.results, strict=True):
                rollout.score = result.score
                rollout.components = {c.name: c.score for c in result.components if not c.skipped}

    def _missing(self, indices: range) -> list[int]:
        return [i for i in indices if any((i, j) not in self.received for j in range(self.n))]

    async def _generate(self, first: int, indices: range) -> None:
        """The shard `indices`, from replica `first` and, after failures, the next ones in turn."""
        def client(attempt: int) -> AsyncGenerationClient:
            return self.generators[(first + attempt) % len(self.generators)]

        async def attempt(k: int) -> None:
            if k and self.repair is not None:
                await self.repair(client(k))
            for part in runs(self._missing(indices)):
                await self._stream(client(k), part)

        await self.retry.call(attempt, lambda k: f"generation replica {client(k).address} "
                                                 f"({len(self._missing(indices))} prompts of the shard left)")

    async def _stream(self, client: AsyncGenerationClient, indices: range) -> None:
        """Samples of prompts[indices]; sample j of prompt i is drawn with seed + i*n + j."""
        samples = client.generate([self.prompts[i] for i in indices], seed=self.seed + indices.start * self.n,
                                  timeout_s=self.timeout_s, **self.sampling)
        async for sample in samples:
            key = (indices.start + sample.prompt_index, sample.sample_index)
            if key in self.received:  # delivered before a failure; the retry drew the same sample
                continue
            rollout = Rollout(
                prompt_index=key[0], sample_index=key[1],
                prompt_ids=list(sample.prompt_token_ids), response_ids=list(sample.completion_token_ids),
                sampler_logprobs=list(sample.completion_logprobs), text=sample.text,
                finished=sample.finish_reason == generation_pb2.FINISH_REASON_STOP,
                policy_version_start=sample.policy_version_start, policy_version_end=sample.policy_version_end,
            )
            self.received[key] = rollout
            self.unscored.append(rollout)
            self.arrived.set()
