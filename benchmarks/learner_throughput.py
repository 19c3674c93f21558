"""Learner throughput on long, uneven rollouts: padding against packing, row counts against a
token budget, whole logits against chunked log-probs.

    python benchmarks/learner_throughput.py [--preset small] [--model DIR] [--rollouts 32]
                                            [--device cuda] [--groups NAME ...] [--json PATH]

Each row is one GRPO step (4 samples per prompt, KL to a reference model, one epoch, one
mini-batch) in a fresh process, so that its peak memory is its own; its ratios are against the
group's first row, measured in the same run:

- long-tailed: 32 rollouts of a 64-token prompt and a response drawn from a log-normal of median
  200 tokens, one of them 2048 (the longest a reasoning batch has), on `--preset` or `--model`:
  4 micro-batches of rows padded to the longest of each; the same rows packed; with chunked
  log-probs; packed micro-batches of at most `--token-budget` tokens balanced over the ranks.
- vocab64k: 8 rollouts of 2048 tokens on the 64k-row vocabulary preset, 2 rows per micro-batch:
  the model's whole logits against chunked log-probs (the LM head on 1024 tokens at a time).

Tokens/s counts the real tokens (prompts + responses) over the step's seconds (old and reference
log-prob passes and the update). Peak memory is the process's peak RSS on CPU (glibc's mmap
threshold fixed, as benchmarks/learner_memory.py does), `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_mib

BASE = {"advantage_estimator": "grpo", "num_samples_per_prompt": 4, "num_ppo_epochs": 1, "num_mini_batches": 1,
        "kl_coef": 0.05, "learning_rate": 1e-5, "rollout_correction": "none"}  # made-up sampler log-probs
GROUPS = {
    "long-tailed": {"preset": None, "shape": "long-tailed", "rows": {
        "padded (4 micro-batches, each cut to its longest)": {"padding_free": False, "logprobs_chunk_size": 0,
                                            "gradient_accumulation_steps": 4},
        "packed (4 micro-batches)": {"logprobs_chunk_size": 0, "gradient_accumulation_steps": 4},
        "packed + chunked log-probs": {"gradient_accumulation_steps": 4},
        "packed + chunked + token budget": {"max_tokens_per_micro_batch": None},  # --token-budget
    }},
    "vocab64k": {"preset": "vocab64k", "shape": "2048", "rows": {
        "whole logits (2 rows per micro-batch)": {"logprobs_chunk_size": 0, "gradient_accumulation_steps": 4},
        "chunked log-probs (1024 tokens)": {"logprobs_chunk_size": 1024, "gradient_accumulation_steps": 4},
    }},
}
PROMPT_TOKENS = 64


def rollouts(shape: str, count: int, vocab: int) -> list:
    """Made-up rollouts: a long-tailed draw of response lengths (median 200, the first 2048), or
    every one 2048 tokens in all."""
    from rlhf_mesh.services.learner.rollouts import Rollout

    rng = random.Random(0)
    if shape == "long-tailed":
        lengths = [2048 - PROMPT_TOKENS] + [min(2048 - PROMPT_TOKENS, max(8, round(rng.lognormvariate(math.log(200),
                                                                                                         0.9))))
                                            for _ in range(count - 1)]
    else:
        lengths = [2048 - PROMPT_TOKENS] * count
    return [Rollout(prompt_index=i // 4, sample_index=i % 4,
                    prompt_ids=[rng.randrange(5, vocab) for _ in range(PROMPT_TOKENS)],
                    response_ids=[rng.randrange(5, vocab) for _ in range(n)], sampler_logprobs=[-5.0] * n, text="",
                    finished=True, policy_version_start=0, policy_version_end=0, score=rng.gauss(0, 1))
            for i, n in enumerate(lengths)]


def one_step(policy: str, prompts: str, device: str, shape: str, count: int, overrides: dict) -> dict:
    """In a fresh process: one step, timed."""
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.learner.trainer import Trainer

    settings = LearnerSettings(policy=policy, generation=["localhost:1"], reward="localhost:2", prompts=prompts,
                               output_dir=tempfile.mkdtemp(), device=device, batch_size=count // 4,
                               **{**BASE, **overrides})
    trainer = Trainer(settings)
    batch = rollouts(shape, count, min(trainer.models.policy.config.vocab_size, 30000))
    started = time.perf_counter()
    trainer.train(batch)
    seconds = time.perf_counter() - started
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in batch)
    rows = settings.micro_batch_size
    padded = sum(max(len(r.prompt_ids) + len(r.response_ids) for r in batch[i:i + rows]) * rows
                 for i in range(0, count, rows))  # the no-gradient passes' micro-batches, in order
    trainer.close()
    return {"peak_mib": peak_mib(device), "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "padding": 1 - tokens / padded, "packed": trainer.packed, "chunk": trainer.chunk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="the long-tailed group's model size")
    parser.add_argument("--model", help="the long-tailed group's policy folder instead of a preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rollouts", type=int, default=32, help="rollouts of the long-tailed group")
    parser.add_argument("--token-budget", type=int, default=4096, help="max_tokens_per_micro_batch of its last row")
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, prompts, shape, count, overrides = json.loads(args.child)
        Path(args.child_out).write_text(json.dumps(one_step(policy, prompts, args.device, shape, count, overrides)))
        return

    from rlhf_mesh.tiny_models import build

    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(64 << 10)} if args.device == "cpu" else {})}
    results: dict[str, dict[str, dict]] = {}
    failed = []
    for group in args.groups:
        spec = GROUPS[group]
        models = build(Path(tempfile.mkdtemp()) / "models", preset=spec["preset"] or args.preset)
        policy = args.model if args.model and spec["preset"] is None else str(models["policy"])
        count = args.rollouts if spec["shape"] == "long-tailed" else 8
        print(f"{group}: policy {policy}, {count} rollouts, device {args.device}", flush=True)
        results[group] = {}
        for name, overrides in spec["rows"].items():
            if "max_tokens_per_micro_batch" in overrides:
                overrides = {**overrides, "max_tokens_per_micro_batch": args.token_budget}
            child = json.dumps([policy, str(models["prompts"]), spec["shape"], count, overrides])
            out = Path(tempfile.mkdtemp()) / "result.json"
            run = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", child,
                                  "--child-out", str(out)], capture_output=True, text=True, env=env)
            try:
                if run.returncode != 0:
                    raise ValueError(f"exit code {run.returncode}: {run.stderr[-2000:]}")
                results[group][name] = json.loads(out.read_text())
            except ValueError as err:  # the rows measured so far still count
                failed.append(f"{group}: {name}")
                print(f"  {name}: FAILED, {err}", file=sys.stderr, flush=True)
                continue
            print(f"  {name}: {results[group][name]}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results))
    for group, rows in results.items():
        if not rows:
            continue
        base = next(iter(rows.values()))
        print(f"\n{group}\n\n| config | tokens/s | of the first | peak MiB | of the first | step s |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                  f"{r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f}x | {r['seconds']:.1f} |")
    if failed:
        sys.exit(f"learner_throughput: {', '.join(failed)} failed")


if __name__ == "__main__":
    main()
