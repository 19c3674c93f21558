"""Reward scoring throughput: the RewardService vs offline batching vs naive serving.

    python benchmarks/reward_throughput.py [--model DIR] [--samples 512] [--concurrency 32]

Without --model it builds the ~20M-parameter `small` reward model. Samples are token ids
with lengths uniform in [20, 400] (scored as given, so every mode sees the same tokens).
Modes, all on the same model and samples, measured in this one run:
- offline: the model called directly with length-sorted batches under the same token
  budget as the service (the best batching of this backend, no RPC at all);
- service: `rlhf-mesh serve reward`, `concurrency` clients, one sample per call;
- naive: a gRPC server doing one forward per request (no batching), same clients.
Prints samples/s, p50/p99 latency and the ratios the README reports.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.v1 import reward_pb2, reward_pb2_grpc

from common import server

MAX_BATCH_TOKENS = 4096  # the service's default


def make_samples(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(20, 400))] for _ in range(count)]


def offline(model_path: str, samples: list[list[int]]) -> float:
    """Samples/s of the model itself on length-sorted batches within MAX_BATCH_TOKENS."""
    from rlhf_mesh.services.reward.model import RewardModel

    model = RewardModel("bench", model_path, dtype="float32", device="cpu", max_length=None, truncation="left")
    model.score(samples[:8])  # warm-up
    ordered = sorted(samples, key=len)
    batches, batch = [], []
    for ids in ordered:
        if batch and len(ids) * (len(batch) + 1) > MAX_BATCH_TOKENS:
            batches.append(batch)
            batch = []
        batch.append(ids)
    batches.append(batch)
    started = time.perf_counter()
    for b in batches:
        model.score(b)
    return len(samples) / (time.perf_counter() - started)


async def load(address: str, samples: list[list[int]], concurrency: int) -> tuple[float, list[float]]:
    """`concurrency` clients, one sample per call: samples/s and per-call latencies."""
    queue = list(reversed(samples))
    latencies: list[float] = []
    async with AsyncRewardClient(address, timeout_s=600) as client:
        await client.scores([samples[0]])  # connect and warm up

        async def worker() -> None:
            while queue:
                ids = queue.pop()
                started = time.perf_counter()
                await client.scores([ids])
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(samples) / elapsed, latencies


class NaiveServicer(reward_pb2_grpc.RewardServiceServicer):
    """One forward per request, one request at a time: serving without batching."""

    def __init__(self, model_path: str) -> None:
        from rlhf_mesh.services.reward.model import RewardModel

        self.model = RewardModel("naive", model_path, dtype="float32", device="cpu", max_length=None,
                                 truncation="left")
        self.lock = asyncio.Lock()

    async def Score(self, request, context):
        ids = [list(s.token_ids.ids) for s in request.samples]
        async with self.lock:
            scores = await asyncio.to_thread(self.model.score, ids)
        return reward_pb2.ScoreResponse(results=[reward_pb2.ScoreResult(score=s) for s in scores])


async def serve_naive(model_path: str, port: int) -> None:
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.aio.server()
    reward_pb2_grpc.add_RewardServiceServicer_to_server(NaiveServicer(model_path), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"localhost:{port}")
    await server.start()
    await server.wait_for_termination()


def measure_server(args: list[str], samples: list[list[int]], concurrency: int) -> tuple[float, list[float]]:
    with server(args) as address:
        return asyncio.run(load(address, samples, concurrency))


def summary(name: str, rate: float, latencies: list[float] | None = None) -> str:
    if not latencies:
        return f"| {name} | {rate:.1f} | - | - |"
    cuts = statistics.quantiles(latencies, n=100)
    return f"| {name} | {rate:.1f} | {cuts[49] * 1000:.0f} | {cuts[98] * 1000:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="reward model folder (default: build the `small` preset)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve-naive", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_naive:
        asyncio.run(serve_naive(args.serve_naive, args.port))
        return

    model = args.model
    if model is None:
        from rlhf_mesh.tiny_models import build

        model = str(build(Path(tempfile.mkdtemp()) / "models", preset="small")["reward"])
    from transformers import AutoConfig

    samples = make_samples(args.samples, AutoConfig.from_pretrained(model).vocab_size)
    print(f"model {model}, {len(samples)} samples of 20-400 tokens, concurrency {args.concurrency}", flush=True)

    offline_rate = offline(model, samples)
    service_rate, service_lat = measure_server(
        [sys.executable, "-m", "rlhf_mesh", "serve", "reward", "--model", model, "--metrics-port", "0",
         "--max-batch-tokens", str(MAX_BATCH_TOKENS), "--log-level", "WARNING"],
        samples, args.concurrency,
    )
    naive_rate, naive_lat = measure_server(
        [sys.executable, __file__, "--serve-naive", model], samples, args.concurrency
    )
    print("| mode | samples/s | p50 ms | p99 ms |\n|---|---|---|---|")
    print(summary("offline, length-sorted batches (baseline)", offline_rate))
    print(summary(f"RewardService, {args.concurrency} clients x 1 sample", service_rate, service_lat))
    print(summary(f"naive serving, {args.concurrency} clients x 1 sample", naive_rate, naive_lat))
    print(f"service / offline = {service_rate / offline_rate:.2f} (target >= 0.9)")
    print(f"service / naive   = {service_rate / naive_rate:.2f} (target >= 3)")


if __name__ == "__main__":
    main()
