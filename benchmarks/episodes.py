"""Multi-turn episodes against single-turn generation of the same tokens, and what keeping an
episode on one replica does to the prefix cache.

    python benchmarks/episodes.py [--model DIR] [--tasks 32] [--n 4] [--turns 4] [--turn-tokens 32]

Without --model it builds the tiny policy. Two generation replicas and an EnvironmentService
serve `FourTurns` below (never done: it answers every turn with one short user message, so
every episode takes --turns turns of --turn-tokens sampled tokens each; turns run to
max_tokens). Measured in this one run:
- episodes: tasks x n episodes in one RunEpisodes call -> episodes/s and sampled tokens/s;
- single-turn: the same number of sequences, each generating --turns x --turn-tokens tokens in
  one Generate call (split over the replicas as the learner does) -> sampled tokens/s;
- the ratio of the two (the goal: >= 0.8);
Each replica's engine has a core of its own. Also printed:
- vLLM's prefix-cache hit rate (hits / queried tokens on both replicas) of the episode run with
  every turn of an episode on one replica (the default), and again with each turn sent to the
  next replica (`--no-episode-affinity`), each on fresh replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from rlhf_mesh.clients.environment import EnvironmentClient
from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.processes import ChildProcess, free_port
from rlhf_mesh.services.environment.environments import Step


class FourTurns:
    """The benchmark's environment: asks a question, then "Go on." after every turn; never done."""

    def reset(self, task: dict) -> str:
        return task["question"]

    def step(self, action: str) -> Step:
        return Step("Go on.")


def prefix_cache(metrics_ports: list[int]) -> tuple[float, float]:
    """vLLM's prefix-cache (hits, queries) in tokens, summed over the replicas."""
    totals = [0.0, 0.0]
    for port in metrics_ports:
        text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10).read().decode()
        for i, name in enumerate(("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")):
            totals[i] += sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return totals[0], totals[1]


def start(stack: ExitStack, args: list[str], **options) -> ChildProcess:
    metrics = free_port()
    log = Path(tempfile.gettempdir()) / f"episodes-benchmark-{args[4]}-{metrics}.log"
    child = ChildProcess(Path(args[2]).name, [*args, "--metrics-port", str(metrics)], log, **options)
    stack.callback(child.stop, 60)
    child.metrics_port = metrics
    return child


def replicas(stack: ExitStack, model: str, block_size: int | None) -> list[ChildProcess]:
    cores = sorted(os.sched_getaffinity(0))  # one core each (vLLM would bind both to the first)
    children = [start(stack, [sys.executable, "-m", "rlhf_mesh", "serve", "generation", "--model", model, "--dtype",
                              "float32", "--max-model-len", "1024",
                              *([f"--engine-args=block_size={block_size}"] if block_size else [])],
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(cores[k % len(cores)])}) for k in range(2)]
    for child in children:
        child.wait_serving()
    return children


def run_episodes(generation: list[ChildProcess], affinity: bool, tasks: list[dict], a: argparse.Namespace
                 ) -> tuple[float, int, int]:
    """(seconds, episodes, sampled tokens) of one RunEpisodes call on fresh replicas' service."""
    with ExitStack() as stack:
        flags = [] if affinity else ["--no-episode-affinity"]
        environment = start(stack, [
            sys.executable, "-m", "rlhf_mesh", "serve", "environment", "--environment", "four=episodes:FourTurns",
            *[f"--generation={g.address}" for g in generation], "--max-turns", str(a.turns), *flags],
            env={"PYTHONPATH": str(Path(__file__).parent)})
        environment.wait_serving()
        with EnvironmentClient(environment.address, timeout_s=1800) as client:
            started = time.perf_counter()
            episodes = list(client.run_episodes("four", tasks, n=a.n, max_tokens=a.turn_tokens, temperature=1.0,
                                                seed=0, max_turns=a.turns))
            seconds = time.perf_counter() - started
    assert all(len(e.turns) == a.turns for e in episodes), "an episode ended early: raise the model length"
    return seconds, len(episodes), sum(sum(e.loss_mask) for e in episodes)


async def single_turn(generation: list[ChildProcess], prompts: list[str], a: argparse.Namespace) -> tuple[float, int]:
    """(seconds, sampled tokens) of the same sequences in one turn each, split over the replicas."""
    clients = [AsyncGenerationClient(g.address, timeout_s=1800) for g in generation]
    shards = [prompts[i::len(clients)] for i in range(len(clients))]

    async def shard(client: AsyncGenerationClient, part: list[str]) -> int:
        messages = [[{"role": "user", "content": p}] for p in part]
        return sum([len(s.completion_token_ids) async for s in client.generate(
            messages, n=a.n, max_tokens=a.turns * a.turn_tokens, temperature=1.0, seed=0, ignore_eos=True)])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(shard(c, p) for c, p in zip(clients, shards, strict=True))))
    seconds = time.perf_counter() - started
    for client in clients:
        await client.close()
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="policy folder (default: the tiny one, built here)")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="episodes per task")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, help="vLLM's KV cache block size (default: vLLM's, 128 on CPU): "
                        "the prefix cache holds whole blocks only")
    a = parser.parse_args()
    from rlhf_mesh.tiny_models import build, prompts

    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or str(build(tmp)["policy"])
        questions = [f"{p}." for p in prompts()[:a.tasks]]
        tasks = [{"question": q} for q in questions]
        figures = {}
        with ExitStack() as stack:
            generation = replicas(stack, model, a.block_size)
            run_episodes(generation, True, tasks[:2], a)  # warm-up
            asyncio.run(single_turn(generation, questions[:2], a))
            single_s, single_tokens = asyncio.run(single_turn(generation, questions, a))
            before = prefix_cache([g.metrics_port for g in generation])
            figures["affinity"] = (*run_episodes(generation, True, tasks, a), before,
                                   prefix_cache([g.metrics_port for g in generation]))
        with ExitStack() as stack:  # fresh replicas: an empty prefix cache
            generation = replicas(stack, model, a.block_size)
            before = prefix_cache([g.metrics_port for g in generation])
            figures["spread"] = (*run_episodes(generation, False, tasks, a), before,
                                 prefix_cache([g.metrics_port for g in generation]))
    seconds, count, tokens, before, after = figures["affinity"]
    print("| run | seconds | episodes/s | sampled tokens/s | prefix-cache hit rate |\n|---|---|---|---|---|")
    print(f"| single-turn, {a.tasks * a.n} sequences of {a.turns * a.turn_tokens} tokens | {single_s:.2f} | - | "
          f"{single_tokens / single_s:,.0f} | - |")
    for name, (seconds, count, tokens, before, after) in figures.items():
        hits, queries = after[0] - before[0], after[1] - before[1]
        rate = f"{hits / queries:.1%}" if queries else "n/a (no vLLM prefix-cache metrics)"
        print(f"| episodes, {a.turns} turns, turns {'on one replica' if name == 'affinity' else 'spread'} | "
              f"{seconds:.2f} | {count / seconds:.2f} | {tokens / seconds:,.0f} | {rate} |")
    seconds, _, tokens, _, _ = figures["affinity"]
    print(f"\nepisodes / single-turn sampled tokens/s: {tokens / seconds / (single_tokens / single_s):.2f}x "
          f"(goal >= 0.8)")
    print(json.dumps({"tasks": a.tasks, "n": a.n, "turns": a.turns, "turn_tokens": a.turn_tokens,
                      "block_size": a.block_size}))


if __name__ == "__main__":
    main()
