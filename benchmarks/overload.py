"""Overload: the RewardService or the GenerationService at 1x, 2x and 4x its sustainable load.

    python benchmarks/overload.py [--service reward|generation] [--model DIR] [--seconds 15]
                                  [--max-queued-samples 64]
    python benchmarks/overload.py --head-of-line [--flood-calls 2] [--flood-samples 64] [--seconds 15]

Without --model it builds the ~20M-parameter `small` reward model (the `tiny` policy for
generation). A call is one sample of 20-200 tokens to score, or one prompt of 20-200 tokens to
complete with `--max-tokens` sampled tokens (128: enough work per call that one
Python client process can offer 4x the load). First a closed loop of `--concurrency` callers (as many as
the queue holds, so batches fill) measures the peak rate; the sustainable rate X is 80% of it (at the peak itself an
open-loop queue only grows). Then calls arrive open-loop (Poisson) at 1x, 2x and 4x X for
`--seconds` each. Printed per load: offered and admitted calls/s (admitted calls
all succeed), the share refused with RESOURCE_EXHAUSTED, p50/p99
latency of the admitted calls, p99 time to a refusal, and the server's peak resident
memory (with its child processes), sampled every 50 ms. Ratios against the 1x row: goodput (admitted calls/s) and
peak memory. The bounded queue (`--max-queued-samples`) is what keeps both flat; its default
of 64 one-sample calls stays below the 100 concurrent streams of one HTTP/2 connection, so
no call waits unseen on the client side.

`--head-of-line` (reward): one caller (a token holder) keeps `--flood-calls` calls of
`--flood-samples` samples of about 1000 characters in flight, while another sends one short
sample at a time, for `--seconds`; once with batches in arrival order (`--no-fair-batches`) and
once shared between callers (the default). Printed per order: the small caller's p50/p99
latency and calls, the flood's samples/s; then fair / arrival ratios of each.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import psutil
import yaml

from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient

from common import server_process


def make_samples(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(20, 200))] for _ in range(count)]


Call = Callable[[list[int], float], Awaitable[None]]  # one call of the service under test, with its deadline


async def sustainable(call: Call, samples: list[list[int]], concurrency: int, seconds: float) -> float:
    """Calls/s of `concurrency` callers that each send their next call when the last returns."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < deadline:
            await call(samples[i % len(samples)], 60.0)
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return done / (time.perf_counter() - started)


async def open_loop(call: Call, samples: list[list[int]], rate: float, seconds: float,
                    seed: int) -> dict[str, list[float]]:
    """Poisson arrivals at `rate` calls/s for `seconds`; latencies by outcome."""
    rng = random.Random(seed)
    outcomes: dict[str, list[float]] = {"ok": [], "refused": []}  # and other status codes by name

    async def one(ids: list[int]) -> None:
        started = time.perf_counter()
        try:
            await call(ids, 60.0)
            outcomes["ok"].append(time.perf_counter() - started)
        except grpc.aio.AioRpcError as err:
            kind = "refused" if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else err.code().name
            outcomes.setdefault(kind, []).append(time.perf_counter() - started)

    tasks = []
    start = time.perf_counter()
    next_at = start
    while next_at < start + seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(samples[len(tasks) % len(samples)])))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return outcomes


class PeakMemory:
    """The highest resident memory of a process and its children (vLLM's engine), sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            processes = [self.process, *self.process.children(recursive=True)]
            self.peak = max(self.peak, sum(p.memory_info().rss for p in processes))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def p(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else float("nan")
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def run(address: str, pid: int, samples: list[list[int]], args: argparse.Namespace) -> None:
    client_class = AsyncRewardClient if args.service == "reward" else AsyncGenerationClient
    async with client_class(address, timeout_s=60) as client:
        async def call(ids: list[int], timeout_s: float) -> None:
            if args.service == "reward":
                await client.scores([ids], timeout_s=timeout_s)
            else:
                async for _ in client.generate([ids], max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True,
                                               timeout_s=timeout_s):
                    pass

        await sustainable(call, samples, args.concurrency, 2.0)  # warm-up
        peak = await sustainable(call, samples, args.concurrency, args.seconds)
        rate = 0.8 * peak
        print(f"peak {peak:.1f} calls/s with {args.concurrency} closed-loop callers; sustainable X = {rate:.1f}",
              flush=True)
        print("| load | offered calls/s | admitted calls/s | refused | p50 ms | p99 ms | p99 refusal ms | "
              "peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
        rows = {}
        for factor in (1, 2, 4):
            with PeakMemory(pid) as memory:
                outcomes = await open_loop(call, samples, factor * rate, args.seconds, seed=factor)
            total = sum(len(v) for v in outcomes.values())
            goodput = len(outcomes["ok"]) / args.seconds
            rows[factor] = (goodput, memory.peak)
            ok, refused = outcomes["ok"], outcomes["refused"]
            print(f"| {factor}x | {total / args.seconds:.1f} | {goodput:.1f} | {len(refused) / total:.1%} | "
                  f"{p(ok, 50):.0f} | {p(ok, 99):.0f} | {p(refused, 99):.1f} | {memory.peak / 2**20:.0f} |", flush=True)
            for code, latencies in outcomes.items():
                if code not in ("ok", "refused"):
                    print(f"  {len(latencies)} calls failed with {code}, p50 {p(latencies, 50):.0f} ms", flush=True)
        for factor in (2, 4):
            print(f"{factor}x / 1x: admitted calls/s {rows[factor][0] / rows[1][0]:.2f}, "
                  f"peak memory {rows[factor][1] / rows[1][1]:.2f}")


FLOOD_TEXT = ("Tell me everything about the old river and the city on its banks. " * 15, "Sure. " * 10)


async def head_of_line(address: str, tokens: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """The small caller's latencies and the flood's samples/s while both call without pause."""
    async with (AsyncRewardClient(address, token=tokens["flood"], timeout_s=300) as flood,
                AsyncRewardClient(address, token=tokens["small"], timeout_s=300) as small):
        await flood.scores([FLOOD_TEXT] * 8)  # warm-up
        latencies: list[float] = []
        flooded = 0
        deadline = time.perf_counter() + args.seconds

        async def flooder() -> None:
            nonlocal flooded
            while time.perf_counter() < deadline:
                flooded += len(await flood.scores([FLOOD_TEXT] * args.flood_samples))

        async def caller() -> None:
            await asyncio.sleep(1.0)  # the flood is queued
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await small.scores([("What is 2 + 2?", "4.")])
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(caller(), *(flooder() for _ in range(args.flood_calls)))
        return {"p50": p(latencies, 50), "p99": p(latencies, 99), "calls": len(latencies),
                "flood": flooded / (time.perf_counter() - started)}


def run_head_of_line(model: str, args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp())
    tokens = {name: f"{name}-benchmark-token-0123456789" for name in ("flood", "small")}
    (folder / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
        {"name": name, "token": token, "roles": ["score"]} for name, token in tokens.items()]}))
    print(f"head of line: model {model}, {args.flood_calls} flood calls of {args.flood_samples} samples in flight, "
          f"{args.seconds:g} s per order", flush=True)
    print("| batches | small caller p50 ms | p99 ms | calls | flood samples/s |\n|---|---|---|---|---|")
    rows = {}
    for order, flags in (("arrival", ["--no-fair-batches"]), ("fair", [])):
        command = [sys.executable, "-m", "rlhf_mesh", "serve", "reward", "--model", model, "--metrics-port", "0",
                   "--log-level", "WARNING", "--tokens-file", str(folder / "tokens.yaml"), *flags]
        with server_process(command) as (address, _):
            rows[order] = row = asyncio.run(head_of_line(address, tokens, args))
        print(f"| {order} | {row['p50']:.0f} | {row['p99']:.0f} | {row['calls']} | {row['flood']:.1f} |", flush=True)
    fair, arrival = rows["fair"], rows["arrival"]
    print(f"fair / arrival: small caller p50 {fair['p50'] / arrival['p50']:.2f}, "
          f"p99 {fair['p99'] / arrival['p99']:.2f}, flood samples/s {fair['flood'] / arrival['flood']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", choices=["reward", "generation"], default="reward")
    parser.add_argument("--model", help="reward model or policy folder (default: build the `small` reward model, "
                        "the `tiny` policy)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each load level")
    parser.add_argument("--concurrency", type=int, help="closed-loop callers measuring the peak (default: as many "
                        "as the queue holds)")
    parser.add_argument("--max-queued-samples", type=int, default=64, help="the server's queue bound")
    parser.add_argument("--head-of-line", action="store_true", help="reward: a small caller beside a flooding one, "
                        "batches in arrival order and shared between callers")
    parser.add_argument("--flood-calls", type=int, default=2, help="--head-of-line: the flood's calls in flight")
    parser.add_argument("--flood-samples", type=int, default=64, help="--head-of-line: samples per flood call")
    parser.add_argument("--max-tokens", type=int, default=128, help="generation: sampled tokens per call")
    args = parser.parse_args()
    if args.head_of_line and args.service != "reward":
        parser.error("--head-of-line measures the reward service")
    args.concurrency = args.concurrency or args.max_queued_samples
    model = args.model
    if model is None:
        from rlhf_mesh.tiny_models import build

        if args.service == "reward":
            model = str(build(Path(tempfile.mkdtemp()) / "models", preset="small")["reward"])
        else:
            model = str(build(Path(tempfile.mkdtemp()) / "models")["policy"])
    if args.head_of_line:
        run_head_of_line(model, args)
        return
    from transformers import AutoConfig

    samples = make_samples(2048, AutoConfig.from_pretrained(model).vocab_size)
    print(f"{args.service}: model {model}, queue bound {args.max_queued_samples}, {args.seconds:g} s per load",
          flush=True)
    command = [sys.executable, "-m", "rlhf_mesh", "serve", args.service, "--model", model, "--metrics-port", "0",
               "--log-level", "WARNING"]
    command += ["--max-queued-samples", str(args.max_queued_samples)]
    if args.service == "generation":
        command += ["--max-model-len", str(200 + args.max_tokens)]
    with server_process(command) as (address, process):
        asyncio.run(run(address, process.pid, samples, args))


if __name__ == "__main__":
    main()
