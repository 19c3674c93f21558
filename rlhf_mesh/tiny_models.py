"""Build small models locally: a policy, a reward model and their tokenizer, of any
architecture in ARCHS (Llama by default).

No model hub is needed: a byte-level BPE tokenizer is trained on an embedded corpus and
the models are initialised from a config, then written with `save_pretrained`, so they load
through the real `from_pretrained` path in transformers and vLLM alike. torch and
transformers are imported inside the functions so that the CLI starts fast.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# One turn per message; the assistant turn ends with EOS so generation stops there.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# The same turns, plus tools as Hermes-style models take them (vLLM's `hermes` tool parser reads the
# calls): the tools in a system turn, an assistant's calls as <tool_call> JSON, a tool's result as
# <tool_response> in a user turn. Without tools or tool messages it renders as CHAT_TEMPLATE.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|system|>\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\nCall a tool with <tool_call>\n{\"name\": <name>, \"arguments\": <arguments>}\n"
    "</tool_call><|end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{ '<|system|>\n' + messages[0]['content'] + '<|end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}{{ '}\n</tool_call>' }}"
    "{%- endfor %}{{ '<|end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|user|>\n<tool_response>\n' + message['content'] + '\n</tool_response><|end|>\n' }}"
    "{%- else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """Architecture shared by the policy and the reward model (vLLM CPU needs head_dim >= 32)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    vocab_size: int | None = None  # rows of the embedding and the LM head; default: the tokenizer's


PRESETS = {
    # Tests and the demo on two CPU cores.
    "tiny": Preset(128, 384, 2, 4, 2, 1024),
    # About 20M parameters: reward throughput benchmarks.
    "small": Preset(512, 1408, 6, 8, 4, 1024),
    # About 100M parameters: weight-push benchmarks.
    "base": Preset(768, 2816, 12, 12, 4, 2048),
    # About 400M parameters: the learner's memory at a size where weights outweigh the runtime.
    "large": Preset(1024, 4096, 24, 16, 8, 2048),
    # A 64k-row vocabulary (Qwen and Llama have 150k / 128k) on small layers: the logits' cost shows.
    "vocab64k": Preset(512, 1408, 4, 8, 4, 4096, vocab_size=65536),
}

_SUBJECTS = ["the cat", "a robot", "my friend", "the teacher", "our team", "the river", "a small bird",
             "the old man", "this model", "the garden", "a student", "the city", "the ship", "her brother"]
_VERBS = ["likes", "helps", "finds", "watches", "builds", "answers", "thanks", "follows", "reads",
          "remembers", "explains", "visits", "paints", "carries"]
_OBJECTS = ["the sun", "a good book", "the answer", "fresh bread", "the music", "a kind word", "the map",
            "a new idea", "the question", "warm tea", "the door", "a long story", "the stars", "clean water"]
_ENDINGS = ["today.", "every morning.", "with care.", "again and again.", "because it is nice.",
            "and feels happy.", "before the rain.", "in the quiet evening.", "very politely.", "!",
            "? Please tell me.", "- thank you so much."]
_EXTRA = [
    "Hello! How are you today? I am fine, thank you.",
    "Please explain why the sky is blue in simple words.",
    "Write a short poem about autumn leaves and cold wind.",
    "What is 2 + 2? The answer is 4.",
    "Thank you, that is very helpful and kind of you.",
    "Sorry, I do not know. Could you please ask again?",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Great, wonderful, excellent, amazing, lovely, brilliant, happy, glad.",
    "Bad, terrible, awful, sad, angry, wrong, broken, lost.",
]


def corpus() -> list[str]:
    """Deterministic English-like text the tokenizer is trained on."""
    lines = [f"{s.capitalize()} {v} {o} {e}" for s, v, o, e in itertools.product(
        _SUBJECTS, _VERBS, _OBJECTS, _ENDINGS[:4])]
    return lines + _EXTRA * 20


def prompts() -> list[str]:
    """Sentence starts the tiny policy can continue: the prompts of the demo and the tests."""
    return [f"{s.capitalize()} {v}" for s, v in itertools.product(_SUBJECTS, _VERBS)]


MAX_VOCAB_SIZE = 4096  # the BPE merges stop earlier on this corpus (about 600 tokens)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS), model_max_length=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config_kwargs(arch: str, preset: Preset) -> dict:
    """The transformers config of `arch` at the size of `preset` (head_dim 32 on the tiny one)."""
    p = {k: v for k, v in asdict(preset).items() if k != "vocab_size"}
    head_dim = preset.hidden_size // preset.num_attention_heads
    if arch == "gpt2":  # Conv1D projections, learned positions, tied head
        return dict(model_type="gpt2", n_embd=p["hidden_size"], n_inner=p["intermediate_size"],
                    n_layer=p["num_hidden_layers"], n_head=p["num_attention_heads"],
                    n_positions=p["max_position_embeddings"], tie_word_embeddings=True)
    base = dict(p, rms_norm_eps=1e-5)
    if arch in ("llama", "llama-tied"):
        return dict(base, model_type="llama", tie_word_embeddings=arch == "llama-tied")
    if arch == "qwen2":  # q/k/v biases, tied like Qwen2.5-0.5B
        return dict(base, model_type="qwen2", tie_word_embeddings=True, use_sliding_window=False)
    if arch == "qwen3":  # q/k norms, tied like Qwen3-0.6B
        return dict(base, model_type="qwen3", head_dim=head_dim, tie_word_embeddings=True, use_sliding_window=False)
    if arch == "mistral":
        return dict(base, model_type="mistral", tie_word_embeddings=False, sliding_window=None)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj in the checkpoint
        return dict(base, model_type="phi3", tie_word_embeddings=False)
    if arch == "gemma3":  # (1 + w) norms, scaled embeddings, local and global layers, tied
        return dict(base, model_type="gemma3_text", head_dim=head_dim, query_pre_attn_scalar=head_dim,
                    sliding_window=64, layer_types=["sliding_attention", "full_attention"][: p["num_hidden_layers"]]
                    * max(1, p["num_hidden_layers"] // 2), tie_word_embeddings=True, rms_norm_eps=1e-6)
    if arch == "qwen2_moe":  # 4 routed experts (2 per token) and a shared expert, tied
        return dict(base, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=p["intermediate_size"] // 2,
                    shared_expert_intermediate_size=p["intermediate_size"] // 2, decoder_sparse_step=1,
                    tie_word_embeddings=True, use_sliding_window=False)
    if arch == "mixtral":  # 4 experts, 2 per token, untied
        return dict(base, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                    tie_word_embeddings=False, sliding_window=None)
    if arch == "qwen3_moe":  # 4 experts, 2 per token, q/k norms, untied like Qwen3-30B-A3B
        return dict(base, model_type="qwen3_moe", head_dim=head_dim, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=p["intermediate_size"] // 2, decoder_sparse_step=1, norm_topk_prob=True,
                    tie_word_embeddings=False, use_sliding_window=False)
    if arch == "gpt_neox":  # parallel residual, partial rotary, the head is `embed_out` (Pythia)
        return dict({k: v for k, v in p.items() if k != "num_key_value_heads"}, model_type="gpt_neox",
                    layer_norm_eps=1e-5, tie_word_embeddings=False)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


# Architectures `build` writes: the families most RLHF runs start from, at toy size.
ARCHS = ("llama", "llama-tied", "qwen2", "qwen3", "mistral", "phi3", "gemma3", "gpt2", "qwen2_moe", "mixtral",
         "qwen3_moe", "gpt_neox")


def build(out_dir: str | Path, seed: int = 0, preset: str = "tiny", arch: str = "llama") -> dict[str, Path]:
    """Write `policy/` (a causal LM of `arch`) and `reward/` (its `*ForSequenceClassification`,
    one label) with the same tokenizer, and `prompts.jsonl`, under `out_dir`; the same seed
    gives the same files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (PAD, BOS, EOS)}
    kwargs = _config_kwargs(arch, PRESETS[preset])
    config = AutoConfig.for_model(
        **kwargs, vocab_size=PRESETS[preset].vocab_size or len(tokenizer), pad_token_id=ids[PAD],
        bos_token_id=ids[BOS], eos_token_id=ids[EOS],
        dtype="float32",
    )
    torch.manual_seed(seed)
    paths = {"policy": out / "policy", "reward": out / "reward"}
    policy = AutoModelForCausalLM.from_config(config)
    policy.generation_config = GenerationConfig(
        eos_token_id=ids[EOS], pad_token_id=ids[PAD], bos_token_id=ids[BOS]
    )
    reward = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(**{**config.to_dict(), "num_labels": 1, "id2label": None, "label2id": None})
    )
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["prompts"] = out / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
    (out / "models.json").write_text(json.dumps(
        {"seed": seed, "preset": preset, "arch": arch, "parameters": {
            "policy": sum(p.numel() for p in policy.parameters()),
            "reward": sum(p.numel() for p in reward.parameters()),
        }}, indent=2) + "\n")
    return paths
