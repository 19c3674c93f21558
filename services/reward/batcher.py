"""Cross-request dynamic batching for one model.

Samples from concurrent calls wait in one bounded queue. A batch is cut when the queued
tokens fill `max_batch_tokens` or the oldest sample has waited `max_wait_ms`; it always
holds the oldest sample (no starvation) plus the queued samples closest to it in length,
within the padded-token budget and `max_padding_ratio` (padding is computed like real
tokens, while on CPU a smaller batch costs little per token). The model runs in its own
thread so the event loop keeps answering health checks and new calls. Samples whose caller
went away (their future cancelled) are dropped before a batch is cut, never computed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "rlhf_mesh_reward_batch_size_samples", "Samples per model batch.", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BATCH_TOKENS = Histogram(
    "rlhf_mesh_reward_batch_tokens", "Padded tokens per model batch.", ["model"],
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
PADDING_RATIO = Histogram(
    "rlhf_mesh_reward_padding_ratio", "Padding tokens / all tokens of a batch.", ["model"],
    buckets=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
)
TOKENS = Counter("rlhf_mesh_reward_tokens_total", "Tokens run through the model, real or padding.", ["model", "kind"])
QUEUE_WAIT = Histogram(
    "rlhf_mesh_reward_queue_wait_seconds", "Time from enqueue to batch start.", ["model"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
MODEL_SECONDS = Histogram(
    "rlhf_mesh_reward_model_seconds", "Model forward time per batch.", ["model"],
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
QUEUE_DEPTH = Gauge("rlhf_mesh_reward_queue_depth_samples", "Samples waiting for a batch.", ["model"])
DROPPED = Counter("rlhf_mesh_reward_dropped_samples_total", "Queued samples dropped: caller went away.", ["model"])


class QueueFull(Exception):
    """The queue cannot take the samples now."""


@dataclass(order=True)
class _Item:
    length: int
    seq: int
    ids: list[int] = field(compare=False)
    future: asyncio.Future[float] = field(compare=False)
    enqueued: float = field(compare=False)


class Batcher:
    """Batches samples for `score(batch) -> scores`, run in a dedicated thread."""

    def __init__(self, name: str, score: Callable[[list[list[int]]], list[float]], *,
                 max_batch_tokens: int, max_wait_ms: float, max_queue_samples: int,
                 max_padding_ratio: float = 1.0) -> None:
        self.name = name
        self._score = score
        self._max_batch_tokens = max_batch_tokens
        self._max_padding_ratio = max_padding_ratio
        self._max_wait_s = max_wait_ms / 1000
        self._max_queue = max_queue_samples
        self._queue: list[_Item] = []  # sorted by (length, arrival)
        self._tokens = 0
        self._seq = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")
        self._task: asyncio.Task[None] | None = None
        self._depth = QUEUE_DEPTH.labels(name)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._queue:
            item.future.cancel()
        self._executor.shutdown(wait=True)

    def submit(self, samples: Sequence[list[int]]) -> list[asyncio.Future[float]]:
        """Queue all samples or none (QueueFull); each future resolves to its score."""
        self._drop_abandoned()
        if len(self._queue) + len(samples) > self._max_queue:
            raise QueueFull(f"{len(self._queue)} samples queued, limit {self._max_queue}")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        for ids in samples:
            self._seq += 1
            item = _Item(len(ids), self._seq, ids, loop.create_future(), now)
            bisect.insort(self._queue, item)
            self._tokens += item.length
            futures.append(item.future)
        self._depth.set(len(self._queue))
        self._arrived.set()
        return futures

    def _drop_abandoned(self) -> None:
        kept = [item for item in self._queue if not item.future.done()]
        if len(kept) != len(self._queue):
            DROPPED.labels(self.name).inc(len(self._queue) - len(kept))
            self._queue = kept
            self._tokens = sum(item.length for item in kept)
            self._depth.set(len(kept))

    def _cut(self) -> list[_Item]:
        """The oldest item and its nearest neighbours in length, within the token and padding budgets."""
        queue = self._queue
        oldest = min(range(len(queue)), key=lambda i: queue[i].seq)
        lo = hi = oldest  # the batch is queue[lo:hi + 1]
        real = queue[oldest].length
        while True:
            left = queue[lo - 1] if lo > 0 else None
            right = queue[hi + 1] if hi + 1 < len(queue) else None
            # Grow towards the neighbour closer in length to the oldest item.
            pick = min(
                (c for c in (left, right) if c is not None),
                key=lambda c: abs(c.length - queue[oldest].length), default=None,
            )
            if pick is None:
                break
            width = max(queue[hi].length, pick.length)
            padded = width * (hi - lo + 2)
            if padded > self._max_batch_tokens or padded - real - pick.length > self._max_padding_ratio * padded:
                break
            real += pick.length
            if pick is left:
                lo -= 1
            else:
                hi += 1
        batch = queue[lo : hi + 1]
        del queue[lo : hi + 1]
        self._tokens -= sum(item.length for item in batch)
        self._depth.set(len(queue))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            oldest = min(item.enqueued for item in self._queue)
            wait = oldest + self._max_wait_s - time.perf_counter()
            if wait > 0 and self._tokens < self._max_batch_tokens:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), wait)
                continue
            batch = self._cut()
            started = time.perf_counter()
            width = batch[-1].length
            real = sum(item.length for item in batch)
            for item in batch:
                QUEUE_WAIT.labels(self.name).observe(started - item.enqueued)
            try:
                scores = await loop.run_in_executor(self._executor, self._score, [item.ids for item in batch])
            except Exception as err:  # the callers get the error; the batcher goes on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            MODEL_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            BATCH_SIZE.labels(self.name).observe(len(batch))
            BATCH_TOKENS.labels(self.name).observe(width * len(batch))
            PADDING_RATIO.labels(self.name).observe(1 - real / (width * len(batch)))
            TOKENS.labels(self.name, "real").inc(real)
            TOKENS.labels(self.name, "padding").inc(width * len(batch) - real)
            for item, score in zip(batch, scores, strict=True):
                if not item.future.done():
                    item.future.set_result(score)
