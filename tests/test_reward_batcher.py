"""The reward batcher: admission (bounds in samples and tokens, decided before tokenizing) and
the cut (which queued samples run together, and whose turn it is)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rlhf_mesh.clients.reward import to_sample
from rlhf_mesh.services.reward.batcher import Batcher, NeverFits, QueueFull
from rlhf_mesh.v1 import reward_pb2


def _batcher(score, **limits) -> Batcher:
    return Batcher("test", score, **{"max_wait_ms": 50, "max_queued_samples": 64, "max_queued_tokens": 1 << 16,
                                     "max_batch_tokens": 4096, **limits})


async def _batches(lengths: list[int], **limits) -> list[list[int]]:
    """Submit samples of these lengths at once; the lengths of every batch the model got."""
    seen: list[list[int]] = []

    def score(batch: list[list[int]]) -> list[float]:
        seen.append([len(ids) for ids in batch])
        return [float(len(ids)) for ids in batch]

    batcher = _batcher(score, **limits)
    batcher.start()
    try:
        scores = await asyncio.gather(*batcher.submit([[1] * n for n in lengths]))
    finally:
        await batcher.close()
    assert scores == lengths  # every caller got its own sample's score
    return seen


async def test_padding_budget_keeps_unlike_lengths_apart():
    # 60 next to 96 and 100 would be 44 padding tokens of 300 (15%)
    assert await _batches([100, 96, 60]) == [[60, 96, 100]]
    assert await _batches([100, 96, 60], max_padding_ratio=0.1) == [[96, 100], [60]]


async def test_token_budget_bounds_the_padded_batch():
    assert await _batches([100, 100, 100, 100], max_batch_tokens=300) == [[100, 100, 100], [100]]


@pytest.mark.parametrize("fair", [True, False])
async def test_a_small_caller_is_not_held_behind_a_large_call(fair):
    """A large call is queued and its first batch computes when a small caller arrives: with fair
    batches the small caller's sample is in the very next batch, by arrival it waits for the
    whole large call."""
    order: list[str] = []
    first_batch, go_on = threading.Event(), threading.Event()

    def score(batch: list[list[int]]) -> list[float]:
        order.append("small" if any(ids[0] == 2 for ids in batch) else "large")
        first_batch.set()
        go_on.wait(30)
        return [0.0] * len(batch)

    batcher = _batcher(score, max_batch_tokens=20, max_wait_ms=0, fair=fair)
    batcher.start()
    try:
        large = batcher.submit([[1] * 10] * 20, caller="flood")  # ten batches of two
        await asyncio.to_thread(first_batch.wait, 30)
        small = batcher.submit([[2] * 10], caller="honest")
        go_on.set()
        await asyncio.gather(*large, *small)
    finally:
        await batcher.close()
    assert len(order) == 11 and order.count("small") == 1
    assert order.index("small") == (1 if fair else 10)


async def test_callers_share_batches_by_tokens_served():
    """Three callers queue at once; each batch is seeded by the caller served the fewest tokens, so
    their samples alternate instead of running in arrival order."""
    order: list[int] = []

    def score(batch: list[list[int]]) -> list[float]:
        order.extend(ids[0] for ids in batch)
        return [0.0] * len(batch)

    batcher = _batcher(score, max_batch_tokens=10, max_wait_ms=0)
    futures = [f for caller in (1, 2, 3) for f in batcher.submit([[caller] * 10] * 3, caller=str(caller))]
    batcher.start()
    try:
        await asyncio.gather(*futures)
    finally:
        await batcher.close()
    assert order == [1, 2, 3] * 3


def _admits(batcher: Batcher, samples: int, tokens: int) -> bool:
    """Whether a call of this size is admitted now (its room given back at once)."""
    with batcher.reserve(samples, tokens):
        return True


async def test_admission_counts_samples_and_tokens_being_tokenized():
    batcher = _batcher(lambda batch: [0.0] * len(batch), max_queued_samples=4, max_queued_tokens=100)
    with batcher.reserve(2, 80) as room:  # the call's bound, before tokenizing
        with pytest.raises(QueueFull, match="80 more being tokenized") as full:
            _admits(batcher, 1, 30)
        assert full.value.retry_after_s > 0
        assert _admits(batcher, 2, 20)  # what is left fits
        batcher.submit([[1] * 30, [1] * 10], "a", room)  # exact: 40 tokens, the rest of the bound is freed
    assert _admits(batcher, 2, 60)
    with pytest.raises(QueueFull, match="2 samples and 40 tokens queued"):
        _admits(batcher, 3, 3)
    with pytest.raises(ZeroDivisionError), batcher.reserve(2, 60):  # a call failing while tokenized
        _ = 1 / 0
    assert _admits(batcher, 2, 60)  # ... gave its room back
    await batcher.close()


async def test_a_call_larger_than_the_queue_is_refused_as_never_fitting():
    batcher = _batcher(lambda batch: [0.0] * len(batch), max_queued_samples=4, max_queued_tokens=100)
    with pytest.raises(NeverFits, match="5 samples, more than the queue's max_queued_samples=4"):
        _admits(batcher, 5, 5)
    with batcher.reserve(2, 500) as room:  # a loose bound holds at most the whole queue
        with pytest.raises(QueueFull):
            _admits(batcher, 1, 1)
        with pytest.raises(NeverFits, match="101 tokens, more than the queue's max_queued_tokens=100"):
            batcher.submit([[1] * 100, [1]], "a", room)  # exact, after tokenizing
    assert batcher.submit([[1] * 100], "a")  # the queue is whole again
    await batcher.close()


@pytest.fixture(scope="module")
def tokenization(tiny_models):
    from transformers import AutoTokenizer

    from rlhf_mesh.services.reward.reward_model import Tokenization

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward"])
    with_template = Tokenization(tokenizer, max_length=1 << 16, truncation="left")
    plain = AutoTokenizer.from_pretrained(tiny_models["reward"])
    plain.chat_template = None
    return with_template, Tokenization(plain, max_length=1 << 16, truncation="left")


def test_the_bound_before_tokenizing_holds_the_tokens(tokenization):
    texts = ["", "a", "Hello there!", "é" * 50, "🙂 " * 40, "\n\t  x", "The answer is 4. " * 30, "ab" * 2000]
    samples = [to_sample((p, r)) for p in texts for r in texts if p or r]
    samples += [reward_pb2.ScoreSample(query=reward_pb2.QueryText(text=t, prompt=t[:5], add_special_tokens=special))
                for t in texts if t for special in (True, False)]
    samples += [to_sample([{"role": role, "content": t} for role in ("system", "user", "assistant")]) for t in texts]
    samples += [to_sample([5] * n) for n in (1, 7, 2000)]
    for tokens in tokenization:
        for i, sample in enumerate(samples):
            if sample.HasField("chat") and not tokens.has_chat_template:
                continue
            assert len(tokens.encode(i, sample).ids) <= tokens.bound(sample), sample
