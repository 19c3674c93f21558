"""Episodes, token-exact: each turn's prompt is the episode's ids so far, never a re-render.

The model's sampled ids are kept as sampled; an observation's ids are rendered on their own
(rlhf_mesh/chat_tokens.py). Every turn of an episode goes to one replica, whose prefix cache
then holds the episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_mesh.chat_tokens import ChatTokens, TemplateError
from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.clients.session import AsyncSessionClient
from rlhf_mesh.services.environment import environments
from rlhf_mesh.v1 import common_pb2, environment_pb2, generation_pb2
from rlhf_mesh.worker_pool import FunctionFailed, FunctionPool, PoolFull


@dataclass
class Limits:
    max_turns: int
    max_episode_tokens: int  # prompt included, at most the model length


@dataclass
class AgentPorts:
    """Where agent programs reach the replicas: each one's OpenAI-compatible base URL and session
    client, and the API key (the service's own token) and CA file they call with."""

    urls: list[str]
    sessions: list[AsyncSessionClient]
    api_key: str
    ca_file: str | None


class EpisodeRunner:
    """Runs one request's episodes: environment calls in the pool, turns on the replicas (or an
    agent program's whole run against a replica's OpenAI-compatible port, in a session)."""

    def __init__(self, pool: FunctionPool, spec: str, chat: ChatTokens, replicas: Sequence[AsyncGenerationClient],
                 reward: AsyncRewardClient | None, *, caller: str, deadline: float, affinity: bool = True,
                 agents: AgentPorts | None = None) -> None:
        self.pool, self.spec, self.chat, self.replicas, self.reward = pool, spec, chat, replicas, reward
        self.caller, self.deadline, self.affinity, self.agents = caller, deadline, affinity, agents

    def _left(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    async def episode(self, task_index: int, index: int, number: int, task: dict, sampling: dict[str, Any],
                      limits: Limits, min_policy_version: int, reward_model: str) -> environment_pb2.Episode:
        """Episode `index` of task `task_index`; `number` (its place in the request) picks its replica and seeds."""
        if self.agents is not None:
            return await self.agent_episode(task_index, index, number, task, sampling, limits, reward_model,
                                            min_policy_version)
        episode = environment_pb2.Episode(task_index=task_index, episode_index=index)
        environment_s = 0.0
        rewards: list[float] = []
        messages: list[dict[str, str]] = []

        async def environment(target: Any, *args: Any) -> Any:
            nonlocal environment_s
            started = time.perf_counter()
            try:
                return await self.pool.run(self.spec, target, *args, caller=self.caller)
            finally:
                environment_s += time.perf_counter() - started

        def append(ids: Sequence[int], sampled: generation_pb2.Sample | None = None) -> None:
            episode.token_ids.extend(ids)
            episode.loss_mask.extend([int(sampled is not None)] * len(ids))
            if sampled is None:
                episode.logprobs.extend([0.0] * len(ids))
                episode.policy_versions.extend([0] * len(ids))
            else:
                episode.logprobs.extend(sampled.completion_logprobs)
                # A turn an update landed in carries its start version on every token: never understated.
                episode.policy_versions.extend([sampled.policy_version_start] * len(ids))

        try:
            state, first = await environment(environments.reset_in_worker, task)
            messages.extend(first)
            append(self.chat.prompt(first))
            episode.prompt_length = len(episode.token_ids)
            episode.end = environment_pb2.EPISODE_END_MAX_TURNS
            for turn_number in range(limits.max_turns):
                room = limits.max_episode_tokens - len(episode.token_ids)
                if room < 1:
                    episode.end = environment_pb2.EPISODE_END_MAX_TOKENS
                    break
                seed = sampling.get("seed")
                turn_sampling = dict(sampling, n=1, max_tokens=min(sampling["max_tokens"], room),
                                     seed=None if seed is None else seed + number * limits.max_turns + turn_number)
                replica = self.replicas[(number + (0 if self.affinity else turn_number)) % len(self.replicas)]
                sample = await self._generate(replica, list(episode.token_ids), turn_sampling, min_policy_version)
                turn = episode.turns.add(start=len(episode.token_ids), text=sample.text)
                append(sample.completion_token_ids, sample)
                turn.sampled_end = turn.end = len(episode.token_ids)
                messages.append({"role": "assistant", "content": sample.text})
                if sample.finish_reason != generation_pb2.FINISH_REASON_STOP:  # cut at max_tokens
                    if len(episode.token_ids) + 1 >= limits.max_episode_tokens:
                        episode.end = environment_pb2.EPISODE_END_MAX_TOKENS
                        break
                    turn.truncated = True
                    append([self.chat.end_of_message])  # ends the message, as the next turn's prompt has it
                    turn.end = len(episode.token_ids)
                state, step = await environment(environments.step_in_worker, state, sample.text)
                turn.tool_calls = step["tool_calls"]
                if step["reward"] is not None:
                    turn.reward = step["reward"]
                    rewards.append(step["reward"])
                if step["done"]:
                    episode.end = environment_pb2.EPISODE_END_DONE
                    break
                if turn_number + 1 == limits.max_turns:  # no turn follows: the observation would be read by none
                    break
                observation = self.chat.observation(step["observation"])
                if len(episode.token_ids) + len(observation) >= limits.max_episode_tokens:
                    episode.end = environment_pb2.EPISODE_END_MAX_TOKENS
                    break
                append(observation)
                messages.extend(step["observation"])
                turn.end = len(episode.token_ids)
        except (FunctionFailed, PoolFull) as err:
            episode.end = environment_pb2.EPISODE_END_ENVIRONMENT_ERROR
            episode.error = str(err)
        except TemplateError as err:
            episode.end = environment_pb2.EPISODE_END_ENVIRONMENT_ERROR
            episode.error = f"chat template: {err}"
        episode.environment_s = environment_s
        episode.messages.extend(common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        if rewards:
            episode.environment_reward = sum(rewards)
        await self.rewarded(episode, reward_model)
        return episode

    async def rewarded(self, episode: environment_pb2.Episode, reward_model: str) -> None:
        """The episode's reward: its environment reward plus, with `reward_model`, the reward
        service's score of its conversation."""
        if reward_model and self.reward is not None and episode.end != environment_pb2.EPISODE_END_ENVIRONMENT_ERROR:
            messages = [{"role": m.role, "content": m.content} for m in episode.messages]
            reply = await self.reward.score([messages], model=reward_model, timeout_s=self._left())
            episode.reward_model_score = reply.results[0].score
        episode.reward = (episode.environment_reward if episode.HasField("environment_reward") else 0.0) + (
            episode.reward_model_score if episode.HasField("reward_model_score") else 0.0)

    async def agent_episode(self, task_index: int, index: int, number: int, task: dict, sampling: dict[str, Any],
                            limits: Limits, reward_model: str, min_policy_version: int) -> environment_pb2.Episode:
        """One run of an agent program in a session of its own, sampled as the request says; the
        session's main branch (the one with the most calls) is the episode."""
        agents = self.agents
        replica = number % len(agents.urls)
        sessions = agents.sessions[replica]
        session_id = f"episode-{uuid.uuid4().hex}"
        seed = sampling.get("seed")
        imposed = {key: sampling[key] for key in ("temperature", "top_p", "top_k", "max_tokens") if key in sampling}
        await sessions.open(session_id, timeout_s=self._left(), **imposed,
                            seed=None if seed is None else seed + number * limits.max_turns)
        started = time.perf_counter()
        error, reward = "", None
        try:
            try:
                reward = await self.pool.run(self.spec, environments.agent_in_worker, task,
                                             f"{agents.urls[replica]}/sessions/{session_id}/v1",
                                             agents.api_key, session_id, agents.ca_file, caller=self.caller)
            except (FunctionFailed, PoolFull) as err:
                error = str(err)
            environment_s = time.perf_counter() - started
            taken = await sessions.get(session_id, take=True, timeout_s=self._left())
        except BaseException:  # cancelled or failed: leave no session behind to fill the replica's bound
            with contextlib.suppress(Exception):
                await asyncio.shield(sessions.get(session_id, take=True, timeout_s=10))
            raise
        branches = list(taken.episodes)
        if branches:
            episode = max(reversed(branches), key=lambda e: len(e.turns))
        else:
            episode = environment_pb2.Episode(token_ids=[0], loss_mask=[0], logprobs=[0.0], policy_versions=[0],
                                              prompt_length=1)
            error = error or "the agent program made no call to the model"
        episode.task_index, episode.episode_index, episode.environment_s = task_index, index, environment_s
        episode.ClearField("environment_reward")
        sampled = [v for v, mask in zip(episode.policy_versions, episode.loss_mask, strict=True) if mask]
        if sampled and min(sampled) < min_policy_version:  # the port does not wait for a version, as Generate does
            error = error or (f"the agent's calls were sampled by policy version {min(sampled)}, older than "
                              f"min_policy_version {min_policy_version}")
        if error:
            episode.end, episode.error = environment_pb2.EPISODE_END_ENVIRONMENT_ERROR, error
        else:
            episode.end = environment_pb2.EPISODE_END_DONE
            if reward is not None:
                episode.environment_reward = reward
        await self.rewarded(episode, reward_model)
        return episode

    async def _generate(self, replica: AsyncGenerationClient, ids: list[int], sampling: dict[str, Any],
                        min_policy_version: int) -> generation_pb2.Sample:
        samples = [s async for s in replica.generate([ids], min_policy_version=min_policy_version,
                                                            timeout_s=self._left(), **sampling)]
        return samples[0]


def parse_task(text: str, index: int, max_bytes: int) -> dict:
    """A task's JSON object, or ValueError naming the field."""
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ValueError(f"tasks_json[{index}]: larger than max_task_bytes={max_bytes}")
    try:
        task = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"tasks_json[{index}]: not JSON ({err})") from None
    if not isinstance(task, dict):
        raise ValueError(f"tasks_json[{index}]: a JSON object is needed, not {type(task).__name__}")
    return task


async def as_finished(coroutines: list[Coroutine[Any, Any, Any]]) -> AsyncIterator[Any]:
    """Results as they finish; the rest are cancelled when the consumer stops."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        for finished in asyncio.as_completed(tasks):
            yield await finished
    finally:
        for task in tasks:
            task.cancel()
