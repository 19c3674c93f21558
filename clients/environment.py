"""Clients of the EnvironmentService: `EnvironmentClient` (blocking) and `AsyncEnvironmentClient`.

`run_episodes` returns an iterator of finished `Episode`s in the order they end. A task is a
dict (sent as JSON) or a JSON string. Every call has a deadline (`timeout_s`, default 600 s):
an episode is many generation turns. Leaving the iteration early cancels the call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from rlhf_mesh.clients.channel import AsyncClient, Client
from rlhf_mesh.v1 import environment_pb2, environment_pb2_grpc, generation_pb2

SERVICE = environment_pb2.DESCRIPTOR.services_by_name["EnvironmentService"].full_name


def episodes_request(
    environment: str, tasks: Sequence[Mapping[str, Any] | str], *, n: int | None = None,
    max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
    top_k: int | None = None, seed: int | None = None, stop_token_ids: Sequence[int] = (),
    max_turns: int | None = None, max_episode_tokens: int | None = None, min_policy_version: int = 0,
    reward_model: str = "",
) -> environment_pb2.RunEpisodesRequest:
    """A RunEpisodesRequest; parameters left None take the server's defaults. `max_tokens` is per turn."""
    optional = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    limits = dict(n=n, max_turns=max_turns, max_episode_tokens=max_episode_tokens)
    return environment_pb2.RunEpisodesRequest(
        environment=environment, tasks_json=[t if isinstance(t, str) else json.dumps(t) for t in tasks],
        sampling=generation_pb2.SamplingParams(stop_token_ids=list(stop_token_ids),
                                               **{k: v for k, v in optional.items() if v is not None}),
        min_policy_version=min_policy_version, reward_model=reward_model,
        **{k: v for k, v in limits.items() if v is not None},
    )


def collect_request(max_episodes: int, wait_s: float, min_policy_version: int, reward_model: str
                    ) -> environment_pb2.CollectSessionsRequest:
    return environment_pb2.CollectSessionsRequest(max_episodes=max_episodes, wait_ms=round(wait_s * 1000),
                                                  min_policy_version=min_policy_version, reward_model=reward_model)


class EnvironmentClient(Client):
    """Blocking client; use as a context manager or call close()."""

    service = SERVICE
    stub_class = environment_pb2_grpc.EnvironmentServiceStub

    def __init__(self, address: str, *, timeout_s: float = 600.0, **options) -> None:
        super().__init__(address, timeout_s=timeout_s, **options)

    def run_episodes(self, environment: str, tasks: Sequence[Mapping[str, Any] | str], *,
                     timeout_s: float | None = None, **options) -> Iterator[environment_pb2.Episode]:
        """Finished episodes as they end; keyword arguments are those of `episodes_request`."""
        call = self.stub.RunEpisodes(episodes_request(environment, tasks, **options), timeout=self._timeout(timeout_s))
        try:
            for reply in call:
                yield reply.episode
        finally:
            call.cancel()

    def collect_sessions(self, max_episodes: int, *, wait_s: float = 0.0, min_policy_version: int = 0,
                         reward_model: str = "", timeout_s: float | None = None
                         ) -> list[environment_pb2.CollectSessionsResponse]:
        """Up to `max_episodes` episodes of closed sessions (waiting up to `wait_s` for them)."""
        return list(self.stub.CollectSessions(
            collect_request(max_episodes, wait_s, min_policy_version, reward_model),
            timeout=self._timeout(timeout_s) + wait_s))

    def list_environments(self, timeout_s: float | None = None) -> environment_pb2.ListEnvironmentsResponse:
        return self.stub.ListEnvironments(environment_pb2.ListEnvironmentsRequest(), timeout=self._timeout(timeout_s))


class AsyncEnvironmentClient(AsyncClient):
    """asyncio client; use with `async with` or await close()."""

    service = SERVICE
    stub_class = environment_pb2_grpc.EnvironmentServiceStub

    def __init__(self, address: str, *, timeout_s: float = 600.0, **options) -> None:
        super().__init__(address, timeout_s=timeout_s, **options)

    async def run_episodes(self, environment: str, tasks: Sequence[Mapping[str, Any] | str], *,
                           timeout_s: float | None = None, **options) -> AsyncIterator[environment_pb2.Episode]:
        call = self.stub.RunEpisodes(episodes_request(environment, tasks, **options), timeout=self._timeout(timeout_s))
        try:
            async for reply in call:
                yield reply.episode
        finally:
            call.cancel()

    async def collect_sessions(self, max_episodes: int, *, wait_s: float = 0.0, min_policy_version: int = 0,
                               reward_model: str = "", timeout_s: float | None = None
                               ) -> AsyncIterator[environment_pb2.CollectSessionsResponse]:
        call = self.stub.CollectSessions(collect_request(max_episodes, wait_s, min_policy_version, reward_model),
                                         timeout=self._timeout(timeout_s) + wait_s)
        try:
            async for reply in call:
                yield reply
        finally:
            call.cancel()

    async def list_environments(self, timeout_s: float | None = None,
                                wait_for_ready: bool = False) -> environment_pb2.ListEnvironmentsResponse:
        return await self.stub.ListEnvironments(environment_pb2.ListEnvironmentsRequest(),
                                                timeout=self._timeout(timeout_s), wait_for_ready=wait_for_ready)
