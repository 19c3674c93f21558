"""A PPO run with its controls: the loop behind `rlhf-mesh train` and the LearnerService.

Steps run under a lock, so a checkpoint requested mid-step is written right after that step
and a pause takes effect between steps. Every step's scalars go to TensorBoard, the
console and whoever watches them (WatchMetrics).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.report import Reporter
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.services.learner.trainer import Trainer
from rlhf_mesh.v1 import learner_pb2

log = logging.getLogger(__name__)

STOPPED_EXIT_CODE = 143  # 128 + SIGTERM: not done, so a Job restarts it and the rerun resumes


class Run:
    """The state of one run as the LearnerService reports it."""

    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = settings
        self.state = learner_pb2.LEARNER_STATE_STARTING
        self.message = ""
        self.trainer: Trainer | None = None
        self.metrics: list[learner_pb2.WatchMetricsResponse] = []
        self.last_checkpoint: tuple[Path, int] | None = None
        self.changed = asyncio.Condition()  # notified on every new step and state change
        self.running = asyncio.Event()  # cleared while paused
        if not settings.start_paused:
            self.running.set()
        self.stopping = asyncio.Event()  # SIGTERM: checkpoint after the step in progress and end
        self._lock = asyncio.Lock()

    def stop(self) -> None:
        """End the loop after the step in progress, with a checkpoint to resume from (SIGTERM)."""
        self.stopping.set()
        self.running.set()  # a paused run stops at once

    @property
    def stopped(self) -> bool:
        """Ended by stop() before its last step: the process should exit non-zero (143) to be rerun."""
        return self.stopping.is_set() and self.step < self.settings.steps

    @property
    def step(self) -> int:
        return self.trainer.step if self.trainer is not None else 0

    @property
    def version(self) -> int:
        return self.trainer.version if self.trainer is not None else 0

    @property
    def done(self) -> bool:
        """Finished, failed, or stopped with its checkpoint written."""
        ended = self.stopping.is_set() and self.state == learner_pb2.LEARNER_STATE_PAUSED
        return ended or self.state in (learner_pb2.LEARNER_STATE_FINISHED, learner_pb2.LEARNER_STATE_FAILED)

    async def start(self) -> None:
        """Load the models and connect to the services."""
        self.settings.output_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = await asyncio.to_thread(Trainer, self.settings)
        self.metrics = [  # a resumed run replays the steps of its checkpoint too
            learner_pb2.WatchMetricsResponse(step=int(h["step"]), policy_version=int(h["policy/version"]),
                                             scalars={k: v for k, v in h.items() if k != "step"})
            for h in self.trainer.history
        ]
        await self.trainer.connect()

    async def loop(self) -> None:
        """Every step, then a final checkpoint, the plot and the summary; FAILED on an error."""
        s = self.settings
        reporter = Reporter(s.output_dir / "tensorboard", s.steps, self.step)
        try:
            while self.step < s.steps:
                if not self.running.is_set():
                    await self._set_state(learner_pb2.LEARNER_STATE_PAUSED)
                    await self.running.wait()
                if self.stopping.is_set():
                    path, step = await self.checkpoint()
                    log.warning("stopped at step %d (checkpoint %s); rerun the command to go on", step, path)
                    await self._set_state(learner_pb2.LEARNER_STATE_PAUSED, f"stopped at step {step}; rerun to resume")
                    return
                await self._set_state(learner_pb2.LEARNER_STATE_RUNNING)
                async with self._lock:
                    scalars = await self.trainer.run_step()
                reporter.step(self.step, scalars)
                await self._publish(scalars)
                if s.save_steps and self.step % s.save_steps == 0:
                    await self.checkpoint()
            await self.checkpoint()
            png, table = await asyncio.to_thread(self.trainer.finish)
            print(table, flush=True)
            print(f"plot: {png}\ntensorboard: {s.output_dir / 'tensorboard'}\n"
                  f"checkpoint: {self.last_checkpoint[0]}", flush=True)
            await self._set_state(learner_pb2.LEARNER_STATE_FINISHED)
        except LearnerError as err:
            log.error("training failed at step %d: %s", self.step + 1, err)
            await self._set_state(learner_pb2.LEARNER_STATE_FAILED, f"step {self.step + 1}: {err}")
            raise
        except Exception as err:
            log.exception("training failed at step %d", self.step + 1)
            await self._set_state(learner_pb2.LEARNER_STATE_FAILED, f"step {self.step + 1}: {err}")
            raise
        finally:
            reporter.close()

    async def checkpoint(self) -> tuple[Path, int]:
        """Write a checkpoint between steps; returns its path and step."""
        async with self._lock:
            if self.last_checkpoint is None or self.last_checkpoint[1] != self.step:
                path = await asyncio.to_thread(self.trainer.save_checkpoint)
                self.last_checkpoint = (path, self.step)
                log.info("checkpoint: %s", path)
            return self.last_checkpoint

    async def close(self) -> None:
        if self.trainer is not None:
            await self.trainer.close()

    async def _publish(self, scalars: dict[str, float]) -> None:
        self.metrics.append(learner_pb2.WatchMetricsResponse(
            step=self.step, policy_version=self.version, scalars=scalars, wall_time_unix_s=time.time(),
        ))
        async with self.changed:
            self.changed.notify_all()

    async def _set_state(self, state: learner_pb2.LearnerState, message: str = "") -> None:
        if state != self.state or message != self.message:
            self.state, self.message = state, message
            async with self.changed:
                self.changed.notify_all()


def follow(settings: LearnerSettings) -> int:
    """A rank other than 0 under torchrun: trains its shares of the leader's steps until the run ends."""
    Trainer(settings).follow()
    return 0


async def train(settings: LearnerSettings) -> int:
    """`rlhf-mesh train`: the run without a server."""
    run = Run(settings)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, run.stop)
    try:
        await run.start()
        await run.loop()
    finally:
        await run.close()
    return STOPPED_EXIT_CODE if run.stopped else 0
