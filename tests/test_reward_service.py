"""RewardService end to end: a real server process, the tiny reward model, real gRPC."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import RewardClient, score_request, to_sample
from rlhf_mesh.services.reward.reward_model import weights_version
from rlhf_mesh.v1 import common_pb2, reward_pb2, reward_pb2_grpc

from support import PYTHON, ROOT, ChildServer, metric, scrape, wait_for

MAX_LENGTH = 96
SERVE = [PYTHON, "-m", "rlhf_mesh", "serve", "reward"]
PAIRS = [
    ("Hi", "Hello!"),
    ("Please explain why the sky is blue in simple words.", "Because air scatters blue light more."),
    ("What is 2 + 2?", "The answer is 4. Thank you, that is very helpful and kind of you."),
    ("", "A response to an empty prompt."),
    ("A prompt whose sampled response was EOS at once.", ""),
]


def _start(tmp: Path, model: Path, *flags: str) -> ChildServer:
    server = ChildServer([*SERVE, "--model", f"tiny={model}", *flags], tmp / f"reward{len(flags)}.log")
    wait_until_serving(server.address, timeout_s=300, alive=server.alive)
    return server


@pytest.fixture(scope="module")
def reward_server(tiny_models, tmp_path_factory):
    server = _start(tmp_path_factory.mktemp("reward"), tiny_models["reward"], "--max-length", str(MAX_LENGTH))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def reference(tiny_models):
    """The reward model's own forward pass on one sample at a time."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()

    def score(ids: list[int]) -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    def render(messages: list[dict[str, str]]) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    return score, render, tokenizer


def test_scores_equal_the_models_own_forward_pass(reward_server, reference):
    score, render, _ = reference
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, friend."}]
    with RewardClient(reward_server.address) as client:
        reply = client.score([*PAIRS, chat, [5, 6, 7, 8, 9]])
    assert reply.model == "tiny" and len(reply.results) == len(PAIRS) + 2
    expected_ids = [render([{"role": "user", "content": p}, {"role": "assistant", "content": r}]) for p, r in PAIRS]
    expected_ids += [render(chat), [5, 6, 7, 8, 9]]
    for result, ids in zip(reply.results, expected_ids, strict=True):
        assert result.num_tokens == len(ids) and not result.truncated
        assert result.score == pytest.approx(score(ids), abs=1e-5)


def test_concurrent_callers_are_batched_and_scores_are_batch_invariant(reward_server):
    texts = [(f"Question number {i}: " + "tell me more " * (i % 7), "An answer. " * (1 + i % 5)) for i in range(64)]
    with RewardClient(reward_server.address) as client:
        alone = [client.scores([t])[0] for t in texts[:8]]
        before = scrape(reward_server)
        together: dict[int, float] = {}

        def call(i: int) -> None:
            together[i] = client.scores([texts[i]])[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    after = scrape(reward_server)
    batches = metric(after, "rlhf_mesh_reward_batch_size_samples_count", model="tiny") - metric(
        before, "rlhf_mesh_reward_batch_size_samples_count", model="tiny")
    samples = metric(after, "rlhf_mesh_reward_batch_size_samples_sum", model="tiny") - metric(
        before, "rlhf_mesh_reward_batch_size_samples_sum", model="tiny")
    assert samples == len(texts)
    assert batches < len(texts), "concurrent single-sample calls were never batched together"
    for i, score in enumerate(alone):
        assert together[i] == pytest.approx(score, abs=1e-5)
    assert metric(after, "rlhf_mesh_reward_tokens_total", model="tiny", kind="real") > 0
    # some batches were padded, within the default max_padding_ratio, and the scores above held
    padding = [metric(m, "rlhf_mesh_reward_tokens_total", model="tiny", kind="padding") for m in (before, after)]
    assert padding[1] > padding[0]


def test_over_long_prompt_is_truncated_from_the_left(reward_server, reference):
    score, render, _ = reference
    prompt, response = "Tell me a long story. " * 60, "Once upon a time."
    with RewardClient(reward_server.address) as client:
        result = client.score([(prompt, response)]).results[0]
    ids = render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    assert len(ids) > MAX_LENGTH
    assert result.truncated and result.num_tokens == MAX_LENGTH
    assert result.score == pytest.approx(score(ids[-MAX_LENGTH:]), abs=1e-5)


@pytest.mark.parametrize(
    ("samples", "model", "code", "message"),
    [
        ([], "", grpc.StatusCode.INVALID_ARGUMENT, "samples is empty"),
        ([("a", "b"), reward_pb2.ScoreSample()], "", grpc.StatusCode.INVALID_ARGUMENT, "samples[1]: has no input"),
        ([[1, 2], [3, 10**6]], "", grpc.StatusCode.INVALID_ARGUMENT,
         "samples[1]: token id 1000000 is outside the vocabulary"),
        ([reward_pb2.ScoreSample(token_ids=common_pb2.TokenIds())], "", grpc.StatusCode.INVALID_ARGUMENT,
         "samples[0]: token_ids is empty"),
        ([reward_pb2.ScoreSample(chat=common_pb2.Conversation())], "", grpc.StatusCode.INVALID_ARGUMENT,
         "samples[0]: chat has no messages"),
        ([("a", "b")] * 1025, "", grpc.StatusCode.INVALID_ARGUMENT, "more than max_request_samples=1024"),
        ([("a", "b")], "nope", grpc.StatusCode.NOT_FOUND, "no reward model named 'nope'"),
        ([("a", "x" * (70 << 20))], "", grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ([("a", "b"), [{"role": "user", "content": "é" * 5000}] * 200], "", grpc.StatusCode.INVALID_ARGUMENT,
         "samples[1]: is 2002404 bytes, more than max_sample_bytes=1048576"),
    ],
    ids=["empty", "no-input", "oov", "empty-ids", "empty-chat", "too-many", "unknown-model",
         "too-large", "huge-sample"],
)
def test_bad_input_gets_a_precise_status(reward_server, samples, model, code, message):
    # A raw channel that may send more than the server accepts: the server must refuse it.
    with grpc.insecure_channel(reward_server.address, options=[("grpc.max_send_message_length", 128 << 20)]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            reward_pb2_grpc.RewardServiceStub(ch).Score(score_request(samples, model), timeout=30)
        assert err.value.code() == code
        assert message in err.value.details()
    with RewardClient(reward_server.address) as client:  # nothing was poisoned
        assert len(client.scores([("a", "b")])) == 1


def test_score_stream_answers_each_item_and_survives_bad_ones(reward_server):
    items = [
        reward_pb2.ScoreStreamRequest(request_id="good-1", sample=to_sample(PAIRS[0])),
        reward_pb2.ScoreStreamRequest(request_id="bad-1", sample=reward_pb2.ScoreSample()),
        reward_pb2.ScoreStreamRequest(request_id="bad-2", model="nope", sample=to_sample(PAIRS[1])),
        reward_pb2.ScoreStreamRequest(request_id="good-2", sample=to_sample(PAIRS[1])),
    ]
    with RewardClient(reward_server.address) as client:
        replies = {r.request_id: r for r in client.stub.ScoreStream(iter(items), timeout=30)}
        direct = client.scores(PAIRS[:2])
    assert set(replies) == {"good-1", "bad-1", "bad-2", "good-2"}
    assert replies["good-1"].result.score == pytest.approx(direct[0], abs=1e-5)
    assert replies["good-2"].result.score == pytest.approx(direct[1], abs=1e-5)
    assert replies["bad-1"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "has no input" in replies["bad-1"].error.message
    assert replies["bad-2"].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_list_models_reports_the_weights_version(reward_server, tiny_models):
    with RewardClient(reward_server.address) as client:
        (info,) = client.list_models()
        result = client.score([PAIRS[0]]).results[0]
    assert (info.name, info.path, info.dtype, info.backend) == ("tiny", str(tiny_models["reward"]), "float32",
                                                                "transformers")
    assert info.version == weights_version(tiny_models["reward"]) == result.model_version
    assert info.max_length_tokens == MAX_LENGTH and info.is_default


def test_health_answers_while_a_batch_computes(reward_server):
    big = [("Tell me more. " * 20, "Sure, here it is. " * 8)] * 1024
    with grpc.insecure_channel(reward_server.address) as channel, RewardClient(reward_server.address) as client:
        batches = metric(scrape(reward_server), "rlhf_mesh_reward_queue_wait_seconds_count")
        call = client.stub.Score.future(reward_pb2.ScoreRequest(samples=[to_sample(s) for s in big]), timeout=120)
        wait_for(lambda: metric(scrape(reward_server), "rlhf_mesh_reward_queue_wait_seconds_count") > batches,
                 what="a batch of the call starts")
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert not call.done(), "the batch finished before the health check could overlap it"
        assert len(call.result().results) == len(big)


def test_health_answers_while_a_large_call_is_tokenized(reward_server):
    """Tokenizing 4 MB of text takes the server seconds; it runs off the event loop, so a health
    check sent meanwhile is answered while the call still holds its room for tokenizing."""
    large = [("Tell me more about the old river. " * 30_000, "Sure.")] * 4

    def tokenizing() -> float:
        return metric(scrape(reward_server), "rlhf_mesh_reward_queue_reserved_tokens", model="tiny")

    with grpc.insecure_channel(reward_server.address) as channel, RewardClient(reward_server.address) as client:
        call = client.stub.Score.future(score_request(large, ""), timeout=120)
        wait_for(tokenizing, what="the call is being tokenized")
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert tokenizing() > 0, "the health check was answered only after the tokenizing"
        assert all(r.truncated for r in call.result().results)
    assert tokenizing() == 0


def test_truncation_error_mode(tiny_models, tmp_path):
    server = _start(tmp_path, tiny_models["reward"], "--max-length", "32", "--truncation", "error")
    try:
        with RewardClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
            client.score([("short", "ok"), ("long " * 40, "ok")])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(r"samples\[1\]: is \d+ tokens, longer than the model's 32", err.value.details())
    finally:
        server.stop()


def test_cancelled_samples_are_not_computed_and_admission_is_decided_before_the_work(tiny_models, tmp_path):
    """A queue of 4 samples and 1500 tokens: a call that does not fit now is refused before it is
    tokenized, with a retry hint gRPC's retry policy honours; one that can never fit gets
    INVALID_ARGUMENT naming the limit, full queue or not."""
    server = _start(tmp_path, tiny_models["reward"], "--max-wait-ms", "3000", "--max-queued-samples", "4",
                    "--max-queued-tokens", "1500", "--max-sample-bytes", str(4 << 20))
    try:
        with RewardClient(server.address) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.score([PAIRS[0], PAIRS[1]], timeout_s=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: metric(scrape(server), "rlhf_mesh_reward_dropped_samples_total", model="tiny") == 2,
                     what="the two abandoned samples are dropped")
            assert metric(scrape(server), "rlhf_mesh_reward_tokens_total", model="tiny", kind="real") == 0

            with pytest.raises(grpc.RpcError) as err:  # more tokens than the queue holds, on an empty queue
                client.score([[5] * 1000, [6] * 1000])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "2000 tokens, more than the queue's max_queued_tokens=1500" in err.value.details()

            waiting = client.stub.Score.future(client_request := reward_pb2.ScoreRequest(
                samples=[to_sample(p) for p in PAIRS[:4]]), timeout=30)  # fills the queue of 4
            wait_for(lambda: metric(scrape(server), "rlhf_mesh_reward_queue_depth_samples", model="tiny") == 4,
                     what="the queue is full")
            # Tokenizing these 12 MB would take the server longer than the queued batch waits (3 s).
            for refused in ([PAIRS[0]], [("Tell me more. " * 200_000, "Sure.")] * 4):
                with pytest.raises(grpc.RpcError) as err:
                    client.score(refused, timeout_s=30)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_queued_samples=4" in err.value.details()
                assert int(dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]) > 0
            with pytest.raises(grpc.RpcError) as err:  # can never fit: not "retry later"
                client.score(PAIRS[:5], timeout_s=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "5 samples, more than the queue's max_queued_samples=4" in err.value.details()
            assert not waiting.done(), "refused at once, not after the queued batch ran"
            assert len(waiting.result().results) == len(client_request.samples)
    finally:
        server.stop()


def test_score_cli_prompt_and_jsonl(reward_server, tmp_path):
    cli = [str(Path(sys.executable).parent / "rlhf-mesh"), "score", "--addr", reward_server.address]
    one = subprocess.run([*cli, "--prompt", PAIRS[1][0], "--response", PAIRS[1][1]],
                         capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    out = tmp_path / "scores.jsonl"
    many = subprocess.run([*cli, "--input", str(pairs), "--output", str(out), "--batch-size", "3"],
                          capture_output=True, text=True, timeout=60)
    assert many.returncode == 0, many.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    with RewardClient(reward_server.address) as client:
        direct = client.scores(PAIRS)
    assert [r["prompt"] for r in rows] == [p for p, _ in PAIRS]
    assert [r["score"] for r in rows] == pytest.approx(direct, abs=1e-6)
    assert json.loads(one.stdout)["score"] == pytest.approx(direct[1], abs=1e-6)


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm")
def test_nodejs_client_scores_a_pair(reward_server):
    example = ROOT / "clients" / "node"
    if not (example / "node_modules" / "@grpc" / "grpc-js").is_dir():
        install = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=example,
                                 capture_output=True, text=True, timeout=300)
        assert install.returncode == 0, install.stderr
    run = subprocess.run(["node", "score.js", reward_server.address, *PAIRS[2]], cwd=example,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    with RewardClient(reward_server.address) as client:
        direct = client.scores([PAIRS[2]])[0]
    reply = json.loads(run.stdout)
    assert reply["model"] == "tiny"
    assert reply["score"] == pytest.approx(direct, abs=1e-6)


@pytest.mark.slow
def test_vllm_backend_returns_raw_logits_equal_to_transformers(tiny_models, tmp_path, reference):
    score, render, _ = reference
    server = _start(tmp_path, tiny_models["reward"], "--backend", "vllm", "--max-length", str(MAX_LENGTH))
    try:
        with RewardClient(server.address, timeout_s=120) as client:
            reply = client.score([*PAIRS, [5, 6, 7, 8, 9]])
            (info,) = client.list_models()
        engine = psutil.Process(server.process.pid).children(recursive=True)
        assert engine  # vLLM's engine core runs in processes of its own
        server.process.terminate()
        assert server.process.wait(60) == 0
        _, left = psutil.wait_procs(engine, timeout=30)
        assert not left, "the server's exit left vLLM's engine processes running"
    finally:
        server.stop()
    assert info.backend == "vllm"
    expected = [render([{"role": "user", "content": p}, {"role": "assistant", "content": r}]) for p, r in PAIRS]
    for result, ids in zip(reply.results, [*expected, [5, 6, 7, 8, 9]], strict=True):
        # A sigmoid would map every logit into (0, 1); raw logits of this model are spread around 0.
        assert result.score == pytest.approx(score(ids), abs=1e-5)


def test_reload_swaps_the_model_without_failing_a_call(tiny_models, tmp_path, reference):
    score_a, render, _ = reference
    flipped = tmp_path / "flipped"
    model_b = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()
    with torch.no_grad():
        model_b.score.weight.mul_(-3)
    model_b.save_pretrained(flipped)
    AutoTokenizer.from_pretrained(tiny_models["reward"]).save_pretrained(flipped)
    ids = render([{"role": "user", "content": PAIRS[1][0]}, {"role": "assistant", "content": PAIRS[1][1]}])
    with torch.no_grad():
        score_b = model_b(input_ids=torch.tensor([ids])).logits[0, 0].item()
    version_a, version_b = weights_version(tiny_models["reward"]), weights_version(flipped)
    expected = {version_a: score_a(ids), version_b: score_b}

    server = _start(tmp_path, tiny_models["reward"])
    results, errors, stop = [], [], threading.Event()

    def call_continuously() -> None:
        with RewardClient(server.address) as client:
            while not stop.is_set():
                try:
                    results.append(client.score([PAIRS[1]]).results[0])
                except grpc.RpcError as err:
                    errors.append(err)

    callers = [threading.Thread(target=call_continuously) for _ in range(4)]
    try:
        for caller in callers:
            caller.start()
        wait_for(lambda: len(results) >= 8, what="the callers score")
        with RewardClient(server.address) as client:
            info = client.reload_model("tiny", str(flipped))
            assert info.version == version_b and info.path == str(flipped)
            with pytest.raises(grpc.RpcError) as err:
                client.reload_model("tiny", str(tmp_path / "missing"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "missing" in err.value.details()
            wait_for(lambda: sum(r.model_version == version_b for r in results) >= 8, what="the callers get B")
            stop.set()
            for caller in callers:
                caller.join()
            after = client.score([PAIRS[1]]).results[0]
            assert [m.version for m in client.list_models()] == [version_b]
    finally:
        stop.set()
        server.stop()
    assert not errors
    assert {r.model_version for r in results} == {version_a, version_b}
    for result in results:  # every score is the forward pass of the version it reports
        assert result.score == pytest.approx(expected[result.model_version], abs=1e-5)
    assert after.model_version == version_b and after.score == pytest.approx(score_b, abs=1e-5)


def test_the_old_name_of_max_queued_samples_still_works_with_a_warning():
    from rlhf_mesh.services.reward.settings import RewardSettings
    from rlhf_mesh.settings import SettingsError, load_settings

    with pytest.warns(FutureWarning, match=r"max_queue_samples .*is deprecated.*: use max_queued_samples"):
        assert load_settings(RewardSettings, ["--model", "m", "--max-queue-samples", "7"], "reward"
                             ).max_queued_samples == 7
    with pytest.raises(SettingsError, match="max_queue_samples is the old name of max_queued_samples"):
        load_settings(RewardSettings, ["--model", "m", "--max-queue-samples", "7", "--max-queued-samples", "8"],
                      "reward")
