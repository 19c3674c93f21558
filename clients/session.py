"""Clients of the SessionService (served beside the GenerationService): open a session with
imposed sampling, reward a session that an agent program ran on the OpenAI-compatible port, read
it, and take closed sessions as episodes. Every call has a deadline (`timeout_s`, default 60 s);
`take` waits up to `wait_s` for a session to close when none has.
"""

from __future__ import annotations

from rlhf_mesh.clients.channel import AsyncClient, Client
from rlhf_mesh.v1 import generation_pb2, session_pb2, session_pb2_grpc

SERVICE = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


def open_request(session_id: str, *, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, max_tokens: int | None = None, seed: int | None = None
                 ) -> session_pb2.OpenSessionRequest:
    imposed = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)
    return session_pb2.OpenSessionRequest(session_id=session_id, sampling=generation_pb2.SamplingParams(
        **{k: v for k, v in imposed.items() if v is not None}))


def reward_request(session_id: str, reward: float, call_id: str | None = None, keep_open: bool = False
                   ) -> session_pb2.RewardSessionRequest:
    return session_pb2.RewardSessionRequest(session_id=session_id, reward=reward, call_id=call_id or "",
                                            keep_open=keep_open)


def take_request(max_sessions: int | None, wait_s: float) -> session_pb2.TakeSessionsRequest:
    request = session_pb2.TakeSessionsRequest(wait_ms=round(wait_s * 1000))
    if max_sessions is not None:
        request.max_sessions = max_sessions
    return request


class SessionClient(Client):
    """Blocking client; use as a context manager or call close()."""

    service = SERVICE
    stub_class = session_pb2_grpc.SessionServiceStub

    def open(self, session_id: str, timeout_s: float | None = None, **sampling) -> None:
        """Open a session whose calls are sampled with `sampling` (temperature, top_p, top_k,
        max_tokens as a cap, seed) whatever they ask."""
        self.stub.OpenSession(open_request(session_id, **sampling), timeout=self._timeout(timeout_s))

    def reward(self, session_id: str, reward: float, call_id: str | None = None, keep_open: bool = False,
               timeout_s: float | None = None) -> session_pb2.RewardSessionResponse:
        """Reward the session (or its call `call_id`) and close it, unless `keep_open`."""
        return self.stub.RewardSession(reward_request(session_id, reward, call_id, keep_open),
                                       timeout=self._timeout(timeout_s))

    def get(self, session_id: str, take: bool = False, timeout_s: float | None = None
            ) -> session_pb2.GetSessionResponse:
        """The session's branches as episodes; with `take`, it is no longer held."""
        return self.stub.GetSession(session_pb2.GetSessionRequest(session_id=session_id, take=take),
                                    timeout=self._timeout(timeout_s))

    def take(self, max_sessions: int | None = None, wait_s: float = 0.0, timeout_s: float | None = None
             ) -> list[session_pb2.TakeSessionsResponse]:
        """Closed sessions, each handed out once (waiting up to `wait_s` for one)."""
        return list(self.stub.TakeSessions(take_request(max_sessions, wait_s),
                                           timeout=self._timeout(timeout_s) + wait_s))


class AsyncSessionClient(AsyncClient):
    """asyncio client; use with `async with` or await close()."""

    service = SERVICE
    stub_class = session_pb2_grpc.SessionServiceStub

    async def open(self, session_id: str, timeout_s: float | None = None, **sampling) -> None:
        await self.stub.OpenSession(open_request(session_id, **sampling), timeout=self._timeout(timeout_s))

    async def reward(self, session_id: str, reward: float, call_id: str | None = None, keep_open: bool = False,
                     timeout_s: float | None = None) -> session_pb2.RewardSessionResponse:
        return await self.stub.RewardSession(reward_request(session_id, reward, call_id, keep_open),
                                             timeout=self._timeout(timeout_s))

    async def get(self, session_id: str, take: bool = False, timeout_s: float | None = None
                  ) -> session_pb2.GetSessionResponse:
        return await self.stub.GetSession(session_pb2.GetSessionRequest(session_id=session_id, take=take),
                                          timeout=self._timeout(timeout_s))

    async def take(self, max_sessions: int | None = None, wait_s: float = 0.0, timeout_s: float | None = None
                   ) -> list[session_pb2.TakeSessionsResponse]:
        call = self.stub.TakeSessions(take_request(max_sessions, wait_s), timeout=self._timeout(timeout_s) + wait_s)
        return [reply async for reply in call]
