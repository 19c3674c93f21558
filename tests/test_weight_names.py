"""The names a push may give its tensors, without an engine: the checkpoint's, or those of
transformers' `state_dict()` at run time (renamed heads, fused experts, a tied head twice), on
every architecture `rlhf-mesh models build` writes. What a replica's workers load is checked
against the checkpoint `save_pretrained` wrote; tests/test_architectures.py serves both forms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_mesh.services.generation.staging import WeightRejected, check_manifest
from rlhf_mesh.tiny_models import ARCHS, build
from rlhf_mesh.weights import CheckpointNames, checkpoint_files, manifest, state_dict_of


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """arch -> the folder of its tiny policy, built on first use."""
    folders: dict[str, Path] = {}

    def policy(arch: str) -> Path:
        if arch not in folders:
            folders[arch] = build(tmp_path_factory.mktemp(arch), seed=0, arch=arch)["policy"]
        return folders[arch]
    return policy


def _loaded(names: CheckpointNames, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a replica's workers load for a push of `tensors`: the manifest checked, tied copies
    dropped, run-time names converted (services/generation/weight_transfer.py)."""
    load_as = check_manifest(manifest(tensors, 1), names, torch.float32, 0)
    return names.to_checkpoint({load_as[name]: t for name, t in tensors.items() if name in load_as})


@pytest.mark.parametrize("arch", ARCHS)
def test_the_model_and_its_state_dict_load_as_the_checkpoint(policies, arch):
    folder = policies(arch)
    model = AutoModelForCausalLM.from_pretrained(folder)
    names = CheckpointNames(folder)
    checkpoint = {name: t for path in checkpoint_files(folder) for name, t in load_file(path).items()}
    for tensors in (state_dict_of(model), model.state_dict()):
        loaded = _loaded(names, tensors)
        assert loaded.keys() == checkpoint.keys()
        assert all(torch.equal(loaded[name], checkpoint[name]) for name in checkpoint)


def _refused(names: CheckpointNames, tensors: dict[str, torch.Tensor]) -> str:
    with pytest.raises(WeightRejected) as err:
        check_manifest(manifest(tensors, 1), names, torch.float32, 0)
    return str(err.value)


def test_fused_experts_may_mix_with_per_expert_ones_but_never_overlap(policies):
    folder = policies("qwen3_moe")
    names = CheckpointNames(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    runtime, stored = model.state_dict(), state_dict_of(model)
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    split = [name for name in stored if name.startswith("model.layers.0.mlp.experts.")]
    # layer 0 as the checkpoint has it, layer 1 fused as at run time: accepted, loaded as the checkpoint
    mixed = {**{k: v for k, v in runtime.items() if not k.startswith("model.layers.0.mlp.experts.")},
             **{name: stored[name] for name in split}}
    assert _loaded(names, mixed).keys() == stored.keys()

    both = {**runtime, split[0]: stored[split[0]]}
    assert "given both under the checkpoint's name and within a tensor under a run-time name" in _refused(names, both)
    missing = {k: v for k, v in runtime.items() if k != fused}
    assert "missing tensors: ['model.layers.0.mlp.experts.0.gate_proj.weight'" in _refused(names, missing)
    short = {**runtime, fused: runtime[fused][:-1]}
    assert f"{fused!r}: shape [3, 384, 128], expected [4, 384, 128]" in _refused(names, short)


def test_a_renamed_head_comes_under_one_of_its_names(policies):
    folder = policies("gpt_neox")
    names = CheckpointNames(folder)
    runtime = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert "lm_head.weight" in runtime and "embed_out.weight" in names.layout
    both = {**runtime, "embed_out.weight": runtime["lm_head.weight"]}
    assert "['embed_out.weight']: given both" in _refused(names, both)
    unknown = {**runtime, "lm_head.bias": runtime["gpt_neox.final_layer_norm.bias"]}
    assert "'lm_head.bias': not a parameter of the served policy" in _refused(names, unknown)
