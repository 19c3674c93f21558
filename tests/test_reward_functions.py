"""Reward functions and composites in the RewardService, and the HTTP protocols of other
frameworks on its HTTP port, against a live server: built-in verifiers, a user function
loaded from a module, a composite's total against its components' own scores, functions that
raise, hang, kill their worker, miscount or allocate past their worker's memory (the server
goes on), the function pool's fair share between callers, queue bound and timeout counted
from arrival, and every HTTP endpoint's shapes and error codes over IPv4 and IPv6."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_mesh import reward_functions as functions
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import RewardClient
from rlhf_mesh.services.reward.settings import parse_composite
from rlhf_mesh.v1 import reward_pb2
from rlhf_mesh.worker_pool import FairQueue

from support import PYTHON, ROOT, ChildServer, free_port, metric, scrape, wait_for, write_tokens

USER = "reward_functions_for_tests"
FUNCTIONS = ["math", "exact", f"length={USER}:length", f"echo={USER}:echo_reference", f"raises={USER}:raises",
             f"hangs={USER}:hangs",
             f"kills={USER}:kills_its_worker", f"miscounts={USER}:wrong_count", f"nan={USER}:nan",
             f"waits={USER}:waits", f"allocates={USER}:allocates"]


def test_math_verifies_equivalent_answers():
    completions = [r"so the answer is $\frac{1}{2}$", r"The result: \boxed{0.6}", "1/2", "no answer here"]
    assert functions.math([""] * 4, completions, reference=["0.5"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert functions.math([""], [r"\boxed{\frac{2}{4}}"], reference=[r"$\frac{1}{2}$"]) == [1.0]
    assert functions.math([""], ["0.5"], reference=[None]) == [None]


def test_exact_regex_and_format():
    assert functions.exact(["", ""], [" Paris \n", "paris"], reference=["Paris", "Paris"]) == [1.0, 0.0]
    assert functions.regex(["", ""], ["id 42", "id x"], reference=[r"id \d+", r"id \d+"]) == [1.0, 0.0]
    assert functions.format_(["", ""], ["<think>because</think> 4", "4"]) == [1.0, 0.0]


def test_composite_specs():
    assert parse_composite("total=0.8*rm+0.2*math") == ("total", [(0.8, "rm"), (0.2, "math")])
    assert parse_composite("t = rm - .5 * len") == ("t", [(1.0, "rm"), (-0.5, "len")])
    for bad in ("total", "total=0.8*", "total=rm rm", "total=rm+rm"):
        with pytest.raises(ValueError, match="composite"):
            parse_composite(bad)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    http_port = free_port()
    args = [PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"rm={tiny_models['reward']}",
            *(f"--function={f}" for f in FUNCTIONS), "--composite", "total=0.8*rm+0.2*math",
            "--composite", "graded=1*echo+0.5*rm",
            "--composite", "broken=1*rm+1*raises", "--function-timeout-s", "3", "--function-workers", "2",
            "--function-worker-memory-mb", "512", "--http-port", str(http_port)]
    child = ChildServer(args, tmp_path_factory.mktemp("reward") / "server.log", env={"PYTHONPATH": str(ROOT / "tests")})
    wait_until_serving(child.address, timeout_s=300, alive=child.alive)
    child.http = f"http://127.0.0.1:{http_port}"
    child.http6 = f"http://[::1]:{http_port}"
    yield child
    assert child.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server.address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def rm(tiny_models):
    return (AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval(),
            AutoTokenizer.from_pretrained(tiny_models["reward"]))


def _sample(prompt: str, response: str, reference: str = "", **metadata: str) -> reward_pb2.ScoreSample:
    return reward_pb2.ScoreSample(text=reward_pb2.PromptResponse(prompt=prompt, response=response),
                                  reference=reference, metadata=metadata)


MATH = [_sample("What is 1/2 as a decimal?", r"It is \boxed{0.5}", "1/2"),
        _sample("What is 1/2 as a decimal?", r"It is \boxed{0.6}", "1/2"),
        _sample("Say hi", "hi")]  # no reference: math does not apply


def test_functions_score_through_grpc(client):
    reply = client.score(MATH, model="math")
    assert [(r.score, r.skipped) for r in reply.results] == [(1.0, False), (0.0, False), (0.0, True)]
    assert client.scores(MATH, model="length") == pytest.approx([len(s.text.response) / 10 for s in MATH])
    assert client.scores([_sample("q", "4", "4"), _sample("q", "four", "4")], model="exact") == [1.0, 0.0]


def test_a_composite_is_the_weighted_sum_of_its_components(client):
    rm_scores = client.scores(MATH, model="rm")
    math_results = client.score(MATH, model="math").results
    reply = client.score(MATH, model="total")
    for i, result in enumerate(reply.results):
        by_name = {c.name: c for c in result.components}
        assert by_name["rm"].score == pytest.approx(rm_scores[i]) and by_name["rm"].weight == pytest.approx(0.8)
        assert by_name["math"].skipped == math_results[i].skipped
        expected = 0.8 * rm_scores[i] + (0.0 if math_results[i].skipped else 0.2 * math_results[i].score)
        assert result.score == pytest.approx(expected, abs=1e-6)
    listed = {m.name: m for m in client.list_models()}
    assert listed["rm"].kind == reward_pb2.SCORER_KIND_MODEL and listed["rm"].is_default
    assert listed["math"].kind == reward_pb2.SCORER_KIND_FUNCTION and listed["length"].path == f"{USER}:length"
    assert listed["total"].kind == reward_pb2.SCORER_KIND_COMPOSITE
    assert [(p.name, round(p.weight, 3)) for p in listed["total"].parts] == [("rm", 0.8), ("math", 0.2)]


@pytest.mark.parametrize(("function", "code", "message"), [
    ("raises", grpc.StatusCode.INTERNAL, "raised RuntimeError (its message is in the server log"),
    ("hangs", grpc.StatusCode.DEADLINE_EXCEEDED, "ran past its 3 s timeout"),
    ("kills", grpc.StatusCode.INTERNAL, "killed its worker process (exit code 7)"),
    ("miscounts", grpc.StatusCode.INTERNAL, "returned 4 scores for 3 samples"),
    ("nan", grpc.StatusCode.INTERNAL, "a finite number or None is needed"),
    ("allocates", grpc.StatusCode.INTERNAL, "ran out of memory: its worker may use 512 MiB"),
    ("broken", grpc.StatusCode.INTERNAL, "reward function raises"),
])
def test_a_failing_function_fails_its_call_and_the_server_goes_on(client, function, code, message):
    with pytest.raises(grpc.RpcError) as err:
        client.score(MATH, model=function)
    assert err.value.code() == code and message in err.value.details(), err.value.details()
    # the worker was replaced: functions and models go on serving
    assert [r.score for r in client.score(MATH[:2], model="math").results] == [1.0, 0.0]
    assert len(client.scores(MATH, model="total")) == 3


def test_a_function_s_exception_text_goes_to_the_log_not_to_the_caller(server, client):
    with pytest.raises(grpc.RpcError) as err:
        client.score(MATH, model="raises")
    details = err.value.details()
    assert "this function always fails" not in details
    reference = details.rsplit("reference ", 1)[1].rstrip(")")
    log = wait_for(lambda: server.log() if reference in server.log() else "", what="the log line")
    assert "this function always fails" in log.split(f"reference {reference}", 1)[1]


@pytest.mark.parametrize("key", sorted(functions.RESERVED))
def test_metadata_may_not_shadow_the_function_arguments(client, key):
    with pytest.raises(grpc.RpcError) as err:
        client.score([MATH[0], reward_pb2.ScoreSample(text=reward_pb2.PromptResponse(prompt="q", response="2"),
                                                      reference="2", metadata={key: "x"})], model="math")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert f"samples[1]: metadata key {key!r} is reserved" in err.value.details()
    assert client.scores([_sample("q", r"\boxed{2}", "2", hint="x")], model="math") == [1.0]


def _waits(name: str, tmp_path, samples: int = 1) -> reward_pb2.ScoreRequest:
    """A call of `waits`: its responses are noted in tmp_path/calls.log when it starts, and it
    returns once tmp_path/gate exists."""
    gate, log = str(tmp_path / "gate"), str(tmp_path / "calls.log")
    return reward_pb2.ScoreRequest(model="waits", samples=[
        _sample("q", name if samples == 1 else f"{name}.{i}", gate=gate, log=log) for i in range(samples)])


def _started(tmp_path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_timeout_counts_from_arrival(server, tmp_path):
    """A call that waited out its timeout behind another fails without running (the server's
    two workers: one for this caller, one kept for the others). One address, so one connection:
    without tokens the caller is the peer."""
    with RewardClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
        running = client.stub.Score.future(_waits("A", tmp_path), timeout=60)
        wait_for(lambda: _started(tmp_path) == ["A"], what="A started")
        queued = client.stub.Score.future(_waits("B", tmp_path), timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            queued.result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "in the queue behind other calls" in err.value.details() and "it did not run" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            running.result()
        assert "ran past its 3 s timeout (counted from its arrival)" in err.value.details()
        assert _started(tmp_path) == ["A"]
        assert client.scores(MATH[:1], model="math") == [1.0]


def test_the_fair_queue_takes_callers_in_turn_and_keeps_workers_for_others():
    queue = FairQueue(per_caller=2)
    for i in range(4):
        queue.push("flood", f"f{i}")
    queue.push("honest", "h0")
    queue.push("honest", "h1", size=2)
    assert queue.depth == 7 and queue.largest() == "flood" and queue.newest("flood") == "f3"
    assert [queue.pop() for _ in range(4)] == ["f0", "h0", "f1", "h1"]
    assert queue.pop() is None  # each caller runs its share
    queue.done("flood")
    assert queue.pop() == "f2"
    queue.remove("flood", lambda item: item == "f3")
    assert queue.depth == 0 and queue.largest() is None and queue.pop() is None


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory):
    """Functions only, two callers by token, two workers (one per caller), four queued samples."""
    folder = tmp_path_factory.mktemp("pool")
    tokens = write_tokens(folder / "tokens.yaml", flood=["score"], honest=["score"])
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--function", "math",
                         "--function", f"waits={USER}:waits", "--function-workers", "2",
                         "--function-max-queued-samples", "4", "--function-timeout-s", "120",
                         "--tokens-file", str(folder / "tokens.yaml")],
                        folder / "server.log", env={"PYTHONPATH": str(ROOT / "tests")})
    wait_until_serving(child.address, timeout_s=300, alive=child.alive)
    child.tokens = tokens
    yield child
    assert child.stop() == 0


def _queued(server) -> float:
    return metric(scrape(server), "rlhf_mesh_reward_function_queue_depth_samples")


def test_a_flood_leaves_a_worker_and_room_for_other_callers(pool_server, tmp_path):
    """One caller floods the pool with calls that wait for the test's signal; another caller's
    calls run before the flood's queued ones, and the queue bound refuses the flood's excess
    (and pushes out its newest call to admit the other caller's)."""
    with RewardClient(pool_server.address, token=pool_server.tokens["flood"]) as flood, \
            RewardClient(pool_server.address, token=pool_server.tokens["honest"]) as honest:
        floods = [flood.stub.Score.future(_waits("F1", tmp_path), timeout=120)]
        wait_for(lambda: _started(tmp_path) == ["F1"], what="the flood's first call started")
        for i in range(2, 5):  # one at a time, so they queue in this order
            floods.append(flood.stub.Score.future(_waits(f"F{i}", tmp_path), timeout=120))
            wait_for(lambda i=i: _queued(pool_server) == i - 1, what=f"F{i} queued")

        assert honest.scores(MATH[:1], model="math", timeout_s=60) == [1.0]
        assert _started(tmp_path) == ["F1"]  # the flood's queued calls still wait

        with pytest.raises(grpc.RpcError) as err:  # 3 queued + 2 > 4, and the flood holds the most
            flood.stub.Score(_waits("F5", tmp_path, samples=2), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in err.value.details() and "retry in" in err.value.details()
        assert int(dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]) >= 1000

        other = honest.stub.Score.future(_waits("H", tmp_path, samples=2), timeout=120)
        with pytest.raises(grpc.RpcError) as err:  # the flood's newest call gave way
            floods[3].result()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pushed out" in err.value.details()
        wait_for(lambda: _started(tmp_path) == ["F1", "H.0 H.1"], what="the honest call started")

        (tmp_path / "gate").touch()
        assert [r.score for r in other.result().results] == [1.0, 1.0]
        assert [len(f.result().results) for f in floods[:3]] == [1, 1, 1]
    assert _started(tmp_path) == ["F1", "H.0 H.1", "F2", "F3"]
    metrics = scrape(pool_server)
    assert metric(metrics, "rlhf_mesh_reward_function_refused_calls_total", reason="full") == 1
    assert metric(metrics, "rlhf_mesh_reward_function_refused_calls_total", reason="evicted") == 1


def test_a_failing_function_fails_only_its_items_in_a_stream(client):
    requests = [reward_pb2.ScoreStreamRequest(request_id=f"{model}-{i}", model=model, sample=sample)
                for model in ("raises", "math") for i, sample in enumerate(MATH[:2])]
    replies = {r.request_id: r for r in client.stub.ScoreStream(iter(requests), timeout=60)}
    assert {r.request_id for r in replies.values() if r.HasField("error")} == {"raises-0", "raises-1"}
    assert replies["raises-0"].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert [replies[f"math-{i}"].result.score for i in range(2)] == [1.0, 0.0]


def test_functions_refuse_token_ids_and_unknown_names(client):
    with pytest.raises(grpc.RpcError) as err:
        client.score([[5, 6, 7]], model="math")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "samples[0]" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.score(MATH, model="no-such")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _post(url: str, body, token: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _logit(rm, ids: list[int]) -> float:
    with torch.no_grad():
        return rm[0](torch.tensor([ids])).logits[0, 0].item()


@pytest.mark.parametrize("family", ["http", "http6"])
def test_openrlhf_get_reward(server, rm, family):
    """A query is scored as the text the policy saw, tokenized without added special tokens."""
    _, tokenizer = rm
    queries = ["<|user|>\nHi<|end|>\n<|assistant|>\nHello, glad to help.<|end|>", "Just a sentence."]
    status, reply = _post(f"{getattr(server, family)}/get_reward", {"query": queries, "prompts": ["", ""]})
    assert status == 200, reply
    expected = [_logit(rm, tokenizer(q, add_special_tokens=False).input_ids) for q in queries]
    assert reply["rewards"] == pytest.approx(expected, abs=1e-4) and reply["scores"] == reply["rewards"]
    assert reply["extra_logs"] == {}

    prompts = ["What is 1/2 as a decimal? ", "What is 1/2 as a decimal? "]
    queries = [p + r"It is \boxed{0.5}" for p in prompts[:1]] + [prompts[1] + r"It is \boxed{0.6}"]
    status, reply = _post(f"{server.http}/total/get_reward", {"query": queries, "prompts": prompts,
                                                              "labels": ["0.5", "0.5"]})
    assert status == 200, reply
    assert reply["extra_logs"]["math"] == [1.0, 0.0]
    assert reply["rewards"] == pytest.approx([0.8 * r + 0.2 * m for r, m in zip(
        reply["extra_logs"]["rm"], reply["extra_logs"]["math"], strict=True)], abs=1e-6)


def test_vllm_classify_and_pooling(server, rm):
    _, tokenizer = rm
    text = "A kind and helpful answer."
    raw = _logit(rm, tokenizer(text).input_ids)  # text input: special tokens added, as vLLM does
    status, reply = _post(f"{server.http}/classify", {"model": "rm", "input": text, "use_activation": False})
    assert status == 200, reply
    assert reply["object"] == "list" and reply["model"] == "rm" and reply["usage"]["prompt_tokens"] > 0
    assert reply["data"][0]["index"] == 0 and reply["data"][0]["probs"][0] == pytest.approx(raw, abs=1e-4)
    status, reply = _post(f"{server.http}/classify", {"input": [text, text]})
    assert [d["probs"][0] for d in reply["data"]] == pytest.approx([1 / (1 + math.exp(-raw))] * 2, abs=1e-4)
    status, reply = _post(f"{server.http6}/pooling", {"input": [[5, 6, 7], [8, 9]]})
    assert status == 200, reply
    assert [d["data"][0] for d in reply["data"]] == pytest.approx([_logit(rm, [5, 6, 7]), _logit(rm, [8, 9])],
                                                                   abs=1e-4)


def test_json_score_is_the_protos_json_form(server, client):
    body = {"model": "math", "samples": [{"text": {"prompt": "q", "response": r"\boxed{2}"}, "reference": "2"}]}
    status, reply = _post(f"{server.http}/v1/score", body)
    assert status == 200, reply
    assert reply == {"model": "math", "results": [{"score": 1.0, "truncated": False, "numTokens": 0, "modelVersion": "",
                                                   "components": [], "skipped": False}]}
    status, reply = _post(f"{server.http}/rm/v1/score", {"samples": [{"tokenIds": {"ids": [5, 6, 7]}}]})
    assert reply["results"][0]["score"] == pytest.approx(client.scores([[5, 6, 7]], model="rm")[0], abs=1e-6)


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/get_reward", b"{not json", 400, "the body must be JSON"),
    ("/get_reward", [1, 2], 400, "a JSON object"),
    ("/get_reward", {"prompts": []}, 400, "query: required"),
    ("/get_reward", {"query": "one string"}, 400, "query: must be a list of strings"),
    ("/get_reward", {"query": ["a", "b"], "labels": ["x"]}, 400, "labels: 1 items for 2 queries"),
    ("/get_reward", {"query": ["a"] * 1025}, 400, "more than max_request_samples=1024"),
    ("/classify", {"input": {"text": "x"}}, 400, "input: a text"),
    ("/classify", {"input": "x", "use_activation": "no"}, 400, "use_activation"),
    ("/classify", {"model": "nope", "input": "x"}, 404, "no reward model named 'nope'"),
    ("/v1/score", {"samples": [{"txt": {}}]}, 400, "txt"),
    ("/math/get_reward", {"query": ["x"], "labels": ["1"]}, 200, ""),
    ("/hangs/get_reward", {"query": ["x"]}, 504, "timeout"),
])
def test_http_errors_name_the_field(server, path, body, status, message):
    got, reply = _post(server.http + path, body)
    assert got == status, reply
    if message:
        assert message in reply["error"]["message"], reply


def test_http_tokens_and_overload(tiny_models, tmp_path):
    """The HTTP port checks the same tokens as gRPC (401 without, 403 without the score role) and
    answers 400 to a call larger than the model's whole queue (429 would say: retry)."""
    tokens = write_tokens(tmp_path / "tokens.yaml", trainer=["score"], ui=["monitor"])
    http_port = free_port()
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"rm={tiny_models['reward']}",
                         "--tokens-file", str(tmp_path / "tokens.yaml"), "--max-queued-samples", "2",
                         "--http-port", str(http_port)],
                        tmp_path / "server.log")
    try:
        wait_until_serving(child.address, timeout_s=300, alive=child.alive)
        url = f"http://127.0.0.1:{http_port}/get_reward"
        assert _post(url, {"query": ["x"]})[0] == 401
        assert _post(url, {"query": ["x"]}, token="wrong-token-0123456789")[0] == 401
        assert _post(url, {"query": ["x"]}, token=tokens["ui"])[0] == 403
        assert _post(url, {"query": ["x"]}, token=tokens["trainer"])[0] == 200
        status, reply = _post(url, {"query": ["x", "y", "z"]}, token=tokens["trainer"])
        assert status == 400 and "more than the queue's max_queued_samples=2" in reply["error"]["message"]
    finally:
        assert child.stop() == 0


@pytest.mark.slow
async def test_references_flow_from_the_dataset_through_the_learner(tiny_models, server, generation_server, tmp_path):
    """Each prompt's `answer` reaches the function as that prompt's samples' reference: the
    `echo` component of every step is the mean answer of the step's prompts."""
    from rlhf_mesh.services.learner.run import Run
    from rlhf_mesh.services.learner.settings import LearnerSettings

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}:", "answer": i}) + "\n" for i in range(1, 9)))
    run = Run(LearnerSettings(
        policy=str(tiny_models["policy"]), generation=[generation_server.address], reward=server.address,
        reward_model="graded", prompts=prompts, reference_field="answer", output_dir=tmp_path / "run", steps=2,
        batch_size=4, num_samples_per_prompt=2, advantage_estimator="grpo", response_length=8, seed=0,
    ))
    try:
        await run.start()
        for step in range(2):
            answers = [float(r) for r in run.dataset.batch_references(step, 4)]
            scalars = await run.run_step()
            assert scalars["rewards/echo_mean"] == pytest.approx(sum(answers) / 4)
            assert scalars["charts/reward_mean"] == pytest.approx(
                scalars["rewards/echo_mean"] + 0.5 * scalars["rewards/rm_mean"], abs=1e-5)
    finally:
        await run.close()
