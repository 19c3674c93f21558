"""Rollouts: stream samples from every generation replica and score each one as it arrives.

The step's prompts are split into one contiguous shard per replica. Finished samples go
to the RewardService while generation goes on, so scoring overlaps generation. Sampling
seeds depend on the global prompt index, so the rollouts do not depend on how prompts
were split across replicas, nor on which replica generates them after a failure.

Replicas restart: a Generate stream that fails is retried with backoff for the samples it
had not delivered (on the next replica in turn, which first gets `repair`: the learner
re-pushes its weights to a replica that came back at an older version); samples already
received are kept and never counted twice. Score calls are retried the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient, to_sample
from rlhf_mesh.services.learner.data import Prompt
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.v1 import generation_pb2, reward_pb2

log = logging.getLogger(__name__)

# Failures a restarting replica produces; anything else (a refused request) is not retried.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


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


@dataclass
class Collected:
    """A step's rollouts in (prompt, sample) order, with the time each phase took."""

    rollouts: list[Rollout]
    generate_s: float  # first request to last sample
    score_tail_s: float  # last sample to last score: the scoring that did not overlap generation


def _score_input(prompt: Prompt, text: str, reference: str | None
                 ) -> tuple[str, str] | list[dict[str, str]] | reward_pb2.ScoreSample:
    """What the reward service scores: (prompt, response) or the chat, with the reference when there is one."""
    plain = (prompt, text) if isinstance(prompt, str) else [*prompt, {"role": "assistant", "content": text}]
    if reference is None:
        return plain
    sample = to_sample(plain)
    sample.reference = reference
    return sample


def shards(count: int, parts: int) -> list[range]:
    """`count` indices in `parts` contiguous, nearly equal ranges (empty ones dropped)."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a failed replica call is tried again."""

    attempts: int = 5
    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def backoff(self, attempt: int) -> float:
        return min(self.first_backoff_s * 2**attempt, self.max_backoff_s)


def runs(indices: Sequence[int]) -> list[range]:
    """Sorted indices as contiguous ranges: [1, 2, 3, 7] -> [range(1, 4), range(7, 8)]."""
    out: list[range] = []
    for i in sorted(indices):
        if out and out[-1].stop == i:
            out[-1] = range(out[-1].start, i + 1)
        else:
            out.append(range(i, i + 1))
    return out


async def collect(
    generators: Sequence[AsyncGenerationClient], reward: AsyncRewardClient, prompts: Sequence[Prompt], *,
    n: int, max_tokens: int, temperature: float, seed: int, min_policy_version: int, reward_model: str,
    timeout_s: float, retry: Retry = Retry(), references: Sequence[str | None] | None = None,
    repair: Callable[[AsyncGenerationClient], Awaitable[None]] | None = None,
) -> Collected:
    """Generate `n` samples of every prompt across `generators` and score them all."""
    started = time.perf_counter()
    received: dict[tuple[int, int], Rollout] = {}
    unscored: list[Rollout] = []
    arrived = asyncio.Event()
    generating = True

    async def score() -> None:
        """One Score call at a time for every sample that finished meanwhile: few calls, and
        the scoring of early samples overlaps the generation of later ones."""
        while generating or unscored:
            await arrived.wait()
            arrived.clear()
            batch = unscored[:]
            del unscored[:]
            if not batch:
                continue
            inputs = [_score_input(prompts[r.prompt_index], r.text, references and references[r.prompt_index])
                      for r in batch]
            for attempt in itertools.count():
                try:
                    reply = await reward.score(inputs, model=reward_model, timeout_s=timeout_s)
                    break
                except grpc.aio.AioRpcError as err:
                    failure = f"reward service {reward.address}: {err.code().name}: {err.details()}"
                    if err.code() not in RETRYABLE or attempt + 1 >= retry.attempts:
                        raise LearnerError(failure) from None
                    log.warning("%s; retrying in %.0f s", failure, retry.backoff(attempt))
                    await asyncio.sleep(retry.backoff(attempt))
            for rollout, result in zip(batch, reply.results, strict=True):
                rollout.score = result.score
                rollout.components = {c.name: c.score for c in result.components if not c.skipped}

    def missing(indices: range) -> list[int]:
        return [i for i in indices if any((i, j) not in received for j in range(n))]

    async def stream(client: AsyncGenerationClient, indices: range) -> None:
        """Samples of prompts[indices]; sample j of prompt i is drawn with seed + i*n + j."""
        samples = client.generate(
            [prompts[i] for i in indices], n=n, max_tokens=max_tokens, temperature=temperature,
            seed=seed + indices.start * n, min_policy_version=min_policy_version, timeout_s=timeout_s,
        )
        async for sample in samples:
            key = (indices.start + sample.prompt_index, sample.sample_index)
            if key in received:  # delivered before a failure; the retry drew the same sample
                continue
            rollout = Rollout(
                prompt_index=key[0], sample_index=key[1],
                prompt_ids=list(sample.prompt_token_ids), response_ids=list(sample.completion_token_ids),
                sampler_logprobs=list(sample.completion_logprobs), text=sample.text,
                finished=sample.finish_reason == generation_pb2.FINISH_REASON_STOP,
                policy_version_start=sample.policy_version_start, policy_version_end=sample.policy_version_end,
            )
            received[key] = rollout
            unscored.append(rollout)
            arrived.set()

    async def generate(first: int, indices: range) -> None:
        """The shard `indices`, from replica `first` and, after failures, the next ones in turn."""
        for attempt in itertools.count():
            client = generators[(first + attempt) % len(generators)]
            try:
                if attempt and repair is not None:
                    await repair(client)
                for part in runs(missing(indices)):
                    await stream(client, part)
                return
            except grpc.RpcError as err:  # the repair's push is a blocking call
                failure = f"generation replica {client.address}: {err.code().name}: {err.details()}"
                if err.code() not in RETRYABLE or attempt + 1 >= retry.attempts:
                    raise LearnerError(failure) from None
                log.warning("%s; %d prompts of the shard left, retrying in %.0f s", failure,
                            len(missing(indices)), retry.backoff(attempt))
                await asyncio.sleep(retry.backoff(attempt))

    scorer = asyncio.create_task(score())
    try:
        await asyncio.gather(*(
            generate(k, indices) for k, indices in enumerate(shards(len(prompts), len(generators)))
        ))
        generated = time.perf_counter()
        generating = False
        arrived.set()
        await scorer
    finally:
        scorer.cancel()
    done = time.perf_counter()
    if len(received) != len(prompts) * n:
        raise LearnerError(f"expected {len(prompts) * n} samples, got {len(received)}")
    rollouts = sorted(received.values(), key=lambda r: (r.prompt_index, r.sample_index))
    return Collected(rollouts, generate_s=generated - started, score_tail_s=done - generated)
