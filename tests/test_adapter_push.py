"""Adapter pushes: a LoRA adapter pushed into a GenerationService started with enable_lora,
checked by what it generates against PEFT's own forward pass, on a tied policy."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import full_push, lora_adapter_of, push_requests

from support import serves, start_generation_server

pytestmark = pytest.mark.slow  # a vLLM engine

MAX_LORA_RANK = 8


@pytest.fixture(scope="module")
def tied_policy(tmp_path_factory) -> Path:
    from rlhf_mesh.tiny_models import build

    return build(tmp_path_factory.mktemp("tied"), arch="llama-tied")["policy"]


@pytest.fixture(scope="module")
def server(tied_policy, tmp_path_factory):
    staging = tmp_path_factory.mktemp("staging")
    server = start_generation_server(tied_policy, tmp_path_factory.mktemp("generation") / "server.log",
                                     "--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK),
                                     "--weight-staging-dir", str(staging))
    server.staging = staging
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with GenerationClient(server.address, timeout_s=120) as client:
        yield client


def adapted(policy: Path, k: int, r: int = 4, targets=("q_proj", "v_proj", "o_proj", "down_proj")):
    """The policy with LoRA adapter A_k: seeded, with lora_B nonzero so that it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(policy),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    noise = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=noise) * 0.3)
    return model.eval()


def _adapter_versions(server) -> list[int]:
    """The policy versions of the adapters kept in the staging folder (loaded in the engine)."""
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in server.staging.iterdir() if "-adapter-" in p.name)


def _served_adapter(client, tied_policy, k: int):
    """Push adapter A_k as the next version; (its model, its version)."""
    version = client.model_info().policy_version + 1
    model = adapted(tied_policy, k)
    client.push_adapter(model, version)
    return model, version


def test_an_adapter_push_is_served_exactly_and_replaces_the_last(server, client, tied_policy):
    info = client.model_info()
    assert info.max_lora_rank == MAX_LORA_RANK
    version = info.policy_version
    for k in (1, 2):
        model = adapted(tied_policy, k)
        tensors, _ = lora_adapter_of(model)
        reply = client.push_adapter(model, version + k)
        assert reply.policy_version == version + k
        assert reply.received_bytes == sum(t.numel() * 4 for t in tensors.values())
        assert reply.timings.paused_ms == 0  # nothing pauses: new samples take the new adapter
        serves(client, model, version + k)  # greedy tokens and log-probs equal PEFT's, at the adapter's version
    assert _adapter_versions(server) == [version + 2]  # the first was unloaded


def _refused(client, push) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.PushWeights(iter([generation_pb2.PushWeightsRequest.FromString(m) for m in push_requests(push)]),
                                timeout=60)
    return err.value


def test_bad_adapter_pushes_change_nothing(server, client, tied_policy):
    current, version = _served_adapter(client, tied_policy, 5)
    tensors, adapter = lora_adapter_of(adapted(tied_policy, 9))
    name = next(n for n in tensors if n.endswith("q_proj.lora_A.weight"))
    corrupted = full_push(tensors, version + 1, adapter=adapter)
    corrupted.payloads[list(tensors).index(name)] = bytes(tensors[name].numel() * 4)
    big_tensors, big = lora_adapter_of(adapted(tied_policy, 9, r=2 * MAX_LORA_RANK))
    untargeted = generation_pb2.LoraAdapter(r=adapter.r, lora_alpha=adapter.lora_alpha, target_modules=["q_proj"])
    cases = [
        (corrupted, grpc.StatusCode.INVALID_ARGUMENT, f"tensor {name!r}: BLAKE3 digest"),
        (full_push({**tensors, name: tensors[name][:, :-1]}, version + 1, adapter=adapter),
         grpc.StatusCode.INVALID_ARGUMENT, f"{name!r}: shape"),
        (full_push({k: v for k, v in tensors.items() if k != name}, version + 1, adapter=adapter),
         grpc.StatusCode.INVALID_ARGUMENT, "lora_A or lora_B missing"),
        (full_push(big_tensors, version + 1, adapter=big), grpc.StatusCode.INVALID_ARGUMENT,
         f"r {2 * MAX_LORA_RANK} is not within 1..{MAX_LORA_RANK}"),
        (full_push(tensors, version + 1, adapter=untargeted), grpc.StatusCode.INVALID_ARGUMENT,
         "is not in target_modules"),
        (full_push({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": tensors[name]}, version + 1,
                   adapter=adapter), grpc.StatusCode.INVALID_ARGUMENT, "is not a linear layer of the served policy"),
        (full_push(tensors, version, adapter=adapter), grpc.StatusCode.FAILED_PRECONDITION,
         f"policy_version {version} is not above the served version {version}"),
    ]
    for push, code, message in cases:
        err = _refused(client, push)
        assert err.code() == code, err.details()
        assert message in err.details()
    serves(client, current, version)
    assert _adapter_versions(server) == [version]  # no refused one was kept


def test_a_full_push_is_refused_while_an_adapter_is_served(client, tied_policy):
    from transformers import AutoModelForCausalLM

    current, version = _served_adapter(client, tied_policy, 6)
    with pytest.raises(grpc.RpcError) as err:
        client.push_weights(AutoModelForCausalLM.from_pretrained(tied_policy), version + 1, timeout_s=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "serves a LoRA adapter" in err.value.details()
    serves(client, current, version)


def test_a_replica_without_lora_refuses_an_adapter(tied_policy):
    """(What PushWeights answers FAILED_PRECONDITION, as the full push above.)"""
    from rlhf_mesh.services.generation.staging import NotServable, check_adapter
    from rlhf_mesh.weights import checkpoint_layout, manifest

    tensors, adapter = lora_adapter_of(adapted(tied_policy, 1))
    with pytest.raises(NotServable, match="start it with enable_lora"):
        check_adapter(manifest(tensors, 1, adapter=adapter), checkpoint_layout(tied_policy), 0, 0)
