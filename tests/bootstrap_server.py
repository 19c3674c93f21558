"""A server on the shared bootstrap, for the bootstrap's own tests.

Its LearnerService is a stand-in: GetStatus answers, SaveCheckpoint takes `call_s` seconds
(an in-flight call to drain), Pause raises (an unexpected error).
"""

from __future__ import annotations

import asyncio

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.server import run
from rlhf_mesh.settings import ServiceSettings
from rlhf_mesh.v1 import learner_pb2, learner_pb2_grpc

SECRET = "do-not-leak-4711"


class ProbeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_PROBE_")
    load_s: float = Field(0.0, ge=0, description="simulated model load time")
    call_s: float = Field(2.0, ge=0, description="duration of SaveCheckpoint")


class ProbeLearner(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, call_s: float) -> None:
        self.call_s = call_s

    async def GetStatus(self, request, context):
        return learner_pb2.GetStatusResponse(state=learner_pb2.LEARNER_STATE_RUNNING, step=7)

    async def SaveCheckpoint(self, request, context):
        print("SaveCheckpoint started", flush=True)  # what a test waits for before it acts mid-call
        await asyncio.sleep(self.call_s)
        return learner_pb2.SaveCheckpointResponse(path="/tmp/ckpt", step=7)

    async def Pause(self, request, context):
        raise RuntimeError(SECRET)


class ProbeService:
    name = "probe"

    def __init__(self, settings: ProbeSettings) -> None:
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> list[str]:
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(ProbeLearner(self.settings.call_s), server)
        return [learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name]

    async def start(self) -> None:
        await asyncio.sleep(self.settings.load_s)

    async def close(self) -> None:
        print("closed", flush=True)


if __name__ == "__main__":
    import sys

    raise SystemExit(run(ProbeSettings, ProbeService, sys.argv[1:], "bootstrap_server"))
