"""LearnerService: a PPO run that trains while it answers GetStatus, WatchMetrics,
SaveCheckpoint, Pause and Resume. The server stops by itself `linger_s` after the run ends
(a Kubernetes Job completes), so watchers see the last step and the final state first."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from rlhf_mesh.services.learner.run import STOPPED_EXIT_CODE, Run
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.services.learner.trainer import Trainer
from rlhf_mesh.v1 import learner_pb2, learner_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, run: Run) -> None:
        self.run = run

    async def GetStatus(self, request, context):
        run = self.run
        checkpoint = run.last_checkpoint
        return learner_pb2.GetStatusResponse(
            state=run.state, step=run.step, total_steps=run.settings.steps, policy_version=run.version,
            last_checkpoint_path=str(checkpoint[0]) if checkpoint else "",
            last_checkpoint_step=checkpoint[1] if checkpoint else 0, message=run.message,
            world_size=run.trainer.world.size if run.trainer is not None else 1,
        )

    async def WatchMetrics(self, request, context):
        """Replay from `from_step` (0: only new steps), then follow until the run ends."""
        run = self.run
        sent = len(run.metrics) if request.from_step == 0 else 0
        while True:
            while sent < len(run.metrics):
                message = run.metrics[sent]
                sent += 1
                if message.step >= request.from_step:  # by step: a run may hold step 0, the evaluation before training
                    yield message
            if run.done:
                return
            async with run.changed:
                await run.changed.wait_for(lambda sent=sent: sent < len(run.metrics) or run.done)

    async def SaveCheckpoint(self, request, context):
        if self.run.trainer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the learner has not loaded its models yet")
        path, step = await self.run.checkpoint()
        return learner_pb2.SaveCheckpointResponse(path=str(path), step=step)

    async def Pause(self, request, context):
        if self.run.done:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the run has ended")
        self.run.running.clear()
        return learner_pb2.PauseResponse(state=learner_pb2.LEARNER_STATE_PAUSED)

    async def Resume(self, request, context):
        if self.run.done:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the run has ended")
        self.run.running.set()
        return learner_pb2.ResumeResponse(state=learner_pb2.LEARNER_STATE_RUNNING)


class LearnerService:
    name = "learner"

    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = settings
        self.run = Run(settings)
        self.finished = asyncio.Event()  # the bootstrap stops the server when set
        self.exit_code = 0
        self._task: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(LearnerServicer(self.run), server)
        return [SERVICE]

    async def start(self) -> None:
        await self.run.start()
        self._task = asyncio.create_task(self._train())

    async def _train(self) -> None:
        try:
            await self.run.loop()
        except Exception:  # logged and reported as FAILED by the run
            self.exit_code = 1
        if self.run.stopped:
            self.exit_code = STOPPED_EXIT_CODE
            return
        await asyncio.sleep(self.settings.linger_s)
        self.finished.set()

    def draining(self) -> None:
        """SIGTERM: the step in progress finishes and is checkpointed while the server drains."""
        self.run.stop()

    async def close(self) -> None:
        """Wait for the stopped run's checkpoint (up to drain_grace_s more), then release everything."""
        if self._task is not None and not self._task.done():
            self.run.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.settings.drain_grace_s)
            except TimeoutError:  # the step did not finish in time: the last checkpoint stands
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self.exit_code = STOPPED_EXIT_CODE
        await self.run.close()


class FollowerService:
    """`serve learner` on a torchrun rank other than 0 (the first process of a pod that rank 0 is
    not in): it trains its shares of rank 0's steps and serves gRPC health only, for the pod's
    probes. It ends when rank 0 ends the run; on SIGTERM it keeps training until then, since
    rank 0 finishes and checkpoints its step with every rank."""

    name = "learner"

    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = settings
        self.finished = asyncio.Event()
        self.exit_code = 0
        self._task: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        return []

    async def start(self) -> None:
        trainer = await asyncio.to_thread(Trainer, self.settings)
        self._task = asyncio.create_task(self._follow(trainer))

    async def _follow(self, trainer: Trainer) -> None:
        try:
            await asyncio.to_thread(trainer.follow)
        except Exception:  # rank 0 failed or left: torchrun ends the other ranks
            log.exception("rank %d lost the run", trainer.world.rank)
            self.exit_code = 1
        self.finished.set()

    async def close(self) -> None:
        if self._task is not None:
            await self._task
