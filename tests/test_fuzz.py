"""Random and adversarial messages to every RPC of the reward, feedback, generation and learner
services, and random bodies to the RewardService's HTTP port.

Messages are drawn from the request types' descriptors (extreme integers, NaN and infinite
floats, huge strings and repeated fields, deep chat lists, unknown enum values, random
bytes, truncated and empty client streams). Every reply must be OK or a precise status —
never INTERNAL, UNAVAILABLE (a crash) or DEADLINE_EXCEEDED (a hang) — the server must stay
up with bounded memory, and valid calls between the garbage must keep their exact results.
The HTTP bodies are JSON of every shape in every field (lone surrogates, token ids past 2^32,
integers of 5000 digits, deep nesting), raw bytes, other media types and charsets, and false
gzip: every reply is a 200 or a 4xx in vLLM's error shape, never a 5xx.
"""

from __future__ import annotations

import gzip
import http.client
import json

import grpc
import psutil
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_mesh.clients.feedback import FeedbackClient, feedback
from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import RewardClient
from rlhf_mesh.v1 import feedback_pb2, generation_pb2, learner_pb2, learner_pb2_grpc, reward_pb2

from support import PYTHON, ChildServer, free_port, start_generation_server, wait_for

pytestmark = pytest.mark.slow

PRECISE = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED,
}
CALL_TIMEOUT_S = 20  # valid calls here take well under a second
MEMORY_GROWTH_LIMIT = 400 << 20  # resident bytes the server may gain over a whole fuzz run
F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    extremes = [v for v in (0, 1, 2, 7, 64, 255, 2**15, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1, -(2**31), -(2**63))
                if low <= v <= high]
    return st.one_of(st.integers(max(low, -3), min(high, 300)), st.sampled_from(extremes), st.integers(low, high))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type == F.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(["", "user", "assistant", "tiny", "\x00", "é" * 5000]))
    if field.type == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 100_000))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == F.TYPE_FLOAT else 64, allow_nan=True, allow_infinity=True)
    if field.type == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [999])
    return _ints(*INT_RANGES[field.type])


def _repeated(field: FieldDescriptor, element: st.SearchStrategy) -> st.SearchStrategy[list]:
    lists = st.lists(element, max_size=4)
    if field.type in INT_RANGES:  # a huge repeated field: 200k token ids
        return st.one_of(lists, _scalar(field).map(lambda v: [v] * 200_000))
    return lists


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of `descriptor`'s type with any subset of fields set to adversarial values."""
    cls = message_factory.GetMessageClass(descriptor)
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry or depth >= 3:
                continue
            element = messages(field.message_type, depth + 1)
            if field.message_type.name == "ChatMessage":  # deep chat lists
                value = st.one_of(st.lists(element, max_size=4), element.map(lambda m: [m] * 5000))
            else:
                value = st.lists(element, max_size=3) if field.is_repeated else element
        else:
            element = _scalar(field)
            value = _repeated(field, element) if field.is_repeated else element
        fields[field.name] = st.none() | value

    def build(values: dict) -> object:
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            target = getattr(message, name) if descriptor.fields_by_name[name].is_repeated else None
            if target is None:
                if descriptor.fields_by_name[name].message_type is not None:
                    getattr(message, name).CopyFrom(value)
                else:
                    setattr(message, name, value)
            elif descriptor.fields_by_name[name].message_type is not None:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def payloads(method) -> st.SearchStrategy[list[bytes]]:
    """What one call sends: one message, or 0..4 for a client stream (a truncated stream is one of them)."""
    one = st.one_of(messages(method.input_type).map(lambda m: m.SerializeToString()), st.binary(max_size=256))
    return st.lists(one, min_size=0, max_size=4) if method.client_streaming else one.map(lambda b: [b])


def call(channel: grpc.Channel, method, sent: list[bytes]) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter(sent), timeout=CALL_TIMEOUT_S))
        elif method.client_streaming:
            channel.stream_unary(path)(iter(sent), timeout=CALL_TIMEOUT_S)
        elif method.server_streaming:
            list(channel.unary_stream(path)(sent[0], timeout=CALL_TIMEOUT_S))
        else:
            channel.unary_unary(path)(sent[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        assert err.code() in PRECISE, f"{method.name}: {err.code().name}: {err.details()}"
        assert err.details(), f"{method.name}: {err.code().name} without a message"
        return err.code()
    return grpc.StatusCode.OK


def fuzz(server: ChildServer, service, examples: int, valid_call, skip: tuple[str, ...] = ()) -> None:
    """`examples` random calls spread over the service's methods, a valid call checked every 25."""
    methods = [m for m in service.methods if m.name not in skip]
    process = psutil.Process(server.process.pid)
    expected = valid_call()
    rss_before = process.memory_info().rss
    seen: list[grpc.StatusCode] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def random_calls(data) -> None:
        method = data.draw(st.sampled_from(methods))
        seen.append(call(channel, method, data.draw(payloads(method))))
        if len(seen) % 25 == 0:
            assert valid_call() == expected
            assert server.alive()

    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        random_calls()
    assert server.alive() and valid_call() == expected
    growth = process.memory_info().rss - rss_before
    assert growth < MEMORY_GROWTH_LIMIT, f"resident memory grew by {growth >> 20} MiB"
    assert len(seen) >= examples and grpc.StatusCode.INVALID_ARGUMENT in seen
    print(f"{service.name}: {len(seen)} calls, codes {sorted({c.name for c in seen})}, "
          f"memory {rss_before >> 20} -> {process.memory_info().rss >> 20} MiB")


def test_fuzz_reward_service(tiny_models, tmp_path):
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={tiny_models['reward']}",
                          "--max-length", "96"], tmp_path / "reward.log")
    try:
        wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        with RewardClient(server.address, timeout_s=30) as client:
            fuzz(server, reward_pb2.DESCRIPTOR.services_by_name["RewardService"], 1500,
                 lambda: client.scores([("What is 2 + 2?", "4, thank you."), [{"role": "user", "content": "Hi"}]]),
                 skip=("ReloadModel",))  # reloading random paths is the admin's business; its errors are tested
    finally:
        assert server.stop() == 0


HOSTILE_STRINGS = ["", "x", "\ud800", "a\udfff b", "é" * 5000, "\x00", "<think>a</think> 4", r"\boxed{2}"]
HTTP_FIELDS = ["model", "query", "prompts", "labels", "input", "use_activation", "add_special_tokens", "samples"]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.sampled_from([0, 5, -1, 2**32, 2**64, 10**30, 0.5, 1e308]),
              st.integers(), st.floats(allow_nan=False), st.sampled_from(HOSTILE_STRINGS), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(
        st.sampled_from(["text", "prompt", "response", "tokenIds", "ids", "query", "chat", "role", "content",
                         "reference", "metadata", "\ud800"]) | st.text(max_size=5), inner, max_size=4)),
    max_leaves=20)
RAW_BODIES = [b"", b"{", b"[1, 2]", b"null", b"\xff\xfe{}", b'{"input": [1' + b"1" * 5000 + b"]}",
              b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"query": ["a"]}' * 3]


@st.composite
def http_calls(draw) -> tuple[str, bytes, dict[str, str]]:
    """A path, a body and headers for the RewardService's HTTP port."""
    path = draw(st.sampled_from(["/get_reward", "/classify", "/pooling", "/v1/score", "/rm/get_reward",
                                 "/total/v1/score", "/nope/get_reward", "/math/get_reward"]))
    fields = draw(st.dictionaries(st.sampled_from(HTTP_FIELDS), JSON_VALUES, max_size=4))
    texts = st.lists(st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=30), min_size=1, max_size=4)
    valid = {"/get_reward": {"query": draw(texts)}, "/classify": {"input": draw(texts)},
             "/pooling": {"input": draw(st.lists(st.lists(st.integers(0, 2**33), min_size=1, max_size=5),
                                                 min_size=1, max_size=3))},
             "/v1/score": {"samples": [{"text": {"prompt": p, "response": p}} for p in draw(texts)]}}
    near_valid = valid[next(k for k in valid if path.endswith(k))] | draw(
        st.dictionaries(st.sampled_from(HTTP_FIELDS), JSON_VALUES, max_size=1))
    body = draw(st.one_of(
        st.just(json.dumps(near_valid).encode()), st.just(json.dumps(fields).encode()),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()), st.sampled_from(RAW_BODIES), st.binary(max_size=64)))
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "application/json",
                                                     "application/json; charset=utf-8",
                                                     "application/json; charset=foo", "text/plain", ""]))}
    encoding = draw(st.sampled_from([None, None, None, "gzip", "gzip-false", "br"]))
    if encoding == "gzip":
        body = gzip.compress(body)
    if encoding is not None:
        headers["Content-Encoding"] = encoding.removesuffix("-false")
    return path, body, headers


def test_fuzz_reward_http(tiny_models, tmp_path):
    port = free_port()
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"rm={tiny_models['reward']}",
                          "--function", "math", "--composite", "total=0.5*rm+0.5*math", "--max-length", "96",
                          "--http-port", str(port)], tmp_path / "reward.log")
    statuses: list[int] = []

    def post(host: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(host, port, timeout=CALL_TIMEOUT_S)
        try:
            connection.request("POST", path, body, {k: v for k, v in headers.items() if v})
            reply = connection.getresponse()
            return reply.status, json.loads(reply.read())
        finally:
            connection.close()

    def valid_call() -> list[float]:
        status, reply = post("::1", "/total/get_reward", json.dumps(
            {"query": [r"What is 1+1? \boxed{2}", "Hi"], "labels": ["2", ""]}).encode(),
            {"Content-Type": "application/json"})
        assert status == 200, reply
        return reply["rewards"]

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(call=http_calls(), host=st.sampled_from(["127.0.0.1", "::1"]))
    def random_calls(call, host) -> None:
        status, reply = post(host, *call)
        statuses.append(status)
        if status != 200:
            assert status < 500 and set(reply["error"]) == {"message", "type", "param", "code"}, (call, reply)
            assert reply["error"]["code"] == status and reply["error"]["message"]
        if len(statuses) % 25 == 0:
            assert valid_call() == expected
            assert server.alive()

    try:
        wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        expected = valid_call()
        process = psutil.Process(server.process.pid)
        rss_before = process.memory_info().rss
        random_calls()
        assert server.alive() and valid_call() == expected
        growth = process.memory_info().rss - rss_before
        assert growth < MEMORY_GROWTH_LIMIT, f"resident memory grew by {growth >> 20} MiB"
        assert {200, 400, 415} <= set(statuses)
        status, reply = post("127.0.0.1", "/nope/get_reward", b'{"query": ["Hi"]}',
                             {"Content-Type": "application/json"})
        assert status == 404 and reply["error"]["code"] == 404  # an unknown scorer, whatever the draws held
        print(f"reward HTTP: {len(statuses)} calls, statuses {sorted(set(statuses))}, "
              f"memory {rss_before >> 20} -> {process.memory_info().rss >> 20} MiB")
    finally:
        assert server.stop() == 0


def test_fuzz_feedback_service(tmp_path):
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'f.db'}",
                          "--rater-port", "0"], tmp_path / "feedback.log")
    try:
        wait_until_serving(server.address, timeout_s=60, alive=server.alive)
        with FeedbackClient(server.address, timeout_s=30) as client:
            client.submit(feedback("p", ["a", "b"], choice=0, rater_id="fuzz-check"))
            fuzz(server, feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"], 1500,
                 lambda: [(f.feedback_id, list(f.responses)) for f in client.list(rater_id="fuzz-check")])
    finally:
        assert server.stop() == 0


def test_fuzz_generation_service(tiny_models, tmp_path):
    server = start_generation_server(tiny_models["policy"], tmp_path / "generation.log",
                                     "--max-samples-per-prompt", "4", "--max-request-prompts", "8")
    try:
        with GenerationClient(server.address, timeout_s=120) as client:
            def greedy() -> list[int]:
                return [list(s.completion_token_ids) for s in client.generate(["Hello"], n=1, max_tokens=8,
                                                                                temperature=0.0)]

            fuzz(server, generation_pb2.DESCRIPTOR.services_by_name["GenerationService"], 400, greedy,
                 skip=("InitWeightTransfer",))  # joins a group at a caller-given address; test_weight_updates
    finally:
        assert server.stop() == 0


def test_fuzz_learner_service(tiny_models, tmp_path):
    """The LearnerService of a finished run (it answers for `linger_s`): WatchMetrics replays and
    ends, Pause and Resume are refused as the run has ended, SaveCheckpoint returns the last one."""
    reward = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={tiny_models['reward']}"],
                         tmp_path / "reward.log")  # starts while the generator loads
    generation = learner = None
    try:
        generation = start_generation_server(tiny_models["policy"], tmp_path / "generation.log")
        wait_until_serving(reward.address, timeout_s=300, alive=reward.alive)
        learner = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "learner", "--policy", str(tiny_models["policy"]),
                               "--generation", generation.address, "--reward", reward.address,
                               "--prompts", str(tiny_models["prompts"]), "--steps", "2", "--batch-size", "4",
                               "--response-length", "8", "--output-dir", str(tmp_path / "run"), "--linger-s", "600"],
                              tmp_path / "learner.log")
        wait_until_serving(learner.address, timeout_s=300, alive=learner.alive)
        with grpc.insecure_channel(learner.address) as channel:
            stub = learner_pb2_grpc.LearnerServiceStub(channel)

            def finished() -> tuple:
                status = stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=CALL_TIMEOUT_S)
                steps = [m.step for m in stub.WatchMetrics(learner_pb2.WatchMetricsRequest(from_step=1),
                                                           timeout=CALL_TIMEOUT_S)]
                return status.state, status.step, status.last_checkpoint_step, steps

            def done() -> bool:
                assert learner.alive(), learner.log()
                state = stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=CALL_TIMEOUT_S).state
                return state == learner_pb2.LEARNER_STATE_FINISHED

            wait_for(done, timeout_s=300, what="the learner finished its 2 steps", every_s=0.5)
            assert finished() == (learner_pb2.LEARNER_STATE_FINISHED, 2, 2, [1, 2])
            fuzz(learner, learner_pb2.DESCRIPTOR.services_by_name["LearnerService"], 500, finished)
    finally:
        for server in (learner, reward, generation):
            if server is not None:
                server.stop()
