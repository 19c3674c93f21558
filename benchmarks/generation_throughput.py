"""Generation throughput: the GenerationService vs vLLM offline vs vLLM's OpenAI server.

    python benchmarks/generation_throughput.py [--model DIR] [--prompts 256] [--max-tokens 64]
                                               [--concurrency 8] [--dtype float32]

Without --model it builds the ~20M-parameter `small` policy (`--preset tiny`: 0.5M parameters,
where per-token overheads rather than the model dominate). Prompts are token ids with
lengths uniform in [16, 128], so every mode sees the same tokens; every sample runs to
max_tokens (ignore_eos), temperature 1, and returns the log-probability of each sampled token.
Modes, one engine configuration, measured in this one run (one warm-up pass each, then the best
of --repeats passes):
- offline: vLLM `LLM.generate` over all prompts (no RPC at all; the baseline);
- service: `rlhf-mesh serve generation`, --concurrency streams splitting the prompts evenly,
  each sample streamed when it finishes;
- openai: vLLM's own OpenAI-compatible server, the same concurrency, /v1/completions calls
  carrying the same prompt slices.
Prints generated tokens/s, the time to the first finished sample and the ratios the README reports.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from rlhf_mesh.clients.generation import AsyncGenerationClient

from common import add_policy_arguments, policy_folder, server, vllm_kv_cache_flag, wait_http


def make_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(16, 128))] for _ in range(count)]


def slices(prompts: list[list[int]], parts: int) -> list[list[list[int]]]:
    return [prompts[i::parts] for i in range(parts)]


class Result:
    def __init__(self, tokens: int, seconds: float, first_s: float) -> None:
        self.rate, self.seconds, self.first_s = tokens / seconds, seconds, first_s

    def row(self, name: str) -> str:
        return f"| {name} | {self.rate:,.0f} | {self.seconds:.2f} | {self.first_s * 1000:,.0f} |"


def best(runs: list[Result]) -> Result:
    return max(runs, key=lambda r: r.rate)


def offline(model: str, prompts: list[list[int]], max_tokens: int, dtype: str, repeats: int) -> Result:
    from vllm import LLM, SamplingParams

    from rlhf_mesh.vllm_memory import kv_cache_memory_bytes

    llm = LLM(model=model, dtype=dtype, enforce_eager=True, seed=0, kv_cache_memory_bytes=kv_cache_memory_bytes(None))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, logprobs=0)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:8], params, use_tqdm=False)  # warm-up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        runs.append(Result(sum(len(o.outputs[0].token_ids) for o in outputs), seconds, seconds))
    return best(runs)


async def _service_pass(address: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> Result:
    async with AsyncGenerationClient(address, timeout_s=600) as client:
        started = time.perf_counter()
        first: list[float] = []
        tokens = 0

        async def stream(part: list[list[int]]) -> None:
            nonlocal tokens
            async for sample in client.generate(part, max_tokens=max_tokens, temperature=1.0, ignore_eos=True):
                first.append(time.perf_counter() - started)
                tokens += len(sample.completion_token_ids)

        await asyncio.gather(*(stream(part) for part in slices(prompts, concurrency)))
        return Result(tokens, time.perf_counter() - started, min(first))


async def _openai_pass(base: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> Result:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        first: list[float] = []
        tokens = 0

        async def call(part: list[list[int]]) -> None:
            nonlocal tokens
            body = {"model": model, "prompt": part, "max_tokens": max_tokens, "temperature": 1.0,
                    "ignore_eos": True, "logprobs": 0}
            async with session.post(f"{base}/v1/completions", json=body) as response:
                response.raise_for_status()
                reply = await response.json()
            first.append(time.perf_counter() - started)
            tokens += reply["usage"]["completion_tokens"]

        await asyncio.gather(*(call(part) for part in slices(prompts, concurrency)))
        return Result(tokens, time.perf_counter() - started, min(first))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_arguments(parser)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    model = policy_folder(args)
    from transformers import AutoConfig

    prompts = make_prompts(args.prompts, AutoConfig.from_pretrained(model).vocab_size)
    engine = ["--model", model, "--dtype", args.dtype, "--max-model-len", "512", "--enforce-eager", "--seed", "0"]
    print(f"model {model}, {len(prompts)} prompts of 16-128 tokens x {args.max_tokens} new tokens, "
          f"concurrency {args.concurrency}, dtype {args.dtype}", flush=True)

    def passes(run) -> Result:
        run(prompts[:8], 1)  # warm-up
        return best([run(prompts, args.concurrency) for _ in range(args.repeats)])

    with server([sys.executable, "-m", "rlhf_mesh", "serve", "generation", *engine, "--metrics-port", "0",
                 "--log-level", "WARNING"]) as address:
        service = passes(lambda p, c: asyncio.run(_service_pass(address, p, args.max_tokens, c)))
    with server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine, "--host", "localhost",
                 *vllm_kv_cache_flag()],
                ready=wait_http) as address:
        openai = passes(lambda p, c: asyncio.run(_openai_pass(f"http://{address}", model, p, args.max_tokens, c)))
    baseline = offline(model, prompts, args.max_tokens, args.dtype, args.repeats)

    print("| mode | tokens/s | seconds | first sample ms |\n|---|---|---|---|")
    print(baseline.row("vLLM offline LLM.generate (baseline)"))
    print(service.row(f"GenerationService, {args.concurrency} streams"))
    print(openai.row(f"vLLM OpenAI server, {args.concurrency} concurrent /v1/completions"))
    print(f"service / offline = {service.rate / baseline.rate:.2f} (target >= 0.9)")
    print(f"service / openai  = {service.rate / openai.rate:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
