"""Replicas restarting or killed under load: graceful drain, client health checking and retries lose no
call, and a replica killed mid-update comes back whole; overload is refused at once, and one caller's
flood does not hold back another."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import psutil
import pytest

from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import AsyncRewardClient, RewardClient, score_request

from support import PYTHON, ChildServer, metric, push_messages, scrape, wait_for, write_tokens

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
    are refused at once, with a retry hint, before the batch that holds the queue has run.
    (Refusal latency itself: benchmarks/overload.py.)"""
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={tiny_models['reward']}",
                          "--max-queued-samples", "16", "--max-wait-ms", "1000"], tmp_path / "reward.log")
    try:
        wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        process = psutil.Process(server.process.pid)

        async def flood() -> tuple[list[int], list[tuple[int, int]], set[str], int]:
            admitted: list[int] = []  # each admitted call's place among the admitted calls answered
            refused: list[tuple[int, int]] = []  # admitted calls answered when a refused call was sent, answered
            hints: set[str] = set()
            async with AsyncRewardClient(server.address, timeout_s=30) as client:
                expected = await client.scores(PAIRS)
                rss_before = process.memory_info().rss
                deadline = time.monotonic() + 8

                async def caller() -> None:
                    while time.monotonic() < deadline:
                        sent = len(admitted)
                        try:
                            scores = await client.scores(PAIRS)
                            assert scores == pytest.approx(expected, abs=1e-5)
                            admitted.append(len(admitted))
                        except grpc.aio.AioRpcError as err:
                            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                            refused.append((sent, len(admitted)))
                            hints.add(dict(err.trailing_metadata()).get("grpc-retry-pushback-ms", "none"))
                            await asyncio.sleep(0.1)  # a caller that backs off a little, as ours do

                await asyncio.gather(*(caller() for _ in range(32)))
                return admitted, refused, hints, process.memory_info().rss - rss_before

        admitted, refused, hints, growth = asyncio.run(flood())
        at_once = sum(sent == answered for sent, answered in refused)
        print(f"{len(admitted)} admitted, {len(refused)} refused ({at_once} before another admitted call was "
              f"answered), retry hints {sorted(hints)} ms, memory +{growth >> 20} MiB")
        assert len(admitted) > 50 and len(refused) > len(admitted)
        # A batch of 16 samples ends once a second: a refusal that waited for one would see 8 calls answered.
        assert at_once > len(refused) / 2, "refusals must not wait for the queued batch"
        assert "none" not in hints and all(int(h) > 0 for h in hints)
        assert growth < 100 << 20, f"resident memory grew by {growth >> 20} MiB"
        assert server.alive()
    finally:
        assert server.stop() == 0


def test_a_flood_from_one_caller_does_not_hold_back_another(tiny_models, tmp_path):
    """One token holder sends four calls of 256 long samples (about 200 batches); another's
    one-sample call, sent while the flood computes, is answered within a few batches while all
    four flood calls are still pending: callers share the batches, not first come first served."""
    tokens = write_tokens(tmp_path / "tokens.yaml", flood=["score"], honest=["score"])
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={tiny_models['reward']}",
                          "--tokens-file", str(tmp_path / "tokens.yaml"), "--max-batch-tokens", "512"],
                         tmp_path / "reward.log")
    long = [("Tell me more about the old river. " * 6, "Sure, here it is: the river is long. " * 3)] * 256

    def batches() -> float:
        return metric(scrape(server), "rlhf_mesh_reward_batch_size_samples_count", model="tiny")

    try:
        wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        with (RewardClient(server.address, token=tokens["flood"], timeout_s=300) as flood,
              RewardClient(server.address, token=tokens["honest"], timeout_s=300) as honest):
            assert len(honest.scores([PAIRS[0]])) == 1
            start = batches()
            calls = [flood.stub.Score.future(score_request(long, ""), timeout=300) for _ in range(4)]
            sent = wait_for(lambda: (n := batches()) > start and n, what="the flood's batches run")
            assert len(honest.scores([PAIRS[0]])) == 1
            answered, pending = batches(), [not call.done() for call in calls]
            queued = metric(scrape(server), "rlhf_mesh_reward_queue_depth_samples", model="tiny")
            assert all(len(call.result().results) == len(long) for call in calls)
        flood_batches = batches() - start
        print(f"the flood took {flood_batches:.0f} batches; the other caller's call was answered after "
              f"{answered - sent:.0f}, with {queued:.0f} flood samples still queued")
        assert all(pending), "a flood call finished before the other caller's one sample"
        assert flood_batches > 100 and answered - sent <= 20 and queued > 0
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
