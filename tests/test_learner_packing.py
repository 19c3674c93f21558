"""Padding-free packing, chunked log-probs and token-budget micro-batches: the padded, whole-logits
numbers (log-probs, entropy, values, loss, gradients) for less padding and memory."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_mesh import tiny_models
from rlhf_mesh.services.learner import packed_attention, ppo
from rlhf_mesh.services.learner.micro_batches import balanced_parts, by_tokens
from rlhf_mesh.services.learner.models import Critic, forward, layout_support, make_batch, with_lora

# Every layout against the first: padded rows with the model's own logits (what the learner did before).
LAYOUTS = [(False, 0), (True, 0), (False, 5), (True, 5)]  # (packed, chunk)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folders = {}

    def get(arch: str):
        if arch not in folders:
            folders[arch] = tiny_models.build(tmp_path_factory.mktemp(arch), arch=arch)
        return folders[arch]
    return get


def _rows(seed: int, count: int = 5) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(5, 300) for _ in range(rng.randrange(1, 9))] for _ in range(count)]
    responses = [[rng.randrange(5, 300) for _ in range(rng.choice([1, 2, 7, 23, 40]))] for _ in range(count)]
    return prompts, responses


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen3_moe", "gpt2", "gemma3", "llama+lora"])
def test_packed_rows_and_chunked_logits_equal_padded_whole_logits(built, arch):
    """On an untied, a tied, an MoE, a learned-position, a sliding-window and a LoRA model: the
    log-probs, entropy, value-head input, critic values, a PPO-like loss and every gradient are
    the same (float32 rounding) whether the rows are padded or packed and the logits whole or in
    chunks of 5 tokens. Packed rows attend one sequence at a time but with a sliding window
    (gemma3's local layers), which transformers' packed-sequence mask keeps instead."""
    paths = built(arch.removesuffix("+lora"))
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32).eval()
    if arch.endswith("+lora"):
        policy = with_lora(policy, None, r=4, alpha=8, dropout=0.0, target_modules=None)
        for name, weight in policy.named_parameters():
            if "lora_B" in name:  # a trained adapter, not the initial zero update
                torch.nn.init.normal_(weight, std=0.05)
    critic = Critic(AutoModelForSequenceClassification.from_pretrained(paths["reward"], dtype=torch.float32).eval())
    assert layout_support([policy], critic, packing=True, chunking=True) == (True, True)
    expected = "sdpa" if arch == "gemma3" else packed_attention.NAME
    assert policy.config._attn_implementation == critic.model.config._attn_implementation == expected
    prompts, responses = _rows(0)
    batch = make_batch(prompts, responses, pad_id=0)
    advantages = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(1))
    trainable = [p for p in [*policy.parameters(), *critic.parameters()] if p.requires_grad]
    results = []
    for packed, chunk in LAYOUTS:
        out = forward(policy, batch, 0.7, hidden=True, packed=packed, chunk=chunk, entropy_grad=True)
        values = critic(batch, packed=packed)
        losses, _ = ppo.policy_loss(out.logprobs, out.logprobs.detach() - 0.1, advantages, batch.mask)
        loss = ppo.agg_loss(losses - 0.01 * out.entropy + (values - 1) ** 2, batch.mask, "token-mean",
                            tokens=batch.mask.sum(), sequences=len(batch), horizon=40)
        grads = torch.autograd.grad(loss, trainable)
        valid = batch.valid
        results.append({"logprobs": out.logprobs, "entropy": out.entropy, "hidden": out.hidden[valid],
                        "values": values[valid], "loss": loss, **{f"grad {i}": g for i, g in enumerate(grads)}})
    assert results[0]["logprobs"][~batch.valid].eq(0).all()
    for layout, got in zip(LAYOUTS[1:], results[1:], strict=True):
        for name, expected in results[0].items():
            torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5, msg=f"{layout} {name}")


@pytest.mark.parametrize("attention", ["one sequence at a time", "transformers' packed-sequence mask"])
def test_no_attention_crosses_a_sequence_boundary_in_a_packed_row(built, attention):
    """Three sequences in one packed row: another middle sequence changes its own log-probs and
    none of its neighbours'."""
    policy = AutoModelForCausalLM.from_pretrained(built("llama")["policy"], dtype=torch.float32).eval()
    if attention == "one sequence at a time":
        assert packed_attention.install(policy)
    prompts, responses = _rows(2, count=3)
    outputs = []
    with torch.no_grad():
        for middle in (responses[1], [t + 1 for t in responses[1]]):
            batch = make_batch(prompts, [responses[0], middle, responses[2]], pad_id=0)
            outputs.append(forward(policy, batch, 1.0, packed=True, chunk=4).logprobs)
    before, after = outputs
    assert not torch.allclose(before[1], after[1])
    for row in (0, 2):
        torch.testing.assert_close(after[row], before[row], rtol=0, atol=1e-6)


def test_karmarkar_karp_parts_and_token_budget_micro_batches():
    """Every row exactly once, every rank as many micro-batches, the ranks' token sums within one
    row of each other, and no micro-batch over the budget unless it is one row."""
    assert balanced_parts([8, 7, 6, 5, 4], 2) == [[0, 2], [1, 3, 4]]  # 14 + 16: the optimum is 15 + 15
    assert sorted(map(len, balanced_parts([10, 1, 1], 3))) == [1, 1, 1]
    torch.manual_seed(0)
    for ranks, budget in ((1, 3000), (2, 3000), (2, 800), (4, 5000)):
        lengths = torch.distributions.LogNormal(5.3, 0.9).sample((32,)).clamp(max=2048).long() + 20
        parts = by_tokens(lengths, budget, ranks)
        assert len(parts) == ranks and len({len(p) for p in parts}) == 1
        assert sorted(torch.cat([m for p in parts for m in p]).tolist()) == list(range(32))
        sums = [int(sum(lengths[m].sum() for m in p)) for p in parts]
        assert max(sums) - min(sums) <= int(lengths.max()), sums
        assert all(lengths[m].sum() <= budget or len(m) == 1 for p in parts for m in p), (ranks, budget)
    # Two of the 900-token rows share a rank (1800 against 950 tokens is the best split); the other
    # takes the third and the short rows. Each makes 2 micro-batches: the long rows alone, the short together.
    parts = by_tokens(torch.tensor([900, 900, 900, 10, 10, 10, 10, 10]), 500, 2)
    assert [len(p) for p in parts] == [2, 2] and sorted(len(m) for p in parts for m in p) == [1, 1, 1, 5]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_token_budget_micro_batches_on_two_ranks_train_like_one_padded_process(tiny_models, tmp_path, sharding):
    """Responses of 1 to 60 tokens, PPO with a critic model: 2 ranks (DDP, or FSDP2 shards) packing
    their rows into micro-batches of at most 150 tokens, the logits in chunks, end 2 steps of 2
    epochs with the weights and losses of one process on padded rows with whole logits."""
    from test_learner_parts import _fixed_steps, _spawn, _trainer_settings

    steps = _fixed_steps(2, seed=6, policy=tiny_models["policy"], lengths=range(1, 61))
    settings = _trainer_settings(tiny_models)
    one = _spawn(1, {**settings, "padding_free": False, "logprobs_chunk_size": 0}, steps, tmp_path / "one")
    two = _spawn(2, {**settings, "max_tokens_per_micro_batch": 150, "logprobs_chunk_size": 16,
                     "fsdp": sharding == "fsdp2"}, steps, tmp_path / "two")
    initial = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).state_dict()
    assert not all(torch.equal(w, initial[n]) for n, w in one["policy"].items())  # training moved the weights
    for name, weight in one["policy"].items():
        torch.testing.assert_close(two["policy"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    for expected, got in zip(one["scalars"], two["scalars"], strict=True):
        for name in ("losses/policy_loss", "losses/value_loss", "objective/entropy", "losses/grad_norm",
                     "objective/kl"):
            assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
