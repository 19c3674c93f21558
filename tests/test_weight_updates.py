"""Weight updates end to end: pushes into a running GenerationService, checked by what it generates."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rlhf_mesh.clients.generation import SERVICE, GenerationClient
from rlhf_mesh.clients.push import CollectiveSender, push_to_replicas, send_update
from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import Push, chunk_requests, manifest, prepare, raw_bytes, state_dict_of

from support import SERVED_PROMPTS as PROMPTS
from support import (
    free_port,
    greedy,
    metric,
    perturbed,
    push_messages,
    scrape,
    serves,
    start_generation_server,
    wait_for,
)

pytestmark = pytest.mark.slow  # a vLLM engine

MAX_MODEL_LEN = 1024  # the tiny policy's own limit: a long sample outlasts a push by seconds
# The tests push while the server generates, and must see their pushes land mid-sample: the
# server runs at a lower priority, so that its engine does not keep them off the CPU.
GENERATION_SERVER = dict(max_model_len=MAX_MODEL_LEN, nice=10)


@pytest.fixture(scope="module")
def policies(tiny_models):
    """Perturbed copies of the tiny policy: make(k) is W_k, a different set of weights for every k."""
    return lambda k: perturbed(tiny_models["policy"], k)


def test_in_band_push_serves_the_new_weights(generation_client, policies):
    w1 = policies(1)
    reply = generation_client.push_weights(w1, 1)
    assert reply.policy_version == 1
    assert reply.received_bytes == sum(t.numel() * 4 for t in w1.state_dict().values())
    assert reply.timings.transfer_ms > 0 and reply.timings.verify_ms > 0 and reply.timings.apply_ms > 0
    serves(generation_client, w1, 1)


def test_a_collective_push_without_a_group_is_refused_as_a_precondition(generation_client, policies):
    """(This module's server has joined no group yet.) Not a server error: the caller forms one."""
    version = generation_client.model_info().policy_version
    request = generation_pb2.PushWeightsCollectiveRequest(manifest=manifest(_tensors(policies(9)), version + 1))
    with pytest.raises(grpc.RpcError) as err:
        generation_client.stub.PushWeightsCollective(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "InitWeightTransfer" in err.value.details()
    serves(generation_client, policies(version), version)


def test_collective_push_serves_the_new_weights(generation_client, policies):
    w2 = policies(2)
    sender = CollectiveSender([generation_client], "127.0.0.1", free_port(), timeout_s=30)
    try:
        reply, = sender.push(w2, 2)
    finally:
        sender.close()
    assert reply.policy_version == 2 and reply.timings.paused_ms > 0
    serves(generation_client, w2, 2)


def test_corrupted_collective_push_changes_nothing_and_the_group_goes_on(generation_client, policies):
    version = generation_client.model_info().policy_version
    tensors = _tensors(policies(9))
    name = "model.layers.1.mlp.up_proj.weight"
    sender = CollectiveSender([generation_client], "127.0.0.1", free_port(), timeout_s=30)
    try:
        request = generation_pb2.PushWeightsCollectiveRequest(manifest=manifest(tensors, version + 1))
        call = generation_client.stub.PushWeightsCollective.future(request, timeout=60)
        for key, tensor in tensors.items():  # bytes that do not match the manifest's digest
            sender.group.broadcast(tensor + 1 if key == name else tensor, 0).wait()
        with pytest.raises(grpc.RpcError) as err:
            call.result()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"tensor {name!r}: BLAKE3 digest" in err.value.details()
        serves(generation_client, policies(version), version)

        # every tensor was received, so the same group carries the next push
        reply, = sender.push(policies(version + 1), version + 1)
    finally:
        sender.close()
    assert reply.policy_version == version + 1
    serves(generation_client, policies(version + 1), version + 1)


def test_a_refused_collective_manifest_fails_the_push_at_once(generation_client, policies):
    """A stale version is refused before the workers receive anything: the sender raises the
    replica's status at once, not at the group's timeout, and will not push on that group again."""
    version = generation_client.model_info().policy_version
    sender = CollectiveSender([generation_client], "127.0.0.1", free_port(), timeout_s=30)
    try:
        with pytest.raises(grpc.RpcError) as err:  # the replica's refusal, not the group's timeout
            sender.push(policies(9), version)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"policy_version {version} is not above the served version {version}" in err.value.details()
        with pytest.raises(RuntimeError, match="make a new sender"):
            sender.push(policies(9), version + 1)
    finally:
        sender.close()
    serves(generation_client, policies(version), version)


def test_an_update_whose_caller_left_runs_to_its_end_before_the_next(generation_client, policies):
    """A collective push whose caller gives up while the workers wait for its bytes: its vLLM
    update session is not left open (it would refuse every later update) but ends when the
    workers' receive times out; meanwhile other pushes get ABORTED, then they succeed."""
    version = generation_client.model_info().policy_version
    tensors = _tensors(policies(version + 1))
    sender = CollectiveSender([generation_client], "127.0.0.1", free_port(), timeout_s=4)
    try:
        request = generation_pb2.PushWeightsCollectiveRequest(manifest=manifest(tensors, version + 1))
        with pytest.raises(grpc.RpcError) as err:  # nothing is broadcast
            generation_client.stub.PushWeightsCollective(request, timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        busy = _push(generation_client, push_messages(tensors, version + 1))
        assert busy.code() == grpc.StatusCode.ABORTED and "in progress" in busy.details()
    finally:
        sender.close()

    def pushed():
        try:
            return generation_client.push_weights(tensors, version + 1)
        except grpc.RpcError as refused:  # the abandoned update still holds the replica
            assert refused.code() == grpc.StatusCode.ABORTED, refused.details()
            return None

    # each try sends the whole model
    reply = wait_for(pushed, timeout_s=30, what="the abandoned update ended", every_s=0.5)
    assert reply.policy_version == version + 1
    serves(generation_client, policies(version + 1), version + 1)


def _push(generation_client: GenerationClient, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        generation_client.stub.PushWeights(iter(messages), timeout=60)
    return err.value


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bad_pushes_change_nothing(generation_client, policies):
    version = generation_client.model_info().policy_version
    current = policies(version)
    tensors = _tensors(policies(9))
    good = push_messages(tensors, version + 1)
    name = "model.layers.1.mlp.up_proj.weight"
    index = list(tensors).index(name)

    corrupted = [good[0], *(
        generation_pb2.PushWeightsRequest(chunk=generation_pb2.WeightChunk(
            tensor_index=m.chunk.tensor_index, offset_bytes=m.chunk.offset_bytes,
            data=bytes([m.chunk.data[0] ^ 1]) + m.chunk.data[1:] if m.chunk.tensor_index == index else m.chunk.data))
        for m in good[1:]
    )]
    missing = dict(tensors)
    del missing[name]
    unknown = {**tensors, "model.layers.7.mlp.up_proj.weight": tensors[name]}
    wrong_shape = {**tensors, name: tensors[name][:, :-1]}
    wrong_dtype = {**tensors, name: tensors[name].to(torch.bfloat16)}
    partial = [m for m in good if not (m.HasField("chunk") and m.chunk.tensor_index == index)]

    cases = [
        (corrupted, grpc.StatusCode.INVALID_ARGUMENT, f"tensor {name!r}: BLAKE3 digest"),
        (push_messages(missing, version + 1), grpc.StatusCode.INVALID_ARGUMENT, f"missing tensors: [{name!r}]"),
        (push_messages(unknown, version + 1), grpc.StatusCode.INVALID_ARGUMENT, "not a parameter of the served"),
        (push_messages(wrong_shape, version + 1), grpc.StatusCode.INVALID_ARGUMENT, f"{name!r}: shape"),
        (push_messages(wrong_dtype, version + 1), grpc.StatusCode.INVALID_ARGUMENT,
         f"{name!r}: dtype TENSOR_DTYPE_BFLOAT16, the served policy is float32"),
        (partial, grpc.StatusCode.INVALID_ARGUMENT, f"tensor {name!r}: received 0 of"),
        (push_messages(tensors, version), grpc.StatusCode.FAILED_PRECONDITION,
         f"policy_version {version} is not above the served version {version}"),
        (good[1:], grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the manifest"),
    ]
    for messages, code, message in cases:
        err = _push(generation_client, messages)
        assert err.code() == code, err.details()
        assert message in err.details()
    serves(generation_client, current, version)


@pytest.mark.parametrize(("change", "message"), [
    ({"backend": generation_pb2.COLLECTIVE_BACKEND_UNSPECIFIED}, "only COLLECTIVE_BACKEND_GLOO"),
    ({"master_address": ""}, "master_address, master_port and world_size >= 2 are required"),
    ({"world_size": 1}, "master_address, master_port and world_size >= 2 are required"),
    ({"rank_offset": 0}, "rank_offset 0 with 1 workers does not fit world_size 2"),
    ({"timeout_ms": 3_600_000}, "timeout_ms 3600000 is above max_collective_timeout_s=600"),
])
def test_a_bad_weight_transfer_group_is_refused_before_joining(generation_client, change, message):
    request = generation_pb2.InitWeightTransferRequest(**{
        "master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2, "rank_offset": 1,
        "backend": generation_pb2.COLLECTIVE_BACKEND_GLOO, "timeout_ms": 5000, **change})
    with pytest.raises(grpc.RpcError) as err:
        generation_client.stub.InitWeightTransfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_interrupted_push_changes_nothing(generation_client, policies):
    version = generation_client.model_info().policy_version
    messages = push_messages(_tensors(policies(9)), version + 1)
    sent, released = threading.Event(), threading.Event()

    def stall():
        yield from messages[: len(messages) // 2]
        sent.set()
        released.wait(60)  # the client gives up long before this

    try:
        with pytest.raises(grpc.RpcError) as err:
            generation_client.stub.PushWeights(stall(), timeout=2)
    finally:
        released.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and sent.is_set()
    serves(generation_client, policies(version), version)


def test_concurrent_push_is_refused_while_one_runs(generation_client, policies):
    version = generation_client.model_info().policy_version
    tensors = _tensors(policies(version + 1))
    messages = push_messages(tensors, version + 1)
    halfway, refused = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def slow():
        for i, message in enumerate(messages):
            if i == len(messages) // 2:
                halfway.set()
                refused.wait(60)  # the first push stays half-sent until the second has been refused
            yield message

    def first() -> None:
        outcome["reply"] = generation_client.stub.PushWeights(slow(), timeout=60)

    thread = threading.Thread(target=first)
    thread.start()
    assert halfway.wait(30)
    try:
        err = _push(generation_client, push_messages(_tensors(policies(8)), version + 2))
    finally:
        refused.set()
    thread.join()
    assert err.code() == grpc.StatusCode.ABORTED and "in progress" in err.details()
    assert outcome["reply"].policy_version == version + 1
    serves(generation_client, policies(version + 1), version + 1)


def test_update_mid_request_is_tagged_and_resumes_on_the_new_weights(generation_client, policies):
    """A sample spanning an update: old-weight tokens, then the new weights' greedy continuation.

    The push is sent once the first token is in. Sixteen greedy copies of the sample make each
    engine step slower, so the samples outlast by seconds the second or more a generating
    engine on two cores can keep this process off the CPU; should they still end first (all
    old-weight tokens), the next version is pushed into new samples."""
    attempts = 6
    for _ in range(attempts):
        version = generation_client.model_info().policy_version
        new = policies(version + 1)
        events = generation_client.generate(PROMPTS[:1], n=16, max_tokens=MAX_MODEL_LEN - 16, temperature=0,
                                            ignore_eos=True, stream_tokens=True)
        first = next(events)  # generating on the old weights
        assert first.HasField("delta")
        generation_client.push_weights(new, version + 1)
        sample = next(e.sample for e in events if e.HasField("sample"))
        if sample.policy_version_end != version:
            break
        assert sample.policy_version_start == version  # ended before the push landed
    else:
        pytest.fail(f"none of {attempts} pushes landed while its sample was generating")
    assert (sample.policy_version_start, sample.policy_version_end) == (version, version + 1)
    tokens = list(sample.completion_token_ids)
    old_greedy = greedy(policies(version), sample.prompt_token_ids, len(tokens))
    switch = next(i for i, (a, b) in enumerate(zip(tokens, old_greedy, strict=True)) if a != b)
    assert 0 < switch < len(tokens)
    context = [*sample.prompt_token_ids, *tokens[:switch]]
    assert tokens[switch:] == greedy(new, context, len(tokens) - switch)


def test_min_policy_version_waits_for_a_push(generation_server, generation_client, policies):
    version = generation_client.model_info().policy_version
    waiting: dict[str, generation_pb2.Sample] = {}

    def wait() -> None:
        waiting["sample"] = next(generation_client.generate(PROMPTS[:1], max_tokens=2, min_policy_version=version + 1,
                                                 timeout_s=60))

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for(lambda: metric(scrape(generation_server), "rlhf_mesh_generation_waiting_calls") == 1,
             what="the call waits for its version")
    assert thread.is_alive()  # still waiting for the version
    generation_client.push_weights(policies(version + 1), version + 1)
    thread.join(30)
    assert waiting["sample"].policy_version_start == version + 1


def test_push_to_replicas_reports_each_replica(generation_server, generation_client, policies):
    version = generation_client.model_info().policy_version
    dead = f"localhost:{free_port()}"
    results = push_to_replicas([generation_server.address, dead], policies(version + 1), version + 1, timeout_s=20)
    assert [r.address for r in results] == [generation_server.address, dead]
    assert results[0].ok and results[0].response.policy_version == version + 1
    assert not results[1].ok and results[1].error.code() == grpc.StatusCode.UNAVAILABLE
    serves(generation_client, policies(version + 1), version + 1)


def test_chunks_stay_within_the_contract():
    tensors = {"a": torch.randn(3 << 20), "b": torch.ones(5), "c": torch.ones(0)}  # 12 MiB, 20 bytes, none
    encoded = list(chunk_requests(enumerate(raw_bytes(t) for t in tensors.values())))
    pieces = [generation_pb2.PushWeightsRequest.FromString(e).chunk for e in encoded]
    assert max(len(c.data) for c in pieces) == 4 << 20
    assert [(c.tensor_index, c.offset_bytes) for c in pieces] == [(0, 0), (0, 4 << 20), (0, 8 << 20), (1, 0), (2, 0)]
    assert b"".join(c.data for c in pieces[:3]) == tensors["a"].numpy().tobytes()
    # byte for byte what protobuf itself writes for the same message
    assert encoded == [generation_pb2.PushWeightsRequest(chunk=c).SerializeToString() for c in pieces]
    assert [s.size_bytes for s in manifest(tensors, 1).tensors] == [12 << 20, 20, 0]


def test_in_band_push_sends_the_token_and_messages_protobuf_reads():
    """push_weights serializes its own messages: a plain gRPC server parses them and sees the token."""
    seen: dict[str, object] = {}

    def push(requests, context):
        seen["metadata"] = dict(context.invocation_metadata())
        seen["messages"] = list(requests)
        return generation_pb2.PushWeightsResponse(policy_version=seen["messages"][0].manifest.policy_version)

    server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 8 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "PushWeights": grpc.stream_unary_rpc_method_handler(
            push, request_deserializer=generation_pb2.PushWeightsRequest.FromString,
            response_serializer=generation_pb2.PushWeightsResponse.SerializeToString)})])
    checks = health.HealthServicer()
    checks.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tensors = {"a": torch.randn(3 << 20), "b": torch.arange(5.0)}
    try:
        with GenerationClient(f"127.0.0.1:{port}", timeout_s=30, token="s3cret") as client:
            assert client.push_weights(tensors, 7).policy_version == 7
    finally:
        server.stop(None)
    assert seen["metadata"]["authorization"] == "Bearer s3cret"
    first, *rest = seen["messages"]
    assert first.manifest == manifest(tensors, 7)
    for index, tensor in enumerate(tensors.values()):
        data = b"".join(m.chunk.data for m in rest if m.chunk.tensor_index == index)
        assert data == tensor.numpy().tobytes()



# Delta pushes. Last in the module: the policies they serve are not policies(version).

def _changed(model, name: str, k: int):
    """`model` with noise on one parameter only."""
    with torch.no_grad():
        parameter = dict(model.named_parameters())[name]
        parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
    return model


def test_a_delta_push_sends_only_what_changed_and_is_served_exactly(generation_server, generation_client, policies):
    version = generation_client.model_info().policy_version
    model = policies(version + 1)
    first = prepare(state_dict_of(model), version + 1)
    result, = send_update([generation_server.address], first)
    assert result.ok and not result.delta  # no base: a full push
    _changed(model, "model.layers.1.mlp.up_proj.weight", 1)
    second = prepare(state_dict_of(model), version + 2, first.snapshot)
    result, = send_update([generation_server.address], second)
    assert result.ok and result.delta, result.error
    changed = [t for t in second.delta.manifest.tensors if t.encoding == generation_pb2.TENSOR_ENCODING_XOR_ZSTD]
    assert [t.name for t in changed] == ["model.layers.1.mlp.up_proj.weight"]  # the rest: UNCHANGED, no bytes
    assert result.response.received_bytes == second.delta.sent_bytes <= changed[0].size_bytes * 1.01
    assert second.delta.sent_bytes < second.full.sent_bytes / 5
    serves(generation_client, model, version + 2)

    # Nothing changed but the version: the manifest alone.
    third = prepare(state_dict_of(model), version + 3, second.snapshot)
    result, = send_update([generation_server.address], third)
    assert result.delta and result.response.received_bytes == 0
    serves(generation_client, model, version + 3)


def test_a_delta_against_another_base_is_refused_and_the_full_push_goes_instead(generation_server, generation_client,
                                                                                policies):
    version = generation_client.model_info().policy_version
    stale = prepare(state_dict_of(policies(1)), version - 1).snapshot  # not what is served
    model = policies(version + 1)
    update = prepare(state_dict_of(model), version + 1, stale)
    with pytest.raises(grpc.RpcError) as err:
        generation_client.push(update.delta)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "push in full" in err.value.details()
    result, = send_update([generation_server.address], update)
    assert result.ok and not result.delta
    serves(generation_client, model, version + 1)


def test_a_corrupted_delta_is_refused_naming_the_tensor_and_changes_nothing(generation_server, generation_client,
                                                                           policies):
    version = generation_client.model_info().policy_version
    model = policies(version + 1)
    base = prepare(state_dict_of(model), version + 1)
    assert send_update([generation_server.address], base)[0].ok
    name = "model.layers.0.self_attn.q_proj.weight"
    changed = _changed(policies(version + 1), name, 2)
    update = prepare(state_dict_of(changed), version + 2, base.snapshot)
    index = next(i for i, t in enumerate(update.delta.manifest.tensors) if t.name == name)
    payloads = list(update.delta.payloads)
    frame = bytearray(payloads[index])
    frame[len(frame) // 2] ^= 0xFF
    payloads[index] = bytes(frame)
    with pytest.raises(grpc.RpcError) as err:
        generation_client.push(Push(update.delta.manifest, payloads))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.value.details()
    serves(generation_client, model, version + 1)
    # The base is still held: the intact delta goes through.
    assert generation_client.push(update.delta).policy_version == version + 2
    serves(generation_client, changed, version + 2)


def test_a_restarted_replica_catches_up_from_its_peer_before_it_serves(generation_server, generation_client,
                                                                        tiny_models, policies, tmp_path):
    """A replica started with --catch-up-from serves its peer's newest version (pulled with
    FetchWeights, checked like a push) as soon as it reports SERVING, after a kill -9 too; it
    keeps that version's tensors, so the learner's next push to it is a delta."""
    version = generation_client.model_info().policy_version
    model = policies(version + 1)
    first = prepare(state_dict_of(model), version + 1)
    assert send_update([generation_server.address], first)[0].ok  # the peer keeps what it was pushed in-band
    flags = ("--catch-up-from", generation_server.address)
    replica = start_generation_server(tiny_models["policy"], tmp_path / "replica.log", *flags)
    try:
        with GenerationClient(replica.address, timeout_s=120) as client:
            assert client.model_info().policy_version == version + 1  # before SERVING: no push came
            serves(client, model, version + 1)
        assert replica.kill() == -9

        _changed(model, "model.layers.0.mlp.down_proj.weight", 3)  # the peer moves on while it is down
        second = prepare(state_dict_of(model), version + 2, first.snapshot)
        assert send_update([generation_server.address], second)[0].delta
        replica = start_generation_server(tiny_models["policy"], tmp_path / "replica.log", *flags, port=replica.port)
        with GenerationClient(replica.address, timeout_s=120) as client:
            assert client.model_info().policy_version == version + 2
            assert metric(scrape(replica), "rlhf_mesh_generation_policy_version") == version + 2
            serves(client, model, version + 2)

            _changed(model, "model.layers.1.self_attn.v_proj.weight", 4)
            third = prepare(state_dict_of(model), version + 3, second.snapshot)
            results = send_update([generation_server.address, replica.address], third)
            assert [(r.ok, r.delta) for r in results] == [(True, True)] * 2, [r.error for r in results]
            serves(client, model, version + 3)
        assert replica.log().count("catch-up: policy version") == 2
    finally:
        replica.stop()


def test_a_replica_that_cannot_catch_up_serves_what_it_loaded(generation_server, generation_client, policies):
    """No peer (the first replica of a deployment), none above the replica's version, weights it
    refuses, or a peer that keeps no full copy (after a collective push): the replica goes on."""
    from rlhf_mesh.services.generation.catch_up import catch_up
    from rlhf_mesh.services.generation.settings import GenerationSettings
    from rlhf_mesh.services.generation.staging import WeightRejected

    version = generation_client.model_info().policy_version
    with pytest.raises(grpc.RpcError) as err:
        next(generation_client.stub.FetchWeights(generation_pb2.FetchWeightsRequest(above_version=version), timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"serves policy version {version}, not one above {version}" in err.value.details()

    offered = []

    async def refuse(manifest, messages):  # as a replica of another dtype would
        offered.append((manifest.policy_version, len(manifest.tensors)))
        raise WeightRejected("tensors[0]: dtype TENSOR_DTYPE_FLOAT32, the served policy is bfloat16")

    def attempt(target: str, served: int) -> int | None:
        return asyncio.run(catch_up(GenerationSettings(model="policy", catch_up_from=target), served, refuse))

    assert attempt(generation_server.address, 0) is None
    assert offered == [(version, len(_tensors(policies(0))))]
    assert attempt(generation_server.address, version) is None and len(offered) == 1
    assert attempt("no-such-replica.invalid:50051", 0) is None

    sender = CollectiveSender([generation_client], "127.0.0.1", free_port(), timeout_s=30)
    try:
        sender.push(policies(version + 1), version + 1)
    finally:
        sender.close()
    with pytest.raises(grpc.RpcError) as err:
        next(generation_client.stub.FetchWeights(generation_pb2.FetchWeightsRequest(), timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no full copy" in err.value.details()
    assert attempt(generation_server.address, 0) is None and len(offered) == 1


def test_the_files_of_a_process_that_died_are_removed_at_start(tmp_path):
    import os
    import subprocess

    from rlhf_mesh.services.generation.staging import remove_orphans

    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = tmp_path / f"rlhf-mesh-push-{os.getpid()}-a.safetensors"
    theirs = tmp_path / f"rlhf-mesh-push-{gone.pid}-b.safetensors"
    other = tmp_path / "model.safetensors"
    for path in (mine, theirs, other):
        path.write_bytes(b"x")
    assert remove_orphans(str(tmp_path)) == [theirs]
    assert mine.exists() and other.exists() and not theirs.exists()
