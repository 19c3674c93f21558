"""GenerationService end to end: a real server process running vLLM on the tiny policy, real gRPC."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_mesh.clients.generation import generate_request
from rlhf_mesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from support import MAX_MODEL_LEN, PYTHON, ROOT, ChildServer, greedy, metric, scrape, wait_for

pytestmark = pytest.mark.slow  # a vLLM engine

PROMPTS = ["Hello there", [5, 6, 7, 8, 9], [{"role": "user", "content": "What is the capital of France?"}]]
# float32 on both sides; vLLM's CPU kernels and the HF forward differ by ~1e-6 in a log-softmax over 615 logits.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def policy(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()


def _logits(policy, sample: generation_pb2.Sample) -> torch.Tensor:
    """The policy's logits at every completion position, from one forward pass."""
    ids = [*sample.prompt_token_ids, *sample.completion_token_ids]
    with torch.no_grad():
        return policy(torch.tensor([ids])).logits[0, len(sample.prompt_token_ids) - 1 : -1]


def test_greedy_output_equals_transformersgreedy(generation_client, policy, tiny_models):
    samples = sorted(generation_client.generate(PROMPTS, max_tokens=24, temperature=0, ignore_eos=True),
                     key=lambda s: s.prompt_index)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    assert list(samples[0].prompt_token_ids) == tokenizer("Hello there")["input_ids"]
    assert list(samples[1].prompt_token_ids) == PROMPTS[1]
    assert list(samples[2].prompt_token_ids) == list(
        tokenizer.apply_chat_template(PROMPTS[2], add_generation_prompt=True, tokenize=True, return_dict=False))
    for sample in samples:
        assert list(sample.completion_token_ids) == greedy(policy, sample.prompt_token_ids, 24)
        assert sample.text == tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)
        assert sample.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert (sample.policy_version_start, sample.policy_version_end) == (0, 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_forward_pass(generation_client, policy, temperature):
    """completion_logprobs are under the sampling distribution: log_softmax(logits / temperature)."""
    samples = generation_client.generate(PROMPTS, n=2, max_tokens=32, temperature=temperature, seed=11,
                                         ignore_eos=True)
    for sample in samples:
        logprobs = torch.log_softmax(_logits(policy, sample) / temperature, dim=-1)
        expected = logprobs[torch.arange(len(sample.completion_token_ids)), list(sample.completion_token_ids)]
        assert torch.allclose(torch.tensor(list(sample.completion_logprobs)), expected, atol=LOGPROB_TOLERANCE)


def test_seeded_samples_are_reproducible_and_distinct(generation_client):
    def run(seed: int) -> dict[tuple[int, int], list[int]]:
        samples = generation_client.generate(PROMPTS[:2], n=4, max_tokens=16, temperature=1.0, seed=seed)
        return {(s.prompt_index, s.sample_index): list(s.completion_token_ids) for s in samples}

    first, again, other = run(5), run(5), run(6)
    assert len(first) == 8
    assert first == again
    assert first != other
    assert len({tuple(tokens) for tokens in first.values()}) == 8  # every sample drew its own noise


def test_seeded_prompts_longer_than_one_engine_step_are_served(generation_client):
    """More seeded prompt tokens than vLLM schedules in one step (2048): on CPU a prefill split over
    steps killed the engine (it rewinds a seeded generator by an offset CPU generators lack)."""
    prompts = [[5 + (i + j) % 200 for j in range(200)] for i in range(16)]
    samples = list(generation_client.generate(prompts, n=2, max_tokens=4, temperature=1.0, seed=3))
    assert len(samples) == 32 and all(len(s.completion_token_ids) == 4 for s in samples)
    assert len(list(generation_client.generate(["Hello"], max_tokens=2))) == 1  # and the engine goes on


def test_samples_stream_as_they_finish(generation_client):
    """A sample that stops after two tokens arrives while a long one of the same request still runs."""
    greedy = {s.prompt_index: list(s.completion_token_ids)
              for s in generation_client.generate(PROMPTS[:2], max_tokens=160, temperature=0, ignore_eos=True)}
    stop = next(t for t in greedy[0][1:] if t not in greedy[1])
    stop_at = greedy[0].index(stop) + 1
    events = list(generation_client.generate(PROMPTS[:2], max_tokens=160, temperature=0, ignore_eos=True,
                                  stop_token_ids=[stop], stream_tokens=True))
    samples = [(i, e.sample) for i, e in enumerate(events) if e.HasField("sample")]
    assert [s.prompt_index for _, s in samples] == [0, 1]
    short_at, short = samples[0]
    assert len(short.completion_token_ids) == stop_at
    assert short.finish_reason == generation_pb2.FINISH_REASON_STOP
    later_deltas = [e.delta for e in events[short_at:] if e.HasField("delta") and e.delta.prompt_index == 1]
    assert sum(len(d.token_ids) for d in later_deltas) > 100  # the long sample was mostly still to come
    deltas = [t for e in events if e.HasField("delta") and e.delta.prompt_index == 1 for t in e.delta.token_ids]
    assert deltas == list(samples[1][1].completion_token_ids) == greedy[1]


def test_stop_strings_end_the_text(generation_client):
    greedy = next(generation_client.generate(PROMPTS[:1], max_tokens=24, temperature=0, ignore_eos=True))
    stop = greedy.text[len(greedy.text) // 2 :][:3]
    stopped = next(generation_client.generate(PROMPTS[:1], max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))
    assert stopped.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert stopped.text == greedy.text[: greedy.text.index(stop)]


def _idle(generation_server: ChildServer) -> str:
    """Metrics once the service holds no admitted sample and vLLM no request running or waiting
    (a call's samples are counted as admitted before vLLM sees them)."""
    def metrics_if_idle() -> str | None:
        text = scrape(generation_server)
        busy = sum(metric(text, name) for name in (
            "rlhf_mesh_generation_queued_samples", "vllm:num_requests_running", "vllm:num_requests_waiting"))
        return None if busy else text

    return wait_for(metrics_if_idle, what="no admitted samples and vLLM having no requests")


def test_cancel_and_deadline_abort_engine_requests(generation_server, generation_client):
    tokens = "vllm:generation_tokens_total"
    before = metric(_idle(generation_server), tokens)
    stub = generation_client.stub
    # 768 samples of 192 tokens: more than the engine finishes in the seconds a cancel can
    # take to arrive when the engine holds both cores, and more than it finishes in 15 s.
    prompts, n, max_tokens = PROMPTS * 8, 32, MAX_MODEL_LEN - 64
    all_tokens = len(prompts) * n * max_tokens
    call = stub.Generate(generate_request(prompts, n=n, max_tokens=max_tokens, ignore_eos=True, stream_tokens=True),
                         timeout=60)
    next(call)  # generating
    call.cancel()
    after_cancel = _idle(generation_server)
    assert metric(after_cancel, tokens) - before < all_tokens  # cut short, not run to the end
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(generate_request(prompts, n=n, max_tokens=max_tokens, ignore_eos=True), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    idle = _idle(generation_server)  # the queue drains: a cancel or deadline releases every sample
    # Nothing keeps generating for nobody: once idle, the token count grows by what the next call
    # generates and nothing more.
    assert len(next(generation_client.generate(PROMPTS[:1], max_tokens=4, ignore_eos=True)).completion_token_ids) == 4
    wait_for(lambda: metric(scrape(generation_server), tokens) == metric(idle, tokens) + 4,
             what="vLLM counting the 4 tokens of the next call, and no others")


def test_min_policy_version_waits_until_the_deadline_then_fails(generation_server, generation_client):
    """A call for a version not served yet waits at the server (counted as waiting), then is answered
    FAILED_PRECONDITION before its deadline: the client's own deadline would say DEADLINE_EXCEEDED."""
    import threading

    assert next(generation_client.generate(PROMPTS[:1], max_tokens=2, min_policy_version=0)).policy_version_end == 0
    def refused(text: str) -> float:
        return metric(text, "rlhf_mesh_generation_requests_total", status="failed_precondition")

    before = refused(scrape(generation_server))
    errors: list[grpc.RpcError] = []

    def call() -> None:
        try:
            list(generation_client.generate(PROMPTS[:1], max_tokens=2, min_policy_version=1, timeout_s=8.0))
        except grpc.RpcError as err:
            errors.append(err)

    waiting = threading.Thread(target=call)
    waiting.start()
    wait_for(lambda: metric(scrape(generation_server), "rlhf_mesh_generation_waiting_calls") == 1,
             timeout_s=8, what="the call waiting for version 1")
    waiting.join(timeout=60)
    err, = errors
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "min_policy_version 1 was not reached before the deadline" in err.details()
    after = scrape(generation_server)
    assert metric(after, "rlhf_mesh_generation_waiting_calls") == 0 and refused(after) == before + 1


def _prompt(**kind) -> common_pb2.Prompt:
    return common_pb2.Prompt(**kind)


TEXT = [_prompt(text="Hi")]


@pytest.mark.parametrize(
    ("prompts", "sampling", "message"),
    [
        ([], {}, "prompts is empty"),
        ([_prompt(text="")], {}, "prompts[0]: empty prompt"),
        ([*TEXT, _prompt()], {}, "prompts[1]: no prompt given"),
        ([*TEXT, _prompt(token_ids=common_pb2.TokenIds())], {}, "prompts[1]: empty prompt"),
        ([*TEXT, _prompt(chat=common_pb2.Conversation())], {}, "prompts[1]: empty chat"),
        ([*TEXT, _prompt(token_ids=common_pb2.TokenIds(ids=[1] * MAX_MODEL_LEN))], {},
         "prompts[1]: 256 prompt tokens + max_tokens 16 exceed max_model_len 256"),
        ([*TEXT, _prompt(token_ids=common_pb2.TokenIds(ids=[3, 615]))], {},
         "prompts[1].token_ids[1]: 615 is outside the vocabulary"),
        ([*TEXT, _prompt(text="é" * (1 << 19))], {}, "prompts[1]: 1048580 bytes, more than max_prompt_bytes=1048576"),
        (TEXT, {"max_tokens": 0}, "sampling.max_tokens must be >= 1"),
        (TEXT, {"max_tokens": MAX_MODEL_LEN}, "sampling.max_tokens 256 leaves no room"),
        (TEXT, {"n": 0}, "sampling.n must be in [1, 64]"),
        (TEXT, {"n": 65}, "sampling.n must be in [1, 64]"),
        (TEXT, {"temperature": -0.5}, "sampling.temperature must be a finite number >= 0"),
        (TEXT, {"temperature": float("nan")}, "sampling.temperature must be a finite number >= 0"),
        (TEXT, {"top_p": 0.0}, "sampling.top_p must be in (0, 1]"),
        (TEXT, {"top_p": 1.5}, "sampling.top_p must be in (0, 1]"),
        (TEXT, {"top_k": -2}, "sampling.top_k must be -1, 0 or positive"),
        (TEXT, {"stop_token_ids": [9999]}, "sampling.stop_token_ids[0]: 9999 is outside the vocabulary"),
        (TEXT, {"stop": [""]}, "sampling.stop: empty stop string"),
    ],
)
def test_bad_input_is_refused_before_the_engine(generation_server, generation_client, prompts, sampling, message):
    before = metric(scrape(generation_server), "vllm:prompt_tokens_total")
    request = generation_pb2.GenerateRequest(prompts=prompts, sampling=generation_pb2.SamplingParams(**sampling))
    with pytest.raises(grpc.RpcError) as err:
        list(generation_client.stub.Generate(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert metric(scrape(generation_server), "vllm:prompt_tokens_total") == before


def test_more_samples_than_the_queue_holds_are_refused(generation_server, generation_client):
    before = metric(scrape(generation_server), "vllm:prompt_tokens_total")
    with pytest.raises(grpc.RpcError) as err:
        list(generation_client.generate(["Hi"] * 200, n=64, max_tokens=4))  # 12800 samples > max_queued_samples 8192
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_samples=8192" in err.value.details()
    assert metric(scrape(generation_server), "vllm:prompt_tokens_total") == before
    assert next(generation_client.generate(["Hi"], max_tokens=2)).completion_token_ids  # still serving


def test_model_info_describes_the_served_model(generation_client, tiny_models):
    info = generation_client.model_info()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    assert info.model_id == str(tiny_models["policy"])
    assert (info.policy_version, info.max_model_len_tokens, info.dtype) == (0, MAX_MODEL_LEN, "float32")
    assert info.vocab_size == len(tokenizer) == 615
    assert list(info.eos_token_ids) == [tokenizer.eos_token_id]
    assert (info.pad_token_id, info.bos_token_id) == (tokenizer.pad_token_id, tokenizer.bos_token_id)
    assert info.has_chat_template and info.max_samples_per_prompt == 64


def test_metrics_count_requests_tokens_and_version(generation_server, generation_client):
    before = scrape(generation_server)
    samples = list(generation_client.generate(["Hi", "Hello"], n=3, max_tokens=5, ignore_eos=True))
    after = scrape(generation_server)
    assert len(samples) == 6

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("rlhf_mesh_generation_requests_total", status="ok") == 1
    assert grew("rlhf_mesh_generation_samples_total", finish_reason="length") == 6
    assert grew("rlhf_mesh_generation_generated_tokens_total") == 30
    assert grew("rlhf_mesh_generation_prompt_tokens_total") == sum(len(s.prompt_token_ids) for s in samples)
    assert metric(after, "rlhf_mesh_generation_time_to_first_sample_seconds_count") >= 1
    assert metric(after, "rlhf_mesh_generation_policy_version") == 0
    assert "vllm:generation_tokens_total" in after


def test_generate_cli_prints_samples(generation_server):
    out = subprocess.run(
        [PYTHON, "-m", "rlhf_mesh", "generate", "--addr", generation_server.address, "--prompt", "Hello there",
         "--prompt", "Bye", "-n", "2", "--max-tokens", "4", "--seed", "1", "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    indexes = sorted((r.get("prompt_index", 0), r.get("sample_index", 0)) for r in rows)
    assert indexes == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(r["completion_token_ids"]) == 4 == len(r["completion_logprobs"]) for r in rows)


def test_stub_without_client_library(generation_server):
    """Any gRPC stub works: the contract is the proto, not the Python client."""
    with grpc.insecure_channel(generation_server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = list(stub.Generate(generation_pb2.GenerateRequest(prompts=TEXT), timeout=30))
    assert len(reply) == 1 and len(reply[0].sample.completion_token_ids) <= 16
