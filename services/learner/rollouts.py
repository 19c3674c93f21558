"""Rollouts: stream samples from every generation replica and score each one as it arrives.

The step's prompts are split into one contiguous shard per replica. Finished samples go
to the RewardService while generation goes on, so scoring overlaps generation. Sampling
seeds depend on the global prompt index, so the rollouts do not depend on how prompts
were split across replicas.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.services.learner.data import Prompt
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.v1 import generation_pb2


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


@dataclass
class Collected:
    """A step's rollouts in (prompt, sample) order, with the time each phase took."""

    rollouts: list[Rollout]
    generate_s: float  # first request to last sample
    score_tail_s: float  # last sample to last score: the scoring that did not overlap generation


def _score_input(prompt: Prompt, text: str) -> tuple[str, str] | list[dict[str, str]]:
    if isinstance(prompt, str):
        return (prompt, text)
    return [*prompt, {"role": "assistant", "content": text}]


def shards(count: int, parts: int) -> list[range]:
    """`count` indices in `parts` contiguous, nearly equal ranges (empty ones dropped)."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


async def _named(stream: AsyncIterator[generation_pb2.Sample], address: str) -> AsyncIterator[generation_pb2.Sample]:
    try:
        async for sample in stream:
            yield sample
    except grpc.aio.AioRpcError as err:
        raise LearnerError(f"generation replica {address}: {err.code().name}: {err.details()}") from None


async def collect(
    generators: Sequence[AsyncGenerationClient], reward: AsyncRewardClient, prompts: Sequence[Prompt], *,
    n: int, max_tokens: int, temperature: float, seed: int, min_policy_version: int, reward_model: str,
    timeout_s: float,
) -> Collected:
    """Generate `n` samples of every prompt across `generators` and score them all."""
    started = time.perf_counter()
    rollouts: list[Rollout] = []
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
            inputs = [_score_input(prompts[r.prompt_index], r.text) for r in batch]
            try:
                reply = await reward.score(inputs, model=reward_model, timeout_s=timeout_s)
            except grpc.aio.AioRpcError as err:
                raise LearnerError(f"reward service {reward.address}: {err.code().name}: {err.details()}") from None
            for rollout, result in zip(batch, reply.results, strict=True):
                rollout.score = result.score

    async def generate(client: AsyncGenerationClient, indices: range) -> None:
        stream = client.generate(
            [prompts[i] for i in indices], n=n, max_tokens=max_tokens, temperature=temperature,
            seed=seed + indices.start * n, min_policy_version=min_policy_version, timeout_s=timeout_s,
        )
        async for sample in _named(stream, client.address):
            rollout = Rollout(
                prompt_index=indices.start + sample.prompt_index, sample_index=sample.sample_index,
                prompt_ids=list(sample.prompt_token_ids), response_ids=list(sample.completion_token_ids),
                sampler_logprobs=list(sample.completion_logprobs), text=sample.text,
                finished=sample.finish_reason == generation_pb2.FINISH_REASON_STOP,
                policy_version_start=sample.policy_version_start, policy_version_end=sample.policy_version_end,
            )
            rollouts.append(rollout)
            unscored.append(rollout)
            arrived.set()

    scorer = asyncio.create_task(score())
    try:
        await asyncio.gather(*(
            generate(client, indices)
            for client, indices in zip(generators, shards(len(prompts), len(generators)), strict=False)
        ))
        generated = time.perf_counter()
        generating = False
        arrived.set()
        await scorer
    finally:
        scorer.cancel()
    done = time.perf_counter()
    if len(rollouts) != len(prompts) * n:
        raise LearnerError(f"expected {len(prompts) * n} samples, got {len(rollouts)}")
    rollouts.sort(key=lambda r: (r.prompt_index, r.sample_index))
    return Collected(rollouts, generate_s=generated - started, score_tail_s=done - generated)
