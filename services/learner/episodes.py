"""Rollouts from an EnvironmentService: `n` multi-turn episodes of every task, or the episodes of
sessions that agent programs and users ran on the replicas' OpenAI-compatible ports, as the
learner trains them.

An episode becomes one Rollout: its first prompt, then every later token as the "response" with
the loss mask (1 on the tokens the policy sampled, 0 on observations and tool output), the
sampler's log-probs, and the episode's final reward as the score. A call that fails while the
service restarts is retried (retry.py) for the tasks whose episodes had not all arrived.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rlhf_mesh.clients.environment import AsyncEnvironmentClient
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.retry import Retry
from rlhf_mesh.services.learner.rollouts import Collected, Rollout
from rlhf_mesh.v1 import environment_pb2


def to_rollout(episode: environment_pb2.Episode, task_index: int, floor_version: int) -> Rollout:
    """The episode as the trainer takes it. One the environment broke keeps its place in its group
    (reward 0 unless a reward came) but trains nothing: its mask is all 0, and an episode that
    never sampled gets one masked token, stamped with `floor_version`."""
    start = episode.prompt_length
    mask = list(episode.loss_mask[start:])
    if episode.end == environment_pb2.EPISODE_END_ENVIRONMENT_ERROR:
        mask = [0] * len(mask)
    versions = [v for v, m in zip(episode.policy_versions, episode.loss_mask, strict=True) if m] or [floor_version]
    response, logprobs = list(episode.token_ids[start:]), list(episode.logprobs[start:])
    if not response:
        response, logprobs, mask = [0], [0.0], [0]
    return Rollout(
        prompt_index=task_index, sample_index=episode.episode_index,
        prompt_ids=list(episode.token_ids[:start]) or [0], response_ids=response, sampler_logprobs=logprobs,
        loss_mask=mask, text=episode.turns[-1].text if episode.turns else "",
        finished=episode.end == environment_pb2.EPISODE_END_DONE,
        policy_version_start=min(versions), policy_version_end=max(versions), score=episode.reward,
    )


def episode_scalars(episodes: Sequence[environment_pb2.Episode], prefix: str) -> dict[str, float]:
    """episodes/*: turns, tool calls, length, truncation and environment errors and time, per episode."""
    count = len(episodes)
    truncated = (environment_pb2.EPISODE_END_MAX_TURNS, environment_pb2.EPISODE_END_MAX_TOKENS)
    return {
        f"{prefix}/turns_mean": sum(len(e.turns) for e in episodes) / count,
        f"{prefix}/tool_calls_mean": sum(t.tool_calls for e in episodes for t in e.turns) / count,
        f"{prefix}/length_mean": sum(len(e.token_ids) for e in episodes) / count,
        f"{prefix}/sampled_tokens_mean": sum(sum(e.loss_mask) for e in episodes) / count,
        f"{prefix}/truncated_rate": sum(e.end in truncated for e in episodes) / count,
        f"{prefix}/truncated_turn_rate": sum(t.truncated for e in episodes for t in e.turns) / max(
            1, sum(len(e.turns) for e in episodes)),
        f"{prefix}/environment_error_rate": sum(e.end == environment_pb2.EPISODE_END_ENVIRONMENT_ERROR
                                                for e in episodes) / count,
        f"{prefix}/environment_s_mean": sum(e.environment_s for e in episodes) / count,
    }


class EpisodeCollector:
    """One step's episodes: `n` of every task (a JSON object each) from the EnvironmentService."""

    def __init__(self, client: AsyncEnvironmentClient, environment: str, tasks: Sequence[str], *, n: int,
                 max_tokens: int, temperature: float, seed: int, min_policy_version: int, max_turns: int | None,
                 max_episode_tokens: int | None, reward_model: str, timeout_s: float, retry: Retry | None = None,
                 prefix: str = "episodes") -> None:
        self.client, self.environment, self.tasks, self.n = client, environment, tasks, n
        self.options = dict(n=n, max_tokens=max_tokens, temperature=temperature, min_policy_version=min_policy_version,
                            max_turns=max_turns, max_episode_tokens=max_episode_tokens, reward_model=reward_model)
        self.seed, self.timeout_s, self.retry, self.prefix = seed, timeout_s, retry or Retry(), prefix
        self.received: dict[tuple[int, int], environment_pb2.Episode] = {}

    async def run(self) -> Collected:
        started = time.perf_counter()
        await self.retry.call(self._attempt, lambda _: f"environment service {self.client.address} "
                                                       f"({len(self._missing())} tasks left)")
        if len(self.received) != len(self.tasks) * self.n:
            raise LearnerError(f"expected {len(self.tasks) * self.n} episodes, got {len(self.received)}")
        failed = [e for e in self.received.values() if e.end == environment_pb2.EPISODE_END_ENVIRONMENT_ERROR]
        if len(failed) == len(self.received):
            raise LearnerError(f"every episode failed in the environment, e.g.: {failed[0].error}")
        keys = sorted(self.received)
        floor = self.options["min_policy_version"]
        rollouts = [to_rollout(self.received[key], key[0], floor) for key in keys]
        elapsed = time.perf_counter() - started
        return Collected(rollouts, generate_s=elapsed, score_tail_s=0.0,
                         scalars=episode_scalars([self.received[key] for key in keys], self.prefix))

    def _missing(self) -> list[int]:
        return [i for i in range(len(self.tasks)) if any((i, j) not in self.received for j in range(self.n))]

    async def _attempt(self, _: int) -> None:
        """The tasks still missing an episode, in one call (a retry draws them again with other seeds)."""
        missing = self._missing()
        if not missing:
            return
        seed = self.seed + missing[0] * self.n
        async for episode in self.client.run_episodes(self.environment, [self.tasks[i] for i in missing],
                                                      seed=seed, timeout_s=self.timeout_s, **self.options):
            key = (missing[episode.task_index], episode.episode_index)
            if key not in self.received:
                self.received[key] = episode


class SessionCollector:
    """One step's rollouts from closed sessions (`rollout_source: sessions`): each episode its own
    group of one, the stale ones dropped by the EnvironmentService, waiting up to `wait_s` for
    `count` of them to close."""

    def __init__(self, client: AsyncEnvironmentClient, count: int, *, wait_s: float, min_policy_version: int,
                 reward_model: str, timeout_s: float) -> None:
        self.client, self.count, self.wait_s, self.floor = client, count, wait_s, min_policy_version
        self.reward_model, self.timeout_s = reward_model, timeout_s

    async def run(self) -> Collected:
        started = time.perf_counter()
        episodes: list[environment_pb2.Episode] = []
        while len(episodes) < self.count and (left := self.wait_s - (time.perf_counter() - started)) > 0:
            async for reply in self.client.collect_sessions(
                    self.count - len(episodes), wait_s=min(left, 60.0), min_policy_version=self.floor,
                    reward_model=self.reward_model, timeout_s=self.timeout_s):
                episodes.append(reply.episode)
        if len(episodes) < self.count:
            raise LearnerError(f"{len(episodes)} of {self.count} session episodes were closed within "
                               f"sessions_wait_s={self.wait_s:g}")
        rollouts = [to_rollout(episode, index, self.floor) for index, episode in enumerate(episodes)]
        return Collected(rollouts, generate_s=time.perf_counter() - started, score_tail_s=0.0,
                         scalars=episode_scalars(episodes, "sessions"))
