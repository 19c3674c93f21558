"""Replicas restarting or killed under load: graceful drain, client health checking and retries lose no
call, and a replica killed mid-update comes back whole."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import psutil
import pytest

from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import AsyncRewardClient, RewardClient

from support import PYTHON, ChildServer, push_messages, wait_for

pytestmark = pytest.mark.slow

PAIRS = [("What is 2 + 2?", "4, thank you."), ("Hi", "Hello there!")]


def _reward(model, log_path, port: int | None = None) -> ChildServer:
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={model}",
                          "--drain-grace-s", "20"], log_path, port=port)
    wait_until_serving(server.address, timeout_s=300, alive=server.alive)
    return server


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_restarting_each_of_two_replicas_fails_no_call(tiny_models, tmp_path, kill):
    """Stop and restart each of two replicas in turn while four callers score without pause:
    SIGTERM drains; kill -9 lands mid-batch (the callers keep each replica busy), and the calls
    it cuts off are retried on the other replica by the client's retry policy."""
    replicas = [_reward(tiny_models["reward"], tmp_path / f"replica{i}.log") for i in range(2)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    outcomes: list[str] = []
    stop = threading.Event()

    with RewardClient(target, timeout_s=30) as client:
        expected = client.scores(PAIRS)

        def call_forever() -> None:
            while not stop.is_set():
                try:
                    scores = client.scores(PAIRS)  # batch-invariant within 1e-5, not bit for bit
                    outcomes.append("ok" if scores == pytest.approx(expected, abs=1e-5) else f"wrong: {scores}")
                except grpc.RpcError as err:
                    outcomes.append(f"{err.code().name}: {err.details()}")

        def more_calls(count: int) -> None:
            since = len(outcomes)
            wait_for(lambda: len(outcomes) >= since + count, what=f"{count} more calls")

        callers = [threading.Thread(target=call_forever) for _ in range(4)]
        for caller in callers:
            caller.start()
        try:
            for i, replica in enumerate(replicas):
                more_calls(40)  # both replicas busy
                before = len(outcomes)
                if kill == signal.SIGTERM:
                    replica.process.send_signal(kill)
                    assert replica.process.wait(timeout=60) == 0  # drained and exited cleanly
                else:
                    replica.kill()
                replica.stop()
                more_calls(20)  # calls go on against the other replica alone
                replicas[i] = _reward(tiny_models["reward"], tmp_path / f"replica{i}.log", port=replica.port)
                assert len(outcomes) > before  # the callers kept going through the restart
            more_calls(40)
        finally:
            stop.set()
            for caller in callers:
                caller.join(timeout=60)
            for replica in replicas:
                replica.stop()

    failures = [o for o in outcomes if o != "ok"]
    assert not failures, f"{len(failures)} of {len(outcomes)} calls failed, e.g. {failures[:3]}"
    assert len(outcomes) > 100
    for i in range(2):  # both restarts served calls again; a drain at the end, and one before if SIGTERM
        log = (tmp_path / f"replica{i}.log").read_text()
        assert log.count("SERVING") >= 2 and log.count(": draining") == (2 if kill == signal.SIGTERM else 1)


def test_overload_is_refused_fast_while_admitted_calls_succeed(tiny_models, tmp_path):
    """32 callers against a queue of 16 samples whose batches wait 1 s: most calls find it full and
    are refused at once, not after a batch's wait. (Refusal latency itself: benchmarks/overload.py.)"""
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={tiny_models['reward']}",
                          "--max-queue-samples", "16", "--max-wait-ms", "1000"], tmp_path / "reward.log")
    try:
        wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        process = psutil.Process(server.process.pid)

        async def flood() -> tuple[dict[str, list[float]], int]:
            outcomes: dict[str, list[float]] = {"ok": [], "refused": []}
            async with AsyncRewardClient(server.address, timeout_s=30) as client:
                expected = await client.scores(PAIRS)
                rss_before = process.memory_info().rss
                deadline = time.monotonic() + 8

                async def caller() -> None:
                    while time.monotonic() < deadline:
                        started = time.monotonic()
                        try:
                            scores = await client.scores(PAIRS)
                            assert scores == pytest.approx(expected, abs=1e-5)
                            outcomes["ok"].append(time.monotonic() - started)
                        except grpc.aio.AioRpcError as err:
                            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                            outcomes["refused"].append(time.monotonic() - started)
                            await asyncio.sleep(0.1)  # a caller that backs off a little, as ours do

                await asyncio.gather(*(caller() for _ in range(32)))
                return outcomes, process.memory_info().rss - rss_before

        outcomes, growth = asyncio.run(flood())
        refused, admitted = sorted(outcomes["refused"]), sorted(outcomes["ok"])
        print(f"{len(admitted)} admitted (median {admitted[len(admitted) // 2]:.3f} s), {len(refused)} refused "
              f"(median {refused[len(refused) // 2]:.3f} s, p99 {refused[int(0.99 * len(refused))]:.3f} s), "
              f"memory +{growth >> 20} MiB")
        assert len(admitted) > 50 and len(refused) > len(admitted)
        assert admitted[len(admitted) // 2] > 0.75  # admitted calls wait for their batch
        # A refusal never waits for a batch (1 s); the margin is one a loaded 2-core machine cannot eat.
        assert refused[len(refused) // 2] < 0.1 and refused[int(0.99 * len(refused))] < 0.5, "refusals must be fast"
        assert growth < 100 << 20, f"resident memory grew by {growth >> 20} MiB"
        assert server.alive()
    finally:
        assert server.stop() == 0


def test_a_generator_killed_mid_push_restarts_on_its_own_weights_and_takes_the_push_again(tiny_models, tmp_path):
    """kill -9 a generation replica while a weight push streams into it: the push fails with
    UNAVAILABLE, the restarted replica serves the policy from its disk at version 0 (never a
    half-written model), and pushing the same version again goes through."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_mesh.clients.generation import GenerationClient

    from support import greedy, start_generation_server

    original = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    updated = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    tensors = {k: v.detach().clone() for k, v in updated.state_dict().items()}
    messages = push_messages(tensors, 1)
    half_sent, finished = threading.Event(), threading.Event()

    def stall():
        yield from messages[: len(messages) // 2]
        half_sent.set()
        finished.wait(120)

    def serves(client: GenerationClient, model, version: int) -> None:
        assert client.model_info().policy_version == version
        sample = next(client.generate(["Hello there"], max_tokens=12, temperature=0, ignore_eos=True))
        assert list(sample.completion_token_ids) == greedy(model, sample.prompt_token_ids, 12)

    generation = start_generation_server(tiny_models["policy"], tmp_path / "generation.log")
    restarted = None
    try:
        with GenerationClient(generation.address, timeout_s=120) as client:
            outcome: list[object] = []

            def push_weights() -> None:
                try:
                    outcome.append(client.stub.PushWeights(stall(), timeout=120))
                except grpc.RpcError as err:
                    outcome.append(err)

            push = threading.Thread(target=push_weights)
            push.start()
            assert half_sent.wait(60)
            generation.kill()
            push.join(timeout=60)
            assert isinstance(outcome[0], grpc.RpcError) and outcome[0].code() == grpc.StatusCode.UNAVAILABLE
        generation.stop()
        restarted = start_generation_server(tiny_models["policy"], tmp_path / "generation.log", port=generation.port)
        with GenerationClient(restarted.address, timeout_s=120) as client:
            serves(client, original, 0)
            assert client.push_weights(tensors, 1).policy_version == 1
            serves(client, updated, 1)
    finally:
        finished.set()
        for server in (generation, restarted):
            if server is not None:
                server.stop()
