"""The worker processes user code runs in, never in a server's event loop: the RewardService's
reward functions and the EnvironmentService's environments.

Admission and order are the pool's own, not pebble's: a call is refused at once when the
queue is full (PoolFull, with a retry hint), queued per caller, and handed to pebble only
when a worker is free (FairQueue: the caller running the fewest tasks goes first, and no
caller holds more than `workers_per_caller` workers, so one caller's slow calls always leave a
worker for the others). Built-ins run one sample a task, so a caller's slow samples interleave
with other callers' calls; a user function gets its call's samples together, as TRL gives a
batch (a reward may compare the samples of a group). A call's timeout counts from its arrival:
one that waited it out, or whose time left is shorter than its function's recent calls took
(it would be stopped, and a stopped worker costs every caller its respawn), fails without
running. When the queue is full, the caller holding the most queued samples gives way.

A function that raises, runs past its timeout, miscounts, allocates past its worker's memory
limit or kills its worker fails that call alone (FunctionFailed); the caller sees the
exception's type and a reference, the server log its traceback; pebble replaces a dead worker
and every other call goes on. Workers are spawned (not forked from a server with threads) and
run each function on their main thread, where math-verify's SIGALRM timeouts work.

The EnvironmentService runs its environments in the same pool (`run`: one task of any module-level
function, with the same admission, fairness, timeouts and failure handling); `what` and `settings`
name the pool's user and its settings in every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import resource
import secrets
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import pebble
from prometheus_client import Counter as Counted
from prometheus_client import Gauge, Histogram

from rlhf_mesh import reward_functions as functions

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("rlhf_mesh_reward_function_queue_depth_samples", "Samples queued for the function workers.")
WAIT = Histogram("rlhf_mesh_reward_function_queue_wait_seconds", "From a call's arrival to the start of each task.",
                 buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
REFUSED = Counted("rlhf_mesh_reward_function_refused_calls_total",
                  "Function calls refused: full (queue full), evicted (pushed out by others' calls), "
                  "expired (waited past the timeout, never ran).", ["reason"])


class FunctionFailed(Exception):
    """A reward function call that produced no scores; the message says why."""


class FunctionTimedOut(FunctionFailed):
    """The call ran, or waited, past its timeout (counted from its arrival)."""


class FunctionRaised(FunctionFailed):
    """The function raised: its exception's type for the caller, its traceback for the log."""

    def __init__(self, kind: str, details: str) -> None:
        super().__init__(kind, details)
        self.kind, self.details = kind, details


class PoolFull(Exception):
    """No room for the call in the queue now; `retry_after_s` says when there may be."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CallTooLarge(ValueError):
    """A call of more samples than the whole queue holds: it could never be admitted."""


# In each worker: what it loaded (spec -> the loader's result), its loader, its memory limit and
# the prefix of its pool's settings (for messages).
_loaded: dict[str, Any] = {}
_load: Callable[[str], Any] = functions.load
_memory_mb = 0
_settings = "function_"


def _start_worker(memory_mb: int, specs: tuple[str, ...], load: Callable[[str], Any] = functions.load,
                  settings: str = "function_") -> None:
    """Pool initializer: caps the worker's data memory (heap and private mappings, not shared
    libraries) and imports its functions before it takes a task. It must not raise: pebble
    takes a worker that dies while no task runs for a broken pool."""
    global _memory_mb, _load, _settings
    _load, _settings = load, settings
    if memory_mb:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        limit = memory_mb << 20 if hard == resource.RLIM_INFINITY else min(memory_mb << 20, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        _memory_mb = memory_mb
    for spec in specs:
        with contextlib.suppress(Exception):  # check() reports a function that cannot load
            loaded(spec)


def loaded(spec: str) -> Any:
    """What `spec` names, loaded once per worker: a reward function, or an environment class."""
    if spec not in _loaded:
        _loaded[spec] = _load(spec)
    return _loaded[spec]


def _out_of_memory(spec: str) -> FunctionFailed:
    limit = f": its worker may use {_memory_mb} MiB ({_settings}worker_memory_mb)" if _memory_mb else ""
    return FunctionFailed(f"{spec} ran out of memory{limit}")


def _run_task(target: Callable[..., Any], spec: str, args: tuple) -> list[Any]:
    """One task of `run`, in a worker: `target(spec, *args)`, as a list of one result."""
    try:
        return [target(spec, *args)]
    except MemoryError:
        raise _out_of_memory(spec) from None
    except FunctionFailed:
        raise
    except Exception as err:
        raise FunctionRaised(type(err).__name__, traceback.format_exc()) from None


def _run(spec: str, prompts: list, completions: list[str], kwargs: dict) -> list[float | None]:
    """One task, in a worker: plain floats (or None), or an exception the server can unpickle
    whatever the function raised."""
    try:
        scores = list(loaded(spec)(prompts, completions, **kwargs))
    except MemoryError:
        raise _out_of_memory(spec) from None
    except Exception as err:
        raise FunctionRaised(type(err).__name__, traceback.format_exc()) from None
    if len(scores) != len(completions):
        raise FunctionFailed(f"{spec} returned {len(scores)} scores for {len(completions)} samples")
    for i, score in enumerate(scores):
        if not is_score(score):
            shown = repr(score) if isinstance(score, int | float) else f"a {type(score).__name__}"
            raise FunctionFailed(f"{spec} returned {shown} for sample {i}: a finite number or None is needed")
    return [None if s is None else float(s) for s in scores]


def is_score(value: object) -> bool:
    """A score user code may give: a finite number (not a bool), or None (does not apply)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value))


def _check(spec: str) -> None:
    try:
        loaded(spec)
    except MemoryError:
        raise _out_of_memory(spec) from None
    except Exception as err:  # the operator's own start-up error: its text is for them
        raise FunctionFailed(f"{type(err).__name__}: {err}") from None


class FairQueue:
    """Queued items, FIFO per caller. The next is the oldest item of the caller running the
    fewest items (round robin among equals), never one of a caller already running
    `per_caller`; sizes (samples) count toward the queue's depth."""

    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self.depth = 0
        self._waiting: dict[str, deque[tuple[Any, int]]] = {}  # in round-robin order
        self._queued: Counter[str] = Counter()  # samples queued by caller
        self._running: Counter[str] = Counter()

    def push(self, caller: str, item: Any, size: int = 1) -> None:
        self._waiting.setdefault(caller, deque()).append((item, size))
        self._queued[caller] += size
        self.depth += size

    def pop(self) -> Any | None:
        """The next item to run (counted as running until `done`), or None."""
        ready = [c for c in self._waiting if self._running[c] < self.per_caller]
        if not ready:
            return None
        caller = min(ready, key=self._running.__getitem__)  # the first of equals: round robin
        waiting = self._waiting.pop(caller)
        item, size = waiting.popleft()
        if waiting:
            self._waiting[caller] = waiting  # to the back of the round
        self._take(caller, size)
        self._running[caller] += 1
        return item

    def done(self, caller: str) -> None:
        self._running[caller] -= 1
        if not self._running[caller]:
            del self._running[caller]

    def remove(self, caller: str, drop: Callable[[Any], bool]) -> None:
        """Drops the caller's queued items for which `drop` holds."""
        waiting = self._waiting.pop(caller, deque())
        kept = deque()
        for item, size in waiting:
            if drop(item):
                self._take(caller, size)
            else:
                kept.append((item, size))
        if kept:
            self._waiting[caller] = kept

    def queued(self, caller: str) -> int:
        return self._queued[caller]

    def largest(self) -> str | None:
        """The caller with the most samples queued."""
        return max(self._queued, key=self._queued.__getitem__, default=None)

    def newest(self, caller: str) -> Any:
        return self._waiting[caller][-1][0]

    def _take(self, caller: str, size: int) -> None:
        self._queued[caller] -= size
        if not self._queued[caller]:
            del self._queued[caller]
        self.depth -= size


@dataclass(eq=False)
class _Call:
    spec: str
    caller: str
    prompts: list
    completions: list[str]
    kwargs: dict
    arrival: float
    future: asyncio.Future
    scores: list = field(default_factory=list)
    pending: int = 0  # tasks not finished
    started: bool = False
    running: set[_Task] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None
    task: tuple[Callable[..., Any], tuple] | None = None  # run(): the target and its arguments


@dataclass(eq=False)
class _Task:
    call: _Call
    part: slice
    future: Future | None = None
    started: float = 0.0

    @property
    def size(self) -> int:
        return self.part.stop - self.part.start


class FunctionPool:
    """`workers` processes shared by every function of the server (`specs`, loaded by each
    worker at its start)."""

    def __init__(self, specs: Iterable[str], *, workers: int, timeout_s: float, max_queued_samples: int,
                 workers_per_caller: int | None = None, memory_mb: int = 0,
                 load: Callable[[str], Any] = functions.load, what: str = "reward function",
                 settings: str = "function_") -> None:
        self.what, self.settings = what, settings  # for messages: "reward function", "function_max_queued_samples"
        self.workers = workers
        self.timeout_s = timeout_s
        self.max_queued_samples = max_queued_samples
        self._queue = FairQueue(workers_per_caller or max(1, workers - 1))
        self._running = 0
        self._pace: dict[str, float] = {}  # spec -> recent seconds per sample (a moving average)
        self._pool = pebble.ProcessPool(max_workers=workers, initializer=_start_worker,
                                        initargs=(memory_mb, tuple(dict.fromkeys(specs)), load, settings),
                                        context=multiprocessing.get_context("spawn"))
        QUEUE_DEPTH.set_function(lambda: self._queue.depth)

    async def check(self, spec: str) -> None:
        """Load `spec` in a worker (at start): raises FunctionFailed when it cannot be imported."""
        timeout_s = max(self.timeout_s, 60.0)
        try:
            await asyncio.wrap_future(self._pool.schedule(_check, args=(spec,), timeout=timeout_s))
        except FutureTimeout:
            raise FunctionTimedOut(f"loading {spec!r} ran past {timeout_s:g} s") from None
        except pebble.ProcessExpired as err:
            raise FunctionFailed(f"loading {spec!r} killed its worker process (exit code {err.exitcode})") from None

    async def call(self, spec: str, prompts: list, completions: list[str], kwargs: dict, *,
                   caller: str = "") -> list[float | None]:
        """One call of the function over these samples, queued as `caller`'s: a float or None
        per sample. Raises FunctionFailed, FunctionTimedOut, PoolFull or CallTooLarge."""
        n = len(completions)
        if n > self.max_queued_samples:
            raise CallTooLarge(f"{n} samples, more than the whole queue holds "
                               f"({self.settings}max_queued_samples={self.max_queued_samples}): split the call")
        loop = asyncio.get_running_loop()
        call = _Call(spec, caller, prompts, completions, kwargs, loop.time(), loop.create_future(), [None] * n)
        parts = [slice(i, i + 1) for i in range(n)] if spec in functions.PER_SAMPLE else [slice(0, n)]
        return await self._submit(call, parts)

    async def run(self, spec: str, target: Callable[..., Any], *args: Any, caller: str = "") -> Any:
        """`target(spec, *args)` in a worker, queued as `caller`'s one sample: its result (it and
        `args` must pickle; `target` is a module-level function). Raises as `call` does."""
        loop = asyncio.get_running_loop()
        call = _Call(spec, caller, [], [], {}, loop.time(), loop.create_future(), [None], task=(target, args))
        (result,) = await self._submit(call, [slice(0, 1)])
        return result

    async def _submit(self, call: _Call, parts: list[slice]) -> list:
        loop = asyncio.get_running_loop()
        self._admit(call.caller, sum(part.stop - part.start for part in parts))
        for part in parts:
            self._queue.push(call.caller, _Task(call, part), part.stop - part.start)
        call.pending = len(parts)
        call.timer = loop.call_at(call.arrival + self.timeout_s, self._expire, call)
        self._dispatch()
        try:
            return await call.future
        finally:  # also when the caller went away: its queued tasks go, its running ones stop
            self._end(call)

    def _admit(self, caller: str, n: int) -> None:
        """Room for `n` samples of `caller`: when the queue is full, the caller holding the most
        queued samples gives way (its newest call is refused), unless that is this caller."""
        queue = self._queue
        while queue.depth + n > self.max_queued_samples:
            largest = queue.largest()
            if largest is None or largest == caller or queue.queued(largest) <= queue.queued(caller) + n:
                REFUSED.labels("full").inc()
                retry = self._retry_after(queue.depth + n - self.max_queued_samples)
                raise PoolFull(f"the {self.what} queue is full ({queue.depth} of "
                               f"{self.settings}max_queued_samples={self.max_queued_samples} samples queued); "
                               f"retry in {retry:g} s", retry)
            victim = queue.newest(largest).call
            REFUSED.labels("evicted").inc()
            retry = self._retry_after(queue.queued(largest))
            self._fail(victim, PoolFull(f"pushed out of the full {self.what} queue by other callers' calls "
                                        f"(this caller held the most queued samples); retry in {retry:g} s", retry))

    def _retry_after(self, samples: int) -> float:
        """When `samples` queued samples will have left: at the recent pace, and never later
        than the timeout, by which every queued task has run or expired."""
        pace = sum(self._pace.values()) / len(self._pace) if self._pace else 0.0
        return round(min(self.timeout_s, max(1.0, samples * pace / self.workers)), 1)

    def _note_pace(self, task: _Task, elapsed: float) -> None:
        spec, per_sample = task.call.spec, elapsed / task.size
        self._pace[spec] = 0.8 * self._pace[spec] + 0.2 * per_sample if spec in self._pace else per_sample

    def _dispatch(self) -> None:
        """Hands queued tasks to pebble while a worker is free, so the order is the FairQueue's."""
        loop = asyncio.get_running_loop()
        while self._running < self.workers and (task := self._queue.pop()) is not None:
            call, part = task.call, task.part
            left = call.arrival + self.timeout_s - loop.time()
            if left < self._pace.get(call.spec, 0.0) * task.size:
                # It would be stopped at its deadline, and replacing a stopped worker costs every caller.
                self._queue.done(call.caller)
                self._expire(call, left)
                continue
            if call.task is not None:
                work, arguments = _run_task, (call.task[0], call.spec, call.task[1])
            else:
                work, arguments = _run, (call.spec, call.prompts[part], call.completions[part],
                                         {key: values[part] for key, values in call.kwargs.items()})
            try:
                task.future = self._pool.schedule(work, args=arguments)
            except RuntimeError:  # the pool has stopped (the server is closing)
                self._queue.done(call.caller)
                self._fail(call, FunctionFailed(f"{call.spec} could not run: the worker pool has stopped"))
                continue
            self._running += 1
            call.started = True
            call.running.add(task)
            task.started = loop.time()
            WAIT.observe(task.started - call.arrival)
            task.future.add_done_callback(lambda _, task=task: loop.call_soon_threadsafe(self._finished, task))

    def _finished(self, task: _Task) -> None:
        call, future = task.call, task.future
        self._running -= 1
        self._queue.done(call.caller)
        call.running.discard(task)
        if not future.cancelled() and not call.future.done():
            try:
                scores = future.result()
            except pebble.ProcessExpired as err:
                self._fail(call, FunctionFailed(f"{call.spec} killed its worker process (exit code {err.exitcode}); "
                                                "the worker was replaced"))
            except FunctionRaised as err:
                reference = secrets.token_hex(4)
                log.warning("%s %s raised (reference %s):\n%s", self.what, call.spec, reference, err.details)
                self._fail(call, FunctionFailed(f"{call.spec} raised {err.kind} (its message is in the server log, "
                                                f"reference {reference})"))
            except FunctionFailed as err:
                self._fail(call, err)
            except Exception as err:  # pebble's own trouble, not the function's
                self._fail(call, FunctionFailed(f"{call.spec} could not run: {type(err).__name__}"))
            else:
                self._note_pace(task, asyncio.get_running_loop().time() - task.started)
                call.scores[task.part] = scores
                call.pending -= 1
                if not call.pending:
                    call.future.set_result(call.scores)
        self._dispatch()

    def _expire(self, call: _Call, left: float = 0.0) -> None:
        """The call's time is up (or, `left` > 0, too short for its function's recent pace)."""
        now = asyncio.get_running_loop().time()
        for task in call.running:
            self._note_pace(task, now - task.started)  # at least this long
        if call.started:
            stopped = "; its worker was replaced" if call.running else ""
            self._fail(call, FunctionTimedOut(f"{call.spec} ran past its {self.timeout_s:g} s timeout (counted from "
                                              f"its arrival){stopped}"))
            return
        REFUSED.labels("expired").inc()
        if left > 0:
            why = (f"waited {self.timeout_s - left:.1f} s of its {self.timeout_s:g} s timeout in the queue behind "
                   f"other calls, and its recent calls took longer than the {left:.1f} s left")
        else:
            why = f"waited its whole {self.timeout_s:g} s timeout in the queue behind other calls"
        self._fail(call, FunctionTimedOut(f"{call.spec} {why}; it did not run"))

    def _fail(self, call: _Call, error: Exception) -> None:
        if not call.future.done():
            call.future.set_exception(error)
        self._end(call)

    def _end(self, call: _Call) -> None:
        """The call is over: its timer, queued tasks and running tasks go (pebble stops the
        worker of a cancelled running task)."""
        if call.timer is not None:
            call.timer.cancel()
        self._queue.remove(call.caller, lambda task: task.call is call)
        for task in list(call.running):
            task.future.cancel()

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)
