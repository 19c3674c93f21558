"""Clients of the RewardService: `RewardClient` (blocking) and `AsyncRewardClient`.

A sample is a `ScoreSample`, a `(prompt, response)` pair, a chat conversation (a list of
`{"role", "content"}` dicts) or a list of token ids. Every call has a deadline
(`timeout_s`, default 60 s); UNAVAILABLE is retried by the channel's service config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

from rlhf_mesh.clients.channel import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig, open_aio_channel, open_channel
from rlhf_mesh.v1 import common_pb2, reward_pb2, reward_pb2_grpc

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
SampleLike: TypeAlias = reward_pb2.ScoreSample | tuple[str, str] | Sequence[dict[str, str]] | Sequence[int]


def to_sample(sample: SampleLike) -> reward_pb2.ScoreSample:
    """Build a ScoreSample from any of the accepted forms."""
    if isinstance(sample, reward_pb2.ScoreSample):
        return sample
    if isinstance(sample, tuple) and len(sample) == 2 and all(isinstance(s, str) for s in sample):
        return reward_pb2.ScoreSample(text=reward_pb2.PromptResponse(prompt=sample[0], response=sample[1]))
    items = list(sample)
    if items and all(isinstance(m, dict) for m in items):
        messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in items]
        return reward_pb2.ScoreSample(chat=common_pb2.Conversation(messages=messages))
    if all(isinstance(t, int) for t in items):
        return reward_pb2.ScoreSample(token_ids=common_pb2.TokenIds(ids=items))
    raise TypeError(f"cannot score {type(sample).__name__}: give (prompt, response), chat messages or token ids")


def score_request(samples: Sequence[SampleLike], model: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(model=model, samples=[to_sample(s) for s in samples])


class _Client:
    def __init__(self, channel: grpc.Channel | grpc.aio.Channel, timeout_s: float) -> None:
        self.channel = channel
        self.stub = reward_pb2_grpc.RewardServiceStub(channel)
        self.timeout_s = timeout_s

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s


class RewardClient(_Client):
    """Blocking client; use as a context manager or call close()."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, tls: TlsConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(open_channel(address, SERVICE, tls=tls, max_message_bytes=max_message_bytes), timeout_s)

    def score(self, samples: Sequence[SampleLike], model: str = "",
              timeout_s: float | None = None) -> reward_pb2.ScoreResponse:
        """Score a batch; results come in the order of `samples`."""
        return self.stub.Score(score_request(samples, model), timeout=self._timeout(timeout_s))

    def scores(self, samples: Sequence[SampleLike], model: str = "", timeout_s: float | None = None) -> list[float]:
        """Just the scores."""
        return [r.score for r in self.score(samples, model, timeout_s).results]

    def list_models(self, timeout_s: float | None = None) -> list[reward_pb2.RewardModelInfo]:
        return list(self.stub.ListModels(reward_pb2.ListModelsRequest(), timeout=self._timeout(timeout_s)).models)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncRewardClient(_Client):
    """asyncio client; use with `async with` or await close()."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, tls: TlsConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        channel = open_aio_channel(address, SERVICE, tls=tls, max_message_bytes=max_message_bytes)
        super().__init__(channel, timeout_s)

    async def score(self, samples: Sequence[SampleLike], model: str = "",
                    timeout_s: float | None = None) -> reward_pb2.ScoreResponse:
        return await self.stub.Score(score_request(samples, model), timeout=self._timeout(timeout_s))

    async def scores(self, samples: Sequence[SampleLike], model: str = "",
                     timeout_s: float | None = None) -> list[float]:
        return [r.score for r in (await self.score(samples, model, timeout_s)).results]

    async def list_models(self, timeout_s: float | None = None) -> list[reward_pb2.RewardModelInfo]:
        reply = await self.stub.ListModels(reward_pb2.ListModelsRequest(), timeout=self._timeout(timeout_s))
        return list(reply.models)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
