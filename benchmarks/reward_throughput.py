"""Reward scoring throughput: the RewardService vs offline batching, naive serving and vLLM's server.

    python benchmarks/reward_throughput.py [--model DIR] [--samples 512] [--concurrency 32]
        [--device cuda --dtype bfloat16] [--no-vllm] [--json PATH]

Without --model it builds the ~20M-parameter `small` reward model. Samples are token ids
with lengths uniform in [20, 400] (scored as given, so every mode sees the same tokens).
Modes, all on the same model and samples, measured in this one run:
- offline: the model called directly with length-sorted batches under the same token
  budget as the service (the best batching of this backend, no RPC at all);
- service: `rlhf-mesh serve reward`, `concurrency` clients, one sample per call;
- naive: a gRPC server doing one forward per request (no batching), same clients;
- vLLM server: `vllm serve --runner pooling` (its OpenAI-compatible server), `/classify`
  with the same token ids and raw logits, same clients, the same token budget per batch;
- the service on vLLM: `rlhf-mesh serve reward --backend vllm`, same clients (the gRPC
  service's cost over the engine vLLM's own server runs).
Prints samples/s, p50/p99 latency and the ratios the README reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.v1 import reward_pb2, reward_pb2_grpc

from common import server, vllm_kv_cache_flag, wait_http

MAX_BATCH_TOKENS = 4096  # the service's default


def make_samples(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(20, 400))] for _ in range(count)]


def offline(model_path: str, samples: list[list[int]], dtype: str, device: str) -> float:
    """Samples/s of the model itself on length-sorted batches within MAX_BATCH_TOKENS."""
    from rlhf_mesh.services.reward.reward_model import TransformersRewardModel

    model = TransformersRewardModel("bench", model_path, dtype=dtype, device=device, max_length=None,
                                    truncation="left")
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


async def drive(call: Callable[[list[int]], Awaitable[object]], samples: list[list[int]],
                concurrency: int) -> tuple[float, list[float]]:
    """`concurrency` callers, one sample per call: samples/s and per-call latencies."""
    queue = list(reversed(samples))
    latencies: list[float] = []
    await call(samples[0])  # connect and warm up

    async def worker() -> None:
        while queue:
            ids = queue.pop()
            started = time.perf_counter()
            await call(ids)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(samples) / (time.perf_counter() - started), latencies


async def load(address: str, samples: list[list[int]], concurrency: int) -> tuple[float, list[float]]:
    """The RewardService (or the naive one) over gRPC."""
    async with AsyncRewardClient(address, timeout_s=600) as client:
        return await drive(lambda ids: client.scores([ids]), samples, concurrency)


async def load_vllm(address: str, model: str, samples: list[list[int]], concurrency: int) -> tuple[float, list[float]]:
    """vLLM's OpenAI-compatible server: POST /classify with the token ids, raw logits (no activation)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def classify(ids: list[int]) -> None:
            body = {"model": model, "input": ids, "use_activation": False}
            async with session.post(f"http://{address}/classify", json=body) as response:
                response.raise_for_status()
                await response.json()

        return await drive(classify, samples, concurrency)


class NaiveServicer(reward_pb2_grpc.RewardServiceServicer):
    """One forward per request, one request at a time: serving without batching."""

    def __init__(self, model_path: str, dtype: str, device: str) -> None:
        from rlhf_mesh.services.reward.reward_model import TransformersRewardModel

        self.model = TransformersRewardModel("naive", model_path, dtype=dtype, device=device, max_length=None,
                                             truncation="left")
        self.lock = asyncio.Lock()

    async def Score(self, request, context):
        ids = [list(s.token_ids.ids) for s in request.samples]
        async with self.lock:
            scores = await asyncio.to_thread(self.model.score, ids)
        return reward_pb2.ScoreResponse(results=[reward_pb2.ScoreResult(score=s) for s in scores])


async def serve_naive(model_path: str, port: int, dtype: str, device: str) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    reward_pb2_grpc.add_RewardServiceServicer_to_server(NaiveServicer(model_path, dtype, device), server)
    checks = health.aio.HealthServicer()  # the clients send calls only to a server SERVING their service
    await checks.set(reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
                     health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
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
    parser.add_argument("--device", default="cpu", help="torch device of every transformers mode, e.g. cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-vllm", action="store_true", help="leave out the two vLLM modes")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve-naive", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_naive:
        asyncio.run(serve_naive(args.serve_naive, args.port, args.dtype, args.device))
        return

    model = args.model
    if model is None:
        from rlhf_mesh.tiny_models import build

        model = str(build(Path(tempfile.mkdtemp()) / "models", preset="small")["reward"])
    from transformers import AutoConfig

    samples = make_samples(args.samples, AutoConfig.from_pretrained(model).vocab_size)
    print(f"model {model}, {len(samples)} samples of 20-400 tokens, concurrency {args.concurrency}", flush=True)

    where = ["--device", args.device, "--dtype", args.dtype]
    offline_rate = offline(model, samples, args.dtype, args.device)
    service = [sys.executable, "-m", "rlhf_mesh", "serve", "reward", "--model", model, "--metrics-port", "0",
               "--max-batch-tokens", str(MAX_BATCH_TOKENS), "--log-level", "WARNING"]
    service_rate, service_lat = measure_server([*service, *where], samples, args.concurrency)
    naive_rate, naive_lat = measure_server([sys.executable, __file__, "--serve-naive", model, *where], samples,
                                           args.concurrency)
    clients = f"{args.concurrency} clients x 1 sample"
    print("| mode | samples/s | p50 ms | p99 ms |\n|---|---|---|---|")
    print(summary("offline, length-sorted batches (baseline)", offline_rate))
    print(summary(f"RewardService, {clients}", service_rate, service_lat))
    print(summary(f"naive serving, {clients}", naive_rate, naive_lat))
    figures = {"offline": offline_rate, "service": service_rate, "naive": naive_rate}
    if not args.no_vllm:
        with server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--runner",
                     "pooling", "--dtype", "float32", "--max-model-len", "512", "--max-num-batched-tokens",
                     str(MAX_BATCH_TOKENS), "--enforce-eager", "--host", "localhost", *vllm_kv_cache_flag()],
                    ready=wait_http) as address:
            vllm_rate, vllm_lat = asyncio.run(load_vllm(address, model, samples, args.concurrency))
        on_vllm_rate, on_vllm_lat = measure_server([*service, "--backend", "vllm"], samples, args.concurrency)
        print(summary(f"vLLM OpenAI server (pooling runner, /classify), {clients}", vllm_rate, vllm_lat))
        print(summary(f"RewardService --backend vllm, {clients}", on_vllm_rate, on_vllm_lat))
        figures.update(vllm_server=vllm_rate, service_on_vllm=on_vllm_rate)
    print(f"service / offline = {service_rate / offline_rate:.2f} (target >= 0.9)")
    print(f"service / naive   = {service_rate / naive_rate:.2f} (target >= 3)")
    if not args.no_vllm:
        print(f"service / vLLM server = {service_rate / vllm_rate:.2f} (target >= 1.0)")
        print(f"service --backend vllm / vLLM server = {on_vllm_rate / vllm_rate:.2f} (the same engine behind each)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures))

if __name__ == "__main__":
    main()
