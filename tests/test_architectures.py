"""Every architecture `rlhf-mesh models build --arch` writes, against the real services: vLLM
generation equals transformers, in-band and collective pushes are served exactly (tied
heads included), of the model and of its `state_dict()` (transformers' run-time names:
renamed heads, fused experts), reward scores equal transformers, and two PPO steps of the
learner leave the generator serving the learner's own model. One generation server per
architecture, one reward server for all of them."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.push import CollectiveSender
from rlhf_mesh.clients.reward import RewardClient
from rlhf_mesh.services.learner.run import Run
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.tiny_models import ARCHS, build
from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import prepare, state_dict_of

from support import PYTHON, ChildServer, free_port, perturbed, serves, start_generation_server

pytestmark = pytest.mark.slow

TIED = {"llama-tied", "qwen2", "qwen3", "gemma3", "gpt2", "qwen2_moe"}
FORMS = ("module", "state_dict")  # what `push_weights` is handed: the model, or its state_dict()


def _handed(model, form: str):
    """The model, or its state_dict() (transformers' run-time names) where that is another push
    than the model's: a tied head named twice, a renamed head, fused experts."""
    if form == "module":
        return model
    tensors = model.state_dict()
    if tensors.keys() == state_dict_of(model).keys():
        pytest.skip("its state_dict() names every tensor as the checkpoint does: the module's push")
    return tensors


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: build(root / arch, seed=0, arch=arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def reward_server(arch_models, tmp_path_factory):
    models = [f"--model={arch}={paths['reward']}" for arch, paths in arch_models.items()]
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", *models],
                         tmp_path_factory.mktemp("logs") / "reward.log")
    wait_until_serving(server.address, timeout_s=300, alive=server.alive)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module", params=ARCHS)
def served(request, arch_models, tmp_path_factory):
    """(arch, its model paths, a client of a generation server on its policy, the server's address)."""
    arch = request.param
    server = start_generation_server(arch_models[arch]["policy"], tmp_path_factory.mktemp(arch) / "generation.log")
    with GenerationClient(server.address, timeout_s=120) as client:
        yield arch, arch_models[arch], client, server.address
    assert server.stop() == 0


def test_generation_equals_transformers(served):
    _arch, paths, client, _ = served
    serves(client, AutoModelForCausalLM.from_pretrained(paths["policy"]).eval(), 0)


@pytest.mark.parametrize("form", FORMS)
def test_in_band_push_is_served_exactly(served, form):
    _arch, paths, client, _ = served
    version = client.model_info().policy_version + 1
    model = perturbed(paths["policy"], version)
    reply = client.push_weights(_handed(model, form), version)
    assert reply.policy_version == version
    serves(client, model, version)


def test_a_delta_push_is_served_exactly(served):
    """Only the input embedding changes: tied, it is the head too, and the head follows."""
    _arch, paths, client, _ = served
    version = client.model_info().policy_version + 1
    model = perturbed(paths["policy"], version)
    first = prepare(state_dict_of(model), version)
    assert client.push(first.full).policy_version == version
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(version)) * 0.05)
    second = prepare(state_dict_of(model), version + 1, first.snapshot)
    sent = [t.name for t in second.delta.manifest.tensors if t.encoding == generation_pb2.TENSOR_ENCODING_XOR_ZSTD]
    assert len(sent) == 1 and sent[0].endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight"))
    reply = client.push(second.delta)
    assert reply.policy_version == version + 1 and reply.received_bytes == second.delta.sent_bytes
    serves(client, model, version + 1)


@pytest.mark.parametrize("form", FORMS)
def test_collective_push_is_served_exactly(served, form):
    _arch, paths, client, _ = served
    version = client.model_info().policy_version + 1
    model = perturbed(paths["policy"], version)
    sender = CollectiveSender([client], "127.0.0.1", free_port(), timeout_s=30)
    try:
        reply, = sender.push(_handed(model, form), version)
    finally:
        sender.close()
    assert reply.policy_version == version
    serves(client, model, version)


def test_tied_tensors_may_come_once_or_twice_but_never_differ(served):
    """transformers' state_dict names a tied parameter twice: accepted when both copies are equal
    (and applied to the head as well), refused naming both when they differ."""
    arch, paths, client, _ = served
    if arch not in TIED:
        pytest.skip(f"{arch} ties no weights")
    version = client.model_info().policy_version + 1
    model = perturbed(paths["policy"], version)
    head = "lm_head.weight"
    both = model.state_dict()
    embedding = next(n for n in both if n.endswith(("embed_tokens.weight", "wte.weight")))
    assert both[head].data_ptr() == both[embedding].data_ptr()
    client.push_weights(both, version)
    serves(client, model, version)

    apart = {**both, head: both[head] + 0.01}
    with pytest.raises(grpc.RpcError) as err:
        client.push_weights(apart, version + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert head in err.value.details() and embedding in err.value.details() and "tied" in err.value.details()
    serves(client, model, version)


def test_reward_scores_equal_transformers(served, reward_server):
    arch, paths, _, _ = served
    model = AutoModelForSequenceClassification.from_pretrained(paths["reward"]).eval()
    samples = [[5, 6, 7, 8, 9], list(range(20, 60)), [3] * 7]
    with RewardClient(reward_server.address, timeout_s=60) as client:
        scores = client.scores(samples, model=arch)
    with torch.no_grad():
        expected = [model(torch.tensor([ids])).logits[0, 0].item() for ids in samples]
    assert scores == pytest.approx(expected, abs=1e-4)


async def test_two_ppo_steps_leave_the_generator_serving_the_learners_model(served, reward_server, tmp_path):
    arch, paths, client, address = served
    run = Run(LearnerSettings(
        policy=str(paths["policy"]), generation=[address],
        reward=reward_server.address, reward_model=arch, prompts=paths["prompts"], output_dir=tmp_path / "run",
        steps=2, batch_size=4, num_samples_per_prompt=2, response_length=8, learning_rate=1e-3, seed=0,
    ))
    try:
        await run.start()
        for _ in range(2):
            await run.run_step()
            serves(client, run.trainer.models.policy, run.version)
    finally:
        await run.close()
