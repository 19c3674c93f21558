"""Cross-request dynamic batching for one model.

Samples from concurrent calls wait in one queue bounded in samples and tokens. A call is
admitted before it is tokenized: it reserves an upper bound of its tokens (`reserve`), then
queues its exact tokens (`submit`); a call that can never fit is refused as such (NeverFits),
one that does not fit now gets QueueFull with the time the queue needs to drain enough.

A batch is cut when the queued tokens fill `max_batch_tokens` or the oldest sample has
waited `max_wait_ms`. It is built around one sample, the seed: the oldest sample of the
caller served the fewest tokens among those waiting (start-time fair queueing: a caller
that arrives starts level with the caller of the last batch, so it neither banks credit
nor waits behind a large call), or with `fair=False` the oldest sample of all. The seed's
batch-mates are the queued samples closest to it in length, from any caller, within the
padded-token budget and `max_padding_ratio` (padding is computed like real tokens, while
on CPU a smaller batch costs little per token). The model runs in its own thread so the
event loop keeps answering health checks and new calls. Samples whose caller went away
(their future cancelled) are dropped before a batch is cut, never computed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
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
QUEUE_TOKENS = Gauge("rlhf_mesh_reward_queue_depth_tokens", "Tokens waiting for a batch.", ["model"])
RESERVED_TOKENS = Gauge("rlhf_mesh_reward_queue_reserved_tokens",
                        "Tokens held for admitted calls being tokenized (their upper bound).", ["model"])
DROPPED = Counter("rlhf_mesh_reward_dropped_samples_total", "Queued samples dropped: caller went away.", ["model"])


class QueueFull(Exception):
    """The queue cannot take the call now; `retry_after_s` estimates when it can."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NeverFits(Exception):
    """The call is larger than the whole queue."""


@dataclass
class Reservation:
    """Room held for a call while it is tokenized."""

    samples: int
    tokens: int


@dataclass(order=True)
class _Item:
    length: int
    seq: int
    ids: list[int] = field(compare=False)
    future: asyncio.Future[float] = field(compare=False)
    enqueued: float = field(compare=False)
    caller: str = field(compare=False)


class Batcher:
    """Batches samples for `score(batch) -> scores`, run in a dedicated thread."""

    def __init__(self, name: str, score: Callable[[list[list[int]]], list[float]], *,
                 max_batch_tokens: int, max_wait_ms: float, max_queued_tokens: int, max_queued_samples: int,
                 max_padding_ratio: float = 1.0, fair: bool = True) -> None:
        self.name = name
        self._score = score
        self._max_batch_tokens = max_batch_tokens
        self._max_padding_ratio = max_padding_ratio
        self._max_wait_s = max_wait_ms / 1000
        self._max_tokens = max_queued_tokens
        self._max_samples = max_queued_samples
        self._fair = fair
        self._queue: list[_Item] = []  # sorted by (length, arrival)
        self._tokens = 0
        self._reserved = Reservation(0, 0)  # all calls being tokenized
        self._seq = 0
        self._waiting: Tally[str] = Tally()  # queued samples per caller
        self._served: dict[str, int] = {}  # tokens per waiting caller, on one clock
        self._clock = 0  # the served count of the last batch's seed caller when it was cut
        self._pace: tuple[float, float] | None = None  # recent model seconds per sample and per token
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")
        self._task: asyncio.Task[None] | None = None
        self._depth = QUEUE_DEPTH.labels(name)
        self._depth_tokens = QUEUE_TOKENS.labels(name)
        self._reserved_tokens = RESERVED_TOKENS.labels(name)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._queue:
            item.future.cancel()
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def reserve(self, samples: int, tokens: int) -> Iterator[Reservation]:
        """Hold room for a call of `samples` samples and at most `tokens` tokens (a bound known
        before tokenizing; more than the whole queue holds only an empty queue) until it is
        submitted or fails; raises NeverFits or QueueFull."""
        self._drop_abandoned()
        room = Reservation(samples, min(tokens, self._max_tokens))
        self._check(room)
        self._reserved.samples += room.samples
        self._reserved.tokens += room.tokens
        self._reserved_tokens.set(self._reserved.tokens)
        try:
            yield room
        finally:
            self._release(room)

    def submit(self, samples: Sequence[list[int]], caller: str = "", room: Reservation | None = None
               ) -> list[asyncio.Future[float]]:
        """Queue all samples or none (NeverFits, QueueFull), in place of the room reserved for
        them; each future resolves to its score."""
        if room is not None:
            self._release(room)
        self._drop_abandoned()
        self._check(Reservation(len(samples), sum(map(len, samples))))
        if not samples:
            return []
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if caller not in self._served:
            self._served[caller] = self._clock
        futures = []
        for ids in samples:
            self._seq += 1
            item = _Item(len(ids), self._seq, ids, loop.create_future(), now, caller)
            bisect.insort(self._queue, item)
            self._tokens += item.length
            futures.append(item.future)
        self._waiting[caller] += len(samples)
        self._gauge()
        self._arrived.set()
        return futures

    def _check(self, call: Reservation) -> None:
        if call.samples > self._max_samples:
            raise NeverFits(f"{call.samples} samples, more than the queue's max_queued_samples={self._max_samples}")
        if call.tokens > self._max_tokens:
            raise NeverFits(f"{call.tokens} tokens, more than the queue's max_queued_tokens={self._max_tokens}")
        samples = len(self._queue) + self._reserved.samples + call.samples - self._max_samples
        tokens = self._tokens + self._reserved.tokens + call.tokens - self._max_tokens
        if samples > 0 or tokens > 0:
            raise QueueFull(
                f"{len(self._queue)} samples and {self._tokens} tokens queued, {self._reserved.tokens} more being "
                f"tokenized, limits max_queued_samples={self._max_samples}, max_queued_tokens={self._max_tokens}",
                self._drain_s(max(samples, 0), max(tokens, 0)))

    def _drain_s(self, samples: int, tokens: int) -> float:
        """How long the model takes to run this many queued samples and tokens at its recent pace."""
        if self._pace is None:
            return 1.0
        per_sample, per_token = self._pace
        return min(max(samples * per_sample, tokens * per_token, self._max_wait_s, 0.01), 60.0)

    def _release(self, room: Reservation) -> None:
        self._reserved.samples -= room.samples
        self._reserved.tokens -= room.tokens
        room.samples = room.tokens = 0
        self._reserved_tokens.set(self._reserved.tokens)

    def _gauge(self) -> None:
        self._depth.set(len(self._queue))
        self._depth_tokens.set(self._tokens)

    def _drop_abandoned(self) -> None:
        kept = [item for item in self._queue if not item.future.done()]
        if len(kept) != len(self._queue):
            DROPPED.labels(self.name).inc(len(self._queue) - len(kept))
            self._queue = kept
            self._tokens = sum(item.length for item in kept)
            self._waiting = Tally(item.caller for item in kept)
            self._served = {c: n for c, n in self._served.items() if c in self._waiting}
            self._gauge()

    def _seed(self) -> int:
        """Index of the sample the next batch is built around (see the module docstring)."""
        queue = self._queue
        if not self._fair:
            return min(range(len(queue)), key=lambda i: queue[i].seq)
        oldest: dict[str, int] = {}
        for i, item in enumerate(queue):
            j = oldest.get(item.caller)
            if j is None or item.seq < queue[j].seq:
                oldest[item.caller] = i
        return min(oldest.values(), key=lambda i: (self._served[queue[i].caller], queue[i].seq))

    def _cut(self) -> list[_Item]:
        """The seed and its nearest neighbours in length, within the token and padding budgets."""
        queue = self._queue
        seed = self._seed()
        self._clock = self._served[queue[seed].caller]
        lo = hi = seed  # the batch is queue[lo:hi + 1]
        real = queue[seed].length
        while True:
            left = queue[lo - 1] if lo > 0 else None
            right = queue[hi + 1] if hi + 1 < len(queue) else None
            # Grow towards the neighbour closer in length to the seed.
            pick = min(
                (c for c in (left, right) if c is not None),
                key=lambda c: abs(c.length - queue[seed].length), default=None,
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
        for item in batch:
            self._tokens -= item.length
            self._served[item.caller] += item.length
            self._waiting[item.caller] -= 1
            if not self._waiting[item.caller]:
                del self._waiting[item.caller], self._served[item.caller]
        self._gauge()
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
            seconds = time.perf_counter() - started
            pace = seconds / len(batch), seconds / real
            if self._pace is not None:  # a moving average over the last few batches
                pace = 0.8 * self._pace[0] + 0.2 * pace[0], 0.8 * self._pace[1] + 0.2 * pace[1]
            self._pace = pace
            MODEL_SECONDS.labels(self.name).observe(seconds)
            BATCH_SIZE.labels(self.name).observe(len(batch))
            BATCH_TOKENS.labels(self.name).observe(width * len(batch))
            PADDING_RATIO.labels(self.name).observe(1 - real / (width * len(batch)))
            TOKENS.labels(self.name, "real").inc(real)
            TOKENS.labels(self.name, "padding").inc(width * len(batch) - real)
            for item, score in zip(batch, scores, strict=True):
                if not item.future.done():
                    item.future.set_result(score)
