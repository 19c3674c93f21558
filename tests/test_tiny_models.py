"""The locally built models load through the real from_pretrained paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from support import greedy

PROMPT = "Hello there, my friend"


def _greedy_transformers(path, prompt: str, max_new_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return out[0, ids.shape[1]:].tolist()


def test_tokenizer_has_chat_template_and_special_tokens(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.decode(tokenizer("Thank you, that is kind.").input_ids) == "Thank you, that is kind."


def test_policy_generates_in_transformers(tiny_models):
    """generate() with its KV cache gives what a full forward per token gives, and the prompt matters."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    tokens = _greedy_transformers(tiny_models["policy"], PROMPT, 8)
    assert tokens == greedy(model, tokenizer(PROMPT).input_ids, 8)
    assert all(0 <= t < model.config.vocab_size for t in tokens)
    assert greedy(model, tokenizer("Thank you").input_ids, 8) != tokens


def test_reward_model_is_a_one_label_classifier_with_padding(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["A short one.", "A much longer text that needs padding in a batch with the short one."]
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        batched = model(**batch).logits
        alone = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])
    assert batched.shape == (2, 1)
    # pad_token_id lets the head find each sequence's last real token.
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


VLLM_GREEDY = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from rlhf_mesh.vllm_memory import kv_cache_memory_bytes
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              kv_cache_memory_bytes=kv_cache_memory_bytes(None))
    out = llm.generate([sys.argv[2]], SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), ignore_eos=True))
    print("RESULT " + json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.mark.slow
def test_vllm_greedy_equals_transformers_greedy(tiny_models):
    result = subprocess.run(
        [sys.executable, "-c", VLLM_GREEDY, str(tiny_models["policy"]), PROMPT, "8"],
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(lines[0][len("RESULT "):]) == _greedy_transformers(tiny_models["policy"], PROMPT, 8)
