"""The reward batcher's cut: which queued samples run together."""

from __future__ import annotations

import asyncio

from rlhf_mesh.services.reward.batcher import Batcher


async def _batches(lengths: list[int], **limits) -> list[list[int]]:
    """Submit samples of these lengths at once; the lengths of every batch the model got."""
    seen: list[list[int]] = []

    def score(batch: list[list[int]]) -> list[float]:
        seen.append([len(ids) for ids in batch])
        return [float(len(ids)) for ids in batch]

    batcher = Batcher("test", score, max_wait_ms=50, max_queue_samples=64, **{"max_batch_tokens": 4096, **limits})
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
