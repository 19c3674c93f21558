"""The EnvironmentService servicer and its place on the shared server bootstrap."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from rlhf_mesh.chat_tokens import ChatTokens, TemplateError
from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.clients.session import AsyncSessionClient
from rlhf_mesh.hub import resolve_model
from rlhf_mesh.security import TokenAuth, caller_name
from rlhf_mesh.services.environment import environments
from rlhf_mesh.services.environment.episodes import AgentPorts, EpisodeRunner, Limits, as_finished, parse_task
from rlhf_mesh.services.environment.settings import EnvironmentSettings
from rlhf_mesh.v1 import environment_pb2, environment_pb2_grpc
from rlhf_mesh.worker_pool import FunctionFailed, FunctionPool

log = logging.getLogger(__name__)

EPISODES = Counter("rlhf_mesh_environment_episodes_total", "Episodes finished, by environment and end.",
                   ["environment", "end"])
TURNS = Histogram("rlhf_mesh_environment_episode_turns", "Model turns per episode.", ["environment"],
                  buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
TOOL_CALLS = Counter("rlhf_mesh_environment_tool_calls_total", "Tool calls run by environments.", ["environment"])
STALE = Counter("rlhf_mesh_environment_stale_session_episodes_total",
                "Episodes of taken sessions dropped for a token older than the caller's min_policy_version.")
ENVIRONMENT_SECONDS = Histogram("rlhf_mesh_environment_seconds", "Time an episode spent in environment calls.",
                                ["environment"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60))


class EnvironmentServicer(environment_pb2_grpc.EnvironmentServiceServicer):
    """The gRPC front door: validate, run the episodes, stream them as they end."""

    def __init__(self, service: EnvironmentService) -> None:
        self.service = service
        self.settings = service.settings
        self.auth = TokenAuth(self.settings.tokens_file) if self.settings.tokens_file else None
        self.slots = asyncio.Semaphore(self.settings.max_concurrent_episodes)

    async def ListEnvironments(self, request: environment_pb2.ListEnvironmentsRequest,
                               context: grpc.aio.ServicerContext) -> environment_pb2.ListEnvironmentsResponse:
        return environment_pb2.ListEnvironmentsResponse(
            environments=[environment_pb2.EnvironmentInfo(name=name, spec=served.spec,
                                                          tools=[_tool(t) for t in served.tools])
                          for name, served in self.service.environments.items()],
            tokenizer=self.service.tokenizer_name)

    async def RunEpisodes(self, request: environment_pb2.RunEpisodesRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[environment_pb2.RunEpisodesResponse]:
        try:
            served, tasks, n, sampling, limits = self._validate(request)
            await self._check_reward_model(request.reward_model)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except grpc.aio.AioRpcError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"reward_model: the reward service cannot say what it "
                                f"serves ({err.code().name}: {err.details()})")
        remaining = context.time_remaining()
        deadline = time.monotonic() + min(self.settings.rpc_timeout_s if remaining is None else remaining,
                                          self.settings.rpc_timeout_s)
        runner = EpisodeRunner(self.service.pool, served.spec, served.chat, self.service.replicas, self.service.reward,
                               caller=caller_name(context, self.auth), deadline=deadline,
                               affinity=self.settings.episode_affinity,
                               agents=self.service.agents if served.agent else None)
        name = request.environment

        async def one(task_index: int, index: int) -> environment_pb2.Episode:
            async with self.slots:
                return await runner.episode(task_index, index, task_index * n + index, tasks[task_index], sampling,
                                            limits, request.min_policy_version, request.reward_model)

        episodes = as_finished([one(t, j) for t in range(len(tasks)) for j in range(n)])
        try:
            async for episode in episodes:
                EPISODES.labels(name, environment_pb2.EpisodeEnd.Name(episode.end).removeprefix("EPISODE_END_")
                                .lower()).inc()
                TURNS.labels(name).observe(len(episode.turns))
                TOOL_CALLS.labels(name).inc(sum(t.tool_calls for t in episode.turns))
                ENVIRONMENT_SECONDS.labels(name).observe(episode.environment_s)
                yield environment_pb2.RunEpisodesResponse(episode=episode)
        except grpc.aio.AioRpcError as err:  # a replica or the reward service failed: the caller retries
            code = err.code()
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                code = grpc.StatusCode.UNAVAILABLE  # the other service's trouble, not the caller's
            await context.abort(code, f"a service the episodes call failed: {err.code().name}: {err.details()}")
        finally:
            await episodes.aclose()

    async def CollectSessions(self, request: environment_pb2.CollectSessionsRequest, context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[environment_pb2.CollectSessionsResponse]:
        try:
            if request.max_episodes < 1:
                raise ValueError("max_episodes: at least 1")
            if request.reward_model and self.service.reward is None:
                raise ValueError("reward_model: this service has no reward service (start it with --reward)")
            await self._check_reward_model(request.reward_model)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        remaining = context.time_remaining()
        limit = self.settings.rpc_timeout_s if remaining is None else min(remaining, self.settings.rpc_timeout_s)
        wait_s = max(0.0, min(request.wait_ms / 1000, limit - min(1.0, limit / 10)))
        runner = EpisodeRunner(self.service.pool, "", None, self.service.replicas, self.service.reward,
                               caller=caller_name(context, self.auth), deadline=time.monotonic() + limit)
        try:
            async for session_id, episode in self.service.collected(request.max_episodes, wait_s,
                                                                    request.min_policy_version):
                await runner.rewarded(episode, request.reward_model)
                yield environment_pb2.CollectSessionsResponse(episode=episode, session_id=session_id)
        except grpc.aio.AioRpcError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"a service the sessions come from failed: {err.code().name}: {err.details()}")

    async def _check_reward_model(self, name: str) -> None:
        """A reward_model the reward service serves (asked now: its models may be reloaded)."""
        if not name:
            return
        served = [m.name for m in await self.service.reward.list_models(timeout_s=30)]
        if name not in served:
            raise ValueError(f"reward_model: {name!r} is not served by the reward service (it serves "
                             f"{', '.join(served)})")

    def _validate(self, request: environment_pb2.RunEpisodesRequest) -> tuple:
        s = self.settings
        if request.environment not in self.service.environments:
            raise ValueError(f"environment: {request.environment!r} is not served; serving "
                             f"{', '.join(sorted(self.service.environments))}")
        served = self.service.environments[request.environment]
        if not 1 <= len(request.tasks_json) <= s.max_request_tasks:
            raise ValueError(f"tasks_json: {len(request.tasks_json)} tasks; 1 to "
                             f"max_request_tasks={s.max_request_tasks}")
        n = request.n if request.HasField("n") else 1
        if not 1 <= n <= s.max_samples_per_task:
            raise ValueError(f"n: {n}; 1 to max_samples_per_task={s.max_samples_per_task}")
        tasks = [parse_task(text, i, s.max_task_bytes) for i, text in enumerate(request.tasks_json)]
        sampling = _sampling(request.sampling)
        max_turns = request.max_turns if request.HasField("max_turns") else s.max_turns
        if not 1 <= max_turns <= s.max_turns:
            raise ValueError(f"max_turns: {max_turns}; 1 to the server's max_turns={s.max_turns}")
        largest = self.service.max_episode_tokens
        max_tokens = request.max_episode_tokens if request.HasField("max_episode_tokens") else largest
        if not 2 <= max_tokens <= largest:
            raise ValueError(f"max_episode_tokens: {max_tokens}; 2 to {largest} (the server's max_episode_tokens, at "
                             "most the model length)")
        if request.reward_model and self.service.reward is None:
            raise ValueError("reward_model: this service has no reward service (start it with --reward)")
        return served, tasks, n, sampling, Limits(max_turns, max_tokens)


def _sampling(params: Any) -> dict[str, Any]:
    """The per-turn sampling of a request as generate() keywords; ValueError naming the field."""
    if params.HasField("n") and params.n != 1:
        raise ValueError("sampling.n: an episode samples one continuation per turn; ask for n episodes instead")
    if params.stop:
        raise ValueError("sampling.stop: stop strings are not allowed (they cut inside a token); use stop_token_ids")
    if params.ignore_eos:
        raise ValueError("sampling.ignore_eos: a turn must be able to end")
    sampling: dict[str, Any] = {"max_tokens": params.max_tokens if params.HasField("max_tokens") else 16,
                                "stop_token_ids": list(params.stop_token_ids)}
    if sampling["max_tokens"] < 1:
        raise ValueError(f"sampling.max_tokens: {sampling['max_tokens']}; at least 1")
    for field in ("temperature", "top_p", "top_k", "seed"):
        if params.HasField(field):
            sampling[field] = getattr(params, field)
    return sampling


def _tool(tool: dict) -> environment_pb2.Tool:
    function = tool.get("function", tool)
    return environment_pb2.Tool(name=str(function.get("name", "")), description=str(function.get("description", "")),
                                parameters_json=json.dumps(function.get("parameters", {})))


@dataclass
class Served:
    """An environment as the operator named it: a class run turn by turn, or an agent program."""

    spec: str
    tools: list[dict]
    chat: ChatTokens
    agent: bool


class EnvironmentService:
    """EnvironmentService on the shared bootstrap: starts the environment workers, connects to the
    replicas (and the reward service), loads the tokenizer, serves episodes."""

    name = "environment"

    def __init__(self, settings: EnvironmentSettings) -> None:
        self.settings = settings
        self.servicer = EnvironmentServicer(self)
        self.environments: dict[str, Served] = {}
        self.agents: AgentPorts | None = None  # the replicas' OpenAI-compatible ports, for agent programs
        self.session_clients: list[AsyncSessionClient] = []  # each replica's SessionService
        self.surplus: collections.deque[tuple[str, environment_pb2.Episode]] = collections.deque()
        self.pool: FunctionPool | None = None
        self.replicas: list[AsyncGenerationClient] = []
        self.reward: AsyncRewardClient | None = None
        self.tokenizer_name = ""
        self.max_episode_tokens = 0

    def register(self, server: grpc.aio.Server) -> list[str]:
        environment_pb2_grpc.add_EnvironmentServiceServicer_to_server(self.servicer, server)
        return [environment_pb2.DESCRIPTOR.services_by_name["EnvironmentService"].full_name]

    async def start(self) -> None:
        from transformers import AutoTokenizer

        s = self.settings
        named = s.named_environments()
        self.pool = FunctionPool(
            [spec for _, spec in named], workers=s.environment_workers, timeout_s=s.environment_timeout_s,
            max_queued_samples=s.environment_max_queued_calls, memory_mb=s.environment_worker_memory_mb,
            workers_per_caller=s.environment_workers_per_caller or s.environment_workers,
            load=environments.load, what="environment", settings="environment_")
        credentials = s.credentials()
        clients = [AsyncGenerationClient(address, timeout_s=s.rpc_timeout_s, **credentials) for address in s.generation]
        infos = await asyncio.gather(*(c.model_info(timeout_s=s.services_wait_s, wait_for_ready=True) for c in clients))
        self.replicas = clients
        self.session_clients = [AsyncSessionClient(a, timeout_s=s.rpc_timeout_s, **credentials) for a in s.generation]
        model_length = min(info.max_model_len_tokens for info in infos)
        self.max_episode_tokens = min(s.max_episode_tokens or model_length, model_length)
        if s.reward is not None:
            self.reward = AsyncRewardClient(s.reward, timeout_s=s.rpc_timeout_s, **credentials)
        self.tokenizer_name = s.tokenizer or infos[0].model_id
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, resolve_model(self.tokenizer_name))
        for name, spec in named:
            try:
                await self.pool.check(spec)
                agent = await self.pool.run(spec, environments.is_agent_in_worker)
                tools = [] if agent else await self.pool.run(spec, environments.tools_in_worker)
                chat = ChatTokens(tokenizer, infos[0].eos_token_ids, tools)
            except (FunctionFailed, TemplateError) as err:
                raise RuntimeError(f"environment {name}={spec}: {err}") from None
            if agent and self.agents is None:
                self.agents = self._agent_ports(infos, credentials)
            self.environments[name] = Served(spec, tools, chat, agent)
            log.info("serving environment %s (%s, %s)", name, spec, "an agent program" if agent else "tools: " + (
                ", ".join(t.get("function", t).get("name", "?") for t in tools) or "none"))
        log.info("episodes on %d generation replica(s), at most %d tokens each", len(self.replicas),
                 self.max_episode_tokens)

    async def collected(self, want: int, wait_s: float, floor: int
                        ) -> AsyncIterator[tuple[str, environment_pb2.Episode]]:
        """Up to `want` episodes of closed sessions, taken from every replica (waiting up to
        `wait_s` for them); a taken session's other episodes wait for the next call. An episode
        with a token older than policy version `floor` is dropped."""
        deadline = time.monotonic() + wait_s
        sent, took = 0, False
        while True:
            while self.surplus and sent < want:
                session_id, episode = self.surplus.popleft()
                sampled = [v for v, m in zip(episode.policy_versions, episode.loss_mask, strict=True) if m]
                if sampled and min(sampled) < floor:
                    STALE.inc()
                    continue
                sent += 1
                yield session_id, episode
            left = deadline - time.monotonic()
            if sent >= want or (took and left <= 0):
                return
            # Short waits on every replica at once: a call is never cancelled once it may have taken sessions.
            replies = await asyncio.gather(*(c.take(want - sent, wait_s=max(0.0, min(left, 0.5)))
                                             for c in self.session_clients))
            took = True
            for taken in (t for reply in replies for t in reply):
                self.surplus.extend((taken.session_id, e) for e in taken.episodes)

    def _agent_ports(self, infos: list, credentials: dict[str, Any]) -> AgentPorts:
        """Each replica's OpenAI-compatible base URL (its gRPC host, the port it reports)."""
        s = self.settings
        closed = [a for a, info in zip(s.generation, infos, strict=True) if not info.openai_http_port]
        if closed:
            raise RuntimeError(f"agent programs need every replica's OpenAI-compatible port; {', '.join(closed)} "
                               "serve(s) none (start them with --http-port)")
        scheme = "https" if credentials["tls"] is not None else "http"
        urls = [f"{scheme}://{address.rpartition(':')[0]}:{info.openai_http_port}"
                for address, info in zip(s.generation, infos, strict=True)]
        ca = str(s.services_tls_ca) if s.services_tls_ca else None
        token = s.agent_token_file.read_text().strip() if s.agent_token_file else credentials["token"]
        return AgentPorts(urls, self.session_clients, token or "", ca)

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()
        for sessions in self.session_clients:
            await sessions.close()
        if self.reward is not None:
            await self.reward.close()
        if self.pool is not None:
            self.pool.close()
