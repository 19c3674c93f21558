"""The OpenAI-compatible port: the GenerationService's `--http-port` vs `vllm serve`, and the cost
of recording sessions.

    python benchmarks/openai_front_door.py [--model DIR] [--preset small] [--callers 32] [--turns 3]
                                           [--max-tokens 32] [--repeats 2]

Without --model it builds the ~20M-parameter `small` policy (a chat template of its own).
Every caller is an agent loop written with the `openai` SDK: a user message, the reply, a new
user message, --turns calls in all, each sampling --max-tokens tokens (ignore_eos, temperature
1, its own seed). --callers run at once. Modes, one engine configuration, in this one run (a
warm-up pass each, then the best of --repeats (3) passes by throughput):
- vllm serve: vLLM's own OpenAI-compatible server (the baseline);
- front door: `rlhf-mesh serve generation --http-port`, the same calls;
- front door + sessions: the same, every caller's calls in its own session (`user`), so every
  call is recorded token-exact (the log-prob of each sampled token included, which the other
  modes do not ask for) and extends its session's ids.
Prints completion tokens/s, p50 and p99 call latency, prompt tokens a call, and the two ratios:
front door / vllm serve (goal >= 1.0) and sessions / no sessions (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import openai
import torch

from common import add_policy_arguments, free_port, policy_folder, server, vllm_kv_cache_flag, wait_http


class Result:
    def __init__(self, tokens: int, seconds: float, latencies: list[float], prompt_tokens: int) -> None:
        ordered = sorted(latencies)
        self.rate, self.calls = tokens / seconds, len(ordered)
        self.prompt_mean = prompt_tokens / len(ordered)
        self.p50 = statistics.median(ordered)
        self.p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    def row(self, name: str) -> str:
        return (f"| {name} | {self.rate:,.0f} | {self.p50 * 1000:,.0f} | {self.p99 * 1000:,.0f} | {self.calls} | "
                f"{self.prompt_mean:.0f} |")


async def _pass(base_url: str, callers: int, turns: int, max_tokens: int, sessions: str | None) -> Result:
    """One pass: `callers` agent loops at once; completion tokens/s and every call's latency."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    latencies: list[float] = []
    tokens = prompt_tokens = 0

    async def agent(caller: int) -> None:
        nonlocal tokens, prompt_tokens
        messages = [{"role": "user", "content": f"Caller {caller}: tell me about the sea."}]
        for turn in range(turns):
            extra = {"user": f"{sessions}-{caller}"} if sessions else {}
            started = time.perf_counter()
            reply = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=1.0, seed=caller * 100 + turn,
                extra_body={"ignore_eos": True}, **extra)
            latencies.append(time.perf_counter() - started)
            tokens += reply.usage.completion_tokens
            prompt_tokens += reply.usage.prompt_tokens
            messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                         {"role": "user", "content": "Go on."}]

    started = time.perf_counter()
    try:
        await asyncio.gather(*(agent(i) for i in range(callers)))
    finally:
        await client.close()
    return Result(tokens, time.perf_counter() - started, latencies, prompt_tokens)


def _best(base_url: str, args: argparse.Namespace, sessions: str | None) -> Result:
    asyncio.run(_pass(base_url, 4, 1, args.max_tokens, f"{sessions}-warm" if sessions else None))
    runs = [asyncio.run(_pass(base_url, args.callers, args.turns, args.max_tokens,
                              f"{sessions}-{i}" if sessions else None)) for i in range(args.repeats)]
    return max(runs, key=lambda r: r.rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_policy_arguments(parser)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.set_defaults(repeats=3)
    args = parser.parse_args()

    model = policy_folder(args)
    engine = ["--model", model, "--dtype", args.dtype, "--max-model-len", "1024", "--enforce-eager", "--seed", "0"]
    print(f"model {model}, {args.callers} callers x {args.turns} chat calls of {args.max_tokens} tokens, "
          f"dtype {args.dtype}", flush=True)

    http_port = free_port()
    with server([sys.executable, "-m", "rlhf_mesh", "serve", "generation", *engine, "--http-port", str(http_port),
                 "--http-host", "127.0.0.1", "--metrics-port", "0", "--log-level", "WARNING"]):
        base_url = f"http://127.0.0.1:{http_port}/v1"
        ours = _best(base_url, args, None)
        recorded = _best(base_url, args, "bench")
    # The engine configuration the GenerationService uses on CPU: seeded requests whose prefill
    # is chunked kill vLLM's CPU worker (services/generation/engine.py).
    cpu = ["--no-enable-chunked-prefill"] if not torch.cuda.is_available() else []
    with server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine, *cpu, "--host", "127.0.0.1",
                 *vllm_kv_cache_flag()], ready=wait_http) as address:
        baseline = _best(f"http://{address}/v1", args, None)

    print("| mode | completion tokens/s | p50 ms | p99 ms | calls | prompt tokens a call |\n|---|---|---|---|---|---|")
    print(baseline.row("vllm serve (baseline)"))
    print(ours.row("front door"))
    print(recorded.row("front door + sessions"))
    print(f"front door / vllm serve = {ours.rate / baseline.rate:.2f} (goal >= 1.0)")
    print(f"sessions / no sessions  = {recorded.rate / ours.rate:.2f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
