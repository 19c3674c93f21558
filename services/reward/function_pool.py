"""Reward functions run in a pool of worker processes, never in the server's event loop.

A call has a timeout; a function that raises, runs past its timeout, returns the wrong count
or kills its worker fails that call alone (FunctionFailed), pebble replaces the worker, and
every other call goes on. Workers are spawned (not forked from a server with threads) and
run each function on their main thread, where math-verify's SIGALRM timeouts work.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout

import pebble

from rlhf_mesh.services.reward import functions

_loaded: dict[str, functions.RewardFunction] = {}  # in each worker


class FunctionFailed(Exception):
    """A reward function call that produced no scores; the message says why."""


class FunctionTimedOut(FunctionFailed):
    """The call ran past its timeout (its worker was killed and replaced)."""


def _run(spec: str, prompts: list, completions: list[str], kwargs: dict) -> list:
    if spec not in _loaded:
        _loaded[spec] = functions.load(spec)
    return list(_loaded[spec](prompts, completions, **kwargs))


def _check(spec: str) -> None:
    functions.load(spec)


class FunctionPool:
    """`workers` processes shared by every function of the server."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pool = pebble.ProcessPool(max_workers=workers, context=multiprocessing.get_context("spawn"))

    async def check(self, spec: str) -> None:
        """Load `spec` in a worker: raises FunctionFailed when it cannot be imported."""
        await self._call(_check, spec, what=f"loading {spec!r}", timeout_s=max(self.timeout_s, 60.0))

    async def call(self, spec: str, prompts: list, completions: list[str], kwargs: dict) -> list[float | None]:
        """One call of the function over these samples; a float or None per sample."""
        scores = await self._call(_run, spec, prompts, completions, kwargs, what=spec, timeout_s=self.timeout_s)
        if not isinstance(scores, list) or len(scores) != len(completions):
            count = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise FunctionFailed(f"{spec} returned {count} scores for {len(completions)} samples")
        for i, score in enumerate(scores):
            if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)
                                      or not math.isfinite(score)):
                raise FunctionFailed(f"{spec} returned {score!r} for sample {i}: a finite number or None is needed")
        return [None if s is None else float(s) for s in scores]

    async def _call(self, fn, *args, what: str, timeout_s: float):
        future = self._pool.schedule(fn, args=args, timeout=timeout_s)
        try:
            return await asyncio.wrap_future(future)  # cancelling the call stops its worker
        except FutureTimeout:
            raise FunctionTimedOut(f"{what} ran past its {timeout_s:g} s timeout; its worker was replaced") from None
        except pebble.ProcessExpired as err:
            raise FunctionFailed(f"{what} killed its worker process (exit code {err.exitcode}); "
                                 "the worker was replaced") from None
        except Exception as err:
            raise FunctionFailed(f"{what} raised {type(err).__name__}: {err}") from None

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)
