"""One retry policy per caller: the learner's calls are tried `replica_retries` times in all, a
plain client's through its channel's policy; counted by a real server that answers UNAVAILABLE."""

from __future__ import annotations

import grpc
import pytest

from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.server import drain, start
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.retry import Retry, learner_client
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.settings import ServiceSettings
from rlhf_mesh.v1 import reward_pb2, reward_pb2_grpc

PAIR = ("What is 2 + 2?", "4.")


class Restarting(reward_pb2_grpc.RewardServiceServicer):
    """A RewardService whose Score answers UNAVAILABLE, as a replica does while it restarts."""

    def __init__(self) -> None:
        self.attempts = 0

    async def Score(self, request, context):
        self.attempts += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


class RestartingService:
    name = "restarting"

    def __init__(self) -> None:
        self.servicer = Restarting()

    def register(self, server: grpc.aio.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, server)
        return [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name]

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def restarting():
    service = RestartingService()
    running = await start(service, ServiceSettings(host="127.0.0.1", port=0, metrics_port=0))
    yield service.servicer, f"127.0.0.1:{running.port}"
    await drain(running, service, grace_s=1.0)


async def test_a_learner_call_is_tried_replica_retries_times_in_all(restarting):
    servicer, address = restarting
    settings = LearnerSettings(policy="unused", prompts="unused.jsonl", generation=["127.0.0.1:1"], reward=address,
                               replica_retries=3, rpc_timeout_s=30)
    retry = Retry(attempts=settings.replica_retries, first_backoff_s=0.01)
    async with learner_client(AsyncRewardClient, address, settings) as client:
        with pytest.raises(LearnerError, match="UNAVAILABLE: restarting"):
            await retry.call(lambda _: client.score([PAIR]), lambda _: "reward service")
    assert servicer.attempts == 3  # not 3 x the channel's 5


async def test_a_plain_client_retries_unavailable_through_its_channel(restarting):
    servicer, address = restarting
    async with AsyncRewardClient(address, timeout_s=30) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.score([PAIR])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts == 5
