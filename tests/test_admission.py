"""Admission before work: a call is authenticated before its message is read, and the bytes of
request messages in flight are bounded server-wide (the shared bootstrap, rlhf_mesh/server.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import psutil

from rlhf_mesh.clients.channel import channel_options
from rlhf_mesh.clients.reward import RewardClient, to_sample
from rlhf_mesh.v1 import common_pb2, learner_pb2, reward_pb2

from support import PYTHON, ROOT, ChildServer, metric, scrape, wait_for, write_tokens

SCORE = "/rlhf_mesh.v1.RewardService/Score"
LEARNER = "rlhf_mesh.v1.LearnerService"
PROBE = [PYTHON, str(ROOT / "tests" / "bootstrap_server.py")]


def _peak_rss(pid: int) -> int:
    """The process's highest resident set size since the last reset_peak (Linux's VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS


def test_unauthenticated_calls_are_refused_before_their_message_is_read(tiny_models, tmp_path):
    """16 anonymous 60 MB Score calls at once: refused without the server ever holding their bytes."""
    tokens = write_tokens(tmp_path / "tokens.yaml", scorer=["score"])
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={tiny_models['reward']}",
                          "--tokens-file", str(tmp_path / "tokens.yaml")], tmp_path / "reward.log")
    try:
        server.wait_serving()
        with RewardClient(server.address, timeout_s=120, token=tokens["scorer"]) as client:
            client.scores([("Hi", "Hello!")])  # the first call's allocations are part of idle
        process = psutil.Process(server.process.pid)
        _reset_peak(process.pid)
        idle = process.memory_info().rss
        body = reward_pb2.ScoreRequest(samples=[to_sample(("Hi", "x" * 60_000_000))]).SerializeToString()
        with grpc.insecure_channel(server.address, options=channel_options(64 << 20)) as channel:
            score = channel.unary_unary(SCORE)
            calls = [score.future(body, timeout=300) for _ in range(16)]
            codes = {call.exception().code() for call in calls}
        assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        peak = _peak_rss(process.pid)
        assert peak <= 1.2 * idle, f"RSS rose from {idle >> 20} MiB idle to a peak of {peak >> 20} MiB"
        with RewardClient(server.address, timeout_s=120, token=tokens["scorer"]) as client:
            assert len(client.scores([("Hi", "Hello!")])) == 1  # and it goes on serving
    finally:
        assert server.stop() == 0


def _padded(size: int) -> bytes:
    """An empty request message padded to `size` bytes with a field it does not know (parses fine)."""
    overhead = len(common_pb2.ChatMessage(content="x" * size).SerializeToString()) - size
    return common_pb2.ChatMessage(content="x" * (size - overhead)).SerializeToString()


def test_requests_past_the_in_flight_byte_budget_are_refused_and_small_ones_go_on(child_server, tmp_path):
    tokens = write_tokens(tmp_path / "tokens.yaml", operator=["admin"])
    budget, size = 4 << 20, 3 << 19  # room for two 1.5 MiB requests, not three
    server = child_server([*PROBE, "--tokens-file", str(tmp_path / "tokens.yaml"), "--call-s", "600",
                           "--max-message-bytes", str(2 << 20), "--max-inflight-bytes", str(budget)])
    server.wait_serving()
    metadata = (("authorization", f"Bearer {tokens['operator']}"),)
    with grpc.insecure_channel(server.address, options=channel_options(4 << 20)) as channel:
        save = channel.unary_unary(f"/{LEARNER}/SaveCheckpoint")
        status = channel.unary_unary(f"/{LEARNER}/GetStatus")
        held = [save.future(_padded(size), timeout=300, metadata=metadata) for _ in range(2)]
        wait_for(lambda: server.log().count("SaveCheckpoint started") == 2, what="two big calls held in flight")
        flood = [status.future(_padded(size), timeout=60, metadata=metadata) for _ in range(6)]
        for call in flood:
            assert call.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"max_inflight_bytes={budget}" in call.exception().details()
            assert ("grpc-retry-pushback-ms", "250") in call.exception().trailing_metadata()  # gRPC's retries wait
        # A small call fits beside the held ones.
        assert learner_pb2.GetStatusResponse.FromString(status(b"", timeout=60, metadata=metadata)).step == 7
        text = scrape(server)
        assert metric(text, "rlhf_mesh_rpcs_total", method="GetStatus", code="RESOURCE_EXHAUSTED") == 6
        assert metric(text, "rlhf_mesh_request_bytes_in_flight", service="probe") == 2 * size
        # The held calls' bytes are given back when they end (here: cancelled by the caller).
        for call in held:
            call.cancel()
        wait_for(lambda: metric(scrape(server), "rlhf_mesh_request_bytes_in_flight", service="probe") == 0,
                 what="the cancelled calls' bytes are released")
        assert learner_pb2.GetStatusResponse.FromString(status(_padded(size), timeout=60, metadata=metadata)).step == 7
    assert "admin RPCs" not in server.log()  # tokens on: no warning about open admin RPCs


def test_a_budget_below_the_largest_message_is_refused_at_start(child_server):
    server = child_server([*PROBE, "--max-inflight-bytes", str(1 << 20)])
    assert server.process.wait(timeout=60) == 2
    assert "max_inflight_bytes" in server.log() and "max_message_bytes" in server.log()
