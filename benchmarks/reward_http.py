"""One-sample HTTP callers against the same load over gRPC, on one RewardService.

    python benchmarks/reward_http.py [--model DIR] [--samples 512] [--concurrency 32]

The frameworks that call a remote reward server (OpenRLHF, veRL, slime) send one sample per
HTTP call; the service batches across them. One `rlhf-mesh serve reward --http-port` serves
every mode, in this one run, with the same samples (token ids of lengths 20-400 on the
~20M-parameter `small` model without --model):
- gRPC: `concurrency` AsyncRewardClient callers, one sample per Score call, as token ids;
- HTTP /classify: the same callers over aiohttp, vLLM's pooling API with the token ids;
- gRPC, text: each sample decoded to text and sent as a query (tokenized by the service);
- HTTP /get_reward: OpenRLHF's protocol with the same query texts.
Prints samples/s and p50/p99 latency per mode and the HTTP / gRPC ratios on the same inputs
(target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from reward_throughput import drive, load, make_samples
from transformers import AutoTokenizer

from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.v1 import reward_pb2

from common import free_port, server


async def load_http(url: str, bodies: dict[int, dict], samples: list[list[int]], concurrency: int):
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def post(ids: list[int]) -> None:
            async with session.post(url, json=bodies[id(ids)]) as response:
                response.raise_for_status()
                await response.json()

        return await drive(post, samples, concurrency)


async def load_text(address: str, texts: dict[int, str], samples: list[list[int]], concurrency: int):
    async with AsyncRewardClient(address, timeout_s=600) as client:
        return await drive(lambda ids: client.scores([reward_pb2.ScoreSample(
            query=reward_pb2.QueryText(text=texts[id(ids)]))]), samples, concurrency)


def summary(name: str, rate: float, latencies: list[float]) -> str:
    cuts = statistics.quantiles(latencies, n=100)
    return f"| {name} | {rate:.1f} | {cuts[49] * 1000:.0f} | {cuts[98] * 1000:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="reward model folder (default: build the small preset)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from rlhf_mesh.tiny_models import build

        model = str(build(Path(tempfile.mkdtemp()) / "models", preset="small")["reward"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = make_samples(args.samples, len(tokenizer))
    classify = {id(ids): {"input": ids, "use_activation": False} for ids in samples}
    texts = {id(ids): tokenizer.decode(ids) for ids in samples}
    get_reward = {key: {"query": [text]} for key, text in texts.items()}
    http_port = free_port()
    print(f"{len(samples)} samples, {args.concurrency} concurrent callers, one sample per call", flush=True)
    with server([sys.executable, "-m", "rlhf_mesh", "serve", "reward", "--model", model, "--metrics-port", "0",
                 "--http-port", str(http_port), "--log-level", "WARNING"]) as address:
        base = f"http://127.0.0.1:{http_port}"
        grpc_rate, grpc_lat = asyncio.run(load(address, samples, args.concurrency))
        classify_rate, classify_lat = asyncio.run(load_http(f"{base}/classify", classify, samples, args.concurrency))
        text_rate, text_lat = asyncio.run(load_text(address, texts, samples, args.concurrency))
        reward_rate, reward_lat = asyncio.run(load_http(f"{base}/get_reward", get_reward, samples, args.concurrency))
    print("| mode | samples/s | p50 ms | p99 ms |\n|---|---|---|---|")
    print(summary("gRPC Score", grpc_rate, grpc_lat))
    print(summary("HTTP /classify (token ids)", classify_rate, classify_lat))
    print(summary("gRPC Score (query text)", text_rate, text_lat))
    print(summary("HTTP /get_reward (query text)", reward_rate, reward_lat))
    print(f"HTTP /classify / gRPC (token ids) = {classify_rate / grpc_rate:.2f}; "
          f"HTTP /get_reward / gRPC (query text) = {reward_rate / text_rate:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
