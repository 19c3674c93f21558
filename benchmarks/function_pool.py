"""The reward-function pool under a flood: an honest caller's `math` latency while another caller
sends answers that cost math-verify ~5 s a sample (`\\boxed{9^{9^{9^9}}}`).

    python benchmarks/function_pool.py [--seconds 20] [--flood 6] [--workers 3]

Two servers in one run, each serving the built-in `math` on `--workers` worker processes:
`fifo`, where both callers present one token (one caller to the pool, which then serves calls in
arrival order) and that caller may hold every worker, as before the pool had callers; and
`fair`, where each has its own token and the defaults apply (the caller running the fewest
tasks goes first, and one caller holds at most workers - 1). The flood is `--flood` closed-loop
calls of 3 such samples; the honest caller sends one-sample calls back to back. Printed per
server: the honest calls' p50/p99 latency and how many failed, and what became of the flood's
calls; then fair's p99 against fifo's, and the goal (honest p99 under 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import yaml

from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.v1 import reward_pb2

from common import server

HOSTILE = reward_pb2.ScoreSample(text=reward_pb2.PromptResponse(prompt="q", response=r"\boxed{9^{9^{9^9}}}"),
                                 reference="1")
HONEST = reward_pb2.ScoreSample(text=reward_pb2.PromptResponse(prompt="What is 1/2?", response=r"It is \boxed{0.5}"),
                                reference="1/2")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def load(address: str, flood_token: str, honest_token: str, args: argparse.Namespace) -> dict:
    """The flood and the honest caller together for `args.seconds`; their outcomes."""
    flood_outcomes: Counter[str] = Counter()
    honest: list[float] = []
    honest_failed: Counter[str] = Counter()
    async with AsyncRewardClient(address, token=flood_token) as flood, \
            AsyncRewardClient(address, token=honest_token) as client:
        stop = time.perf_counter() + args.seconds

        async def flooder() -> None:
            while time.perf_counter() < stop:
                try:
                    await flood.score([HOSTILE] * 3, model="math", timeout_s=60)
                    flood_outcomes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    flood_outcomes[err.code().name] += 1
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.1)

        flooders = [asyncio.create_task(flooder()) for _ in range(args.flood)]
        await asyncio.sleep(1.0)  # the flood holds the workers before the first honest call
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                assert (await client.scores([HONEST], model="math", timeout_s=60)) == [1.0]
                honest.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as err:
                honest_failed[err.code().name] += 1
        for task in flooders:
            task.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)
    return {"honest": honest, "honest_failed": honest_failed, "flood": flood_outcomes}


def run(name: str, tokens: Path, flood_token: str, honest_token: str, extra: list[str],
        args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "rlhf_mesh", "serve", "reward", "--function", "math",
               "--function-workers", str(args.workers), "--tokens-file", str(tokens), "--metrics-port", "0",
               "--log-level", "WARNING", *extra]
    with server(command) as address:
        result = asyncio.run(load(address, flood_token, honest_token, args))
    honest = result["honest"]
    if honest:
        print(f"{name}: honest math calls {len(honest)} ok, p50 {percentile(honest, 50):.3f} s, "
              f"p99 {percentile(honest, 99):.3f} s, failed {dict(result['honest_failed']) or 0}; "
              f"flood calls {dict(result['flood'])}", flush=True)
    else:
        print(f"{name}: no honest call succeeded (failed {dict(result['honest_failed'])}); "
              f"flood calls {dict(result['flood'])}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each server's run")
    parser.add_argument("--flood", type=int, default=6, help="concurrent 3-sample hostile calls")
    parser.add_argument("--workers", type=int, default=3, help="function workers of each server")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    tokens = {"flood": "flood-" + "0" * 26, "honest": "honest-" + "1" * 25}
    (folder / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
        {"name": name, "token": token, "roles": ["score"]} for name, token in tokens.items()]}))
    print(f"function pool: {args.workers} workers, flood of {args.flood} x 3 hostile samples, "
          f"{args.seconds:g} s per server", flush=True)
    fifo = run("fifo", folder / "tokens.yaml", tokens["flood"], tokens["flood"],
               ["--function-workers-per-caller", str(args.workers)], args)
    fair = run("fair", folder / "tokens.yaml", tokens["flood"], tokens["honest"], [], args)
    if fifo["honest"] and fair["honest"]:
        p99 = percentile(fair["honest"], 99)
        print(f"honest p99: fair / fifo = {p99 / percentile(fifo['honest'], 99):.3f}; goal under 1 s: "
              f"{'met' if p99 < 1.0 and not fair['honest_failed'] else 'NOT met'} ({p99:.3f} s)", flush=True)


if __name__ == "__main__":
    main()
