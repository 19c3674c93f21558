"""Clients of the RewardService: `RewardClient` (blocking) and `AsyncRewardClient`.

A sample is a `ScoreSample`, a `(prompt, response)` pair, a chat conversation (a list of
`{"role", "content"}` dicts) or a list of token ids. Every call has a deadline
(`timeout_s`, default 60 s); UNAVAILABLE is retried by the channel's service config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from rlhf_mesh.clients.channel import AsyncClient, Client
from rlhf_mesh.clients.common import conversation, is_chat, is_token_ids
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
    if is_chat(items):
        return reward_pb2.ScoreSample(chat=conversation(items))
    if is_token_ids(items):
        return reward_pb2.ScoreSample(token_ids=common_pb2.TokenIds(ids=items))
    raise TypeError(f"cannot score {type(sample).__name__}: give (prompt, response), chat messages or token ids")


def score_request(samples: Sequence[SampleLike], model: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(model=model, samples=[to_sample(s) for s in samples])


class RewardClient(Client):
    """Blocking client; use as a context manager or call close()."""

    service = SERVICE
    stub_class = reward_pb2_grpc.RewardServiceStub

    def score(self, samples: Sequence[SampleLike], model: str = "",
              timeout_s: float | None = None) -> reward_pb2.ScoreResponse:
        """Score a batch; results come in the order of `samples`."""
        return self.stub.Score(score_request(samples, model), timeout=self._timeout(timeout_s))

    def scores(self, samples: Sequence[SampleLike], model: str = "", timeout_s: float | None = None) -> list[float]:
        """Just the scores."""
        return [r.score for r in self.score(samples, model, timeout_s).results]

    def list_models(self, timeout_s: float | None = None) -> list[reward_pb2.RewardModelInfo]:
        return list(self.stub.ListModels(reward_pb2.ListModelsRequest(), timeout=self._timeout(timeout_s)).models)

    def reload_model(self, name: str, path: str, timeout_s: float = 600.0) -> reward_pb2.RewardModelInfo:
        """Serve the model at `path` (a folder the server can read) as `name` from now on."""
        return self.stub.ReloadModel(reward_pb2.ReloadModelRequest(name=name, path=path), timeout=timeout_s).model


class AsyncRewardClient(AsyncClient):
    """asyncio client; use with `async with` or await close()."""

    service = SERVICE
    stub_class = reward_pb2_grpc.RewardServiceStub

    async def score(self, samples: Sequence[SampleLike], model: str = "",
                    timeout_s: float | None = None) -> reward_pb2.ScoreResponse:
        return await self.stub.Score(score_request(samples, model), timeout=self._timeout(timeout_s))

    async def scores(self, samples: Sequence[SampleLike], model: str = "",
                     timeout_s: float | None = None) -> list[float]:
        return [r.score for r in (await self.score(samples, model, timeout_s)).results]

    async def list_models(self, timeout_s: float | None = None,
                          wait_for_ready: bool = False) -> list[reward_pb2.RewardModelInfo]:
        """`wait_for_ready`: wait (up to the deadline) for a server that is not up or not SERVING yet."""
        reply = await self.stub.ListModels(reward_pb2.ListModelsRequest(), timeout=self._timeout(timeout_s),
                                           wait_for_ready=wait_for_ready)
        return list(reply.models)
