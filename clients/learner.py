"""Client of the LearnerService: a run's status, its metrics as they come, and its controls.

Every call has a deadline (`timeout_s`, default 60 s); `watch_metrics` streams for as long
as its own deadline allows and ends when the run ends.
"""

from __future__ import annotations

from collections.abc import Iterator

from rlhf_mesh.clients.channel import Client
from rlhf_mesh.v1 import learner_pb2, learner_pb2_grpc

SERVICE = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name


class LearnerClient(Client):
    """Blocking client; use as a context manager or call close()."""

    service = SERVICE
    stub_class = learner_pb2_grpc.LearnerServiceStub

    def status(self, timeout_s: float | None = None) -> learner_pb2.GetStatusResponse:
        return self.stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=self._timeout(timeout_s))

    def watch_metrics(self, from_step: int = 0, timeout_s: float = 86_400.0
                      ) -> Iterator[learner_pb2.WatchMetricsResponse]:
        """Each step's scalars from `from_step` on (earlier ones replayed; 0: only new ones), until the run ends."""
        call = self.stub.WatchMetrics(learner_pb2.WatchMetricsRequest(from_step=from_step), timeout=timeout_s)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream ended

    def save_checkpoint(self, timeout_s: float = 600.0) -> learner_pb2.SaveCheckpointResponse:
        """A checkpoint now (after the step in progress); its path and step."""
        return self.stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(), timeout=timeout_s)

    def pause(self, timeout_s: float | None = None) -> learner_pb2.LearnerState:
        """Pause between steps; the state after the call."""
        return self.stub.Pause(learner_pb2.PauseRequest(), timeout=self._timeout(timeout_s)).state

    def resume(self, timeout_s: float | None = None) -> learner_pb2.LearnerState:
        return self.stub.Resume(learner_pb2.ResumeRequest(), timeout=self._timeout(timeout_s)).state
