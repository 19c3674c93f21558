"""Learner memory and step time under each memory lever, on one config.

    python benchmarks/learner_memory.py [--preset base] [--rollouts 32] [--length 256] [--device cuda]
                                        [--configs NAME ...] [--json PATH]

One PPO step (GAE with a value head on the policy, 4 epochs) on fixed made-up rollouts of
`--length` tokens, each config in a fresh process so that its peak is its own: peak memory
(the process's peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA) and the step's
seconds, against float32 without checkpointing measured in the same run. FSDP2 runs under
torchrun on `--ranks` processes (each on its own GPU with CUDA) and reports the largest peak
of a rank. Then the bytes a push of the trained policy sends: the full (or merged) weights,
and a LoRA adapter alone (lora_publish adapter), in the float32 the replicas serve here.

On CPU every child runs with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_): by
default it grows with each large block freed, so the blocks torch frees afterwards (FSDP2's
per-layer gathers, AdamW's temporaries) stay in the heap and in the RSS; fixed, they go back
to the system and the peak RSS is what torch held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_mib

CONFIGS = {
    "float32": {},
    "no KL (kl_coef 0: no reference model)": {"kl_coef": 0.0},
    "bf16": {"dtype": "bfloat16"},
    "bf16 + gradient checkpointing": {"dtype": "bfloat16", "gradient_checkpointing": True},
    "LoRA (r 16, all linear layers)": {"use_peft": True, "lora_target_modules": ["all-linear"]},
    "LoRA + bf16 + gradient checkpointing": {"use_peft": True, "lora_target_modules": ["all-linear"],
                                             "dtype": "bfloat16", "gradient_checkpointing": True},
    "FSDP2 (per rank)": {"fsdp": True},
    "FSDP2 + bf16 + gradient checkpointing (per rank)": {"fsdp": True, "dtype": "bfloat16",
                                                         "gradient_checkpointing": True},
}


def one_step(policy: str, prompts: str, device: str, rollouts: int, length: int, overrides: dict) -> dict:
    """In a fresh process (a rank of a torchrun launch with fsdp): build the trainer, time one step,
    report the peak memory in MiB."""

    from rlhf_mesh.services.learner.rollouts import Rollout
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.learner.trainer import Trainer

    settings = LearnerSettings(policy=policy, generation=["localhost:1"], reward="localhost:2", prompts=prompts,
                               output_dir=tempfile.mkdtemp(), device=device, batch_size=rollouts // 4,
                               num_samples_per_prompt=4, num_mini_batches=2, gradient_accumulation_steps=2,
                               learning_rate=1e-5, value_head=True,
                               rollout_correction="none",  # made-up sampler log-probs: nothing to correct
                               **overrides)
    trainer = Trainer(settings)
    if trainer.world.rank > 0:
        trainer.follow()
        return {"peak_mib": peak_mib(device)}
    rng = random.Random(0)
    response = length * 3 // 4
    batch = [Rollout(prompt_index=i // 4, sample_index=i % 4, prompt_ids=[rng.randrange(5, 500) for _ in
                                                                          range(length - response)],
                     response_ids=[rng.randrange(5, 500) for _ in range(response)], sampler_logprobs=[-5.0] * response,
                     text="", finished=True, policy_version_start=0, policy_version_end=0, score=rng.gauss(0, 1))
             for i in range(rollouts)]
    started = time.perf_counter()
    trainer.train(batch)
    seconds = time.perf_counter() - started
    peak = peak_mib(device)
    if trainer.sharded:  # its pushes send what the float32 row's do
        trainer.close()
        return {"peak_mib": peak, "seconds": seconds}
    from rlhf_mesh.weights import lora_adapter_of, state_dict_of

    policy = trainer.models.policy
    result = {"peak_mib": peak, "seconds": seconds,
              "push_bytes": sum(t.numel() * 4 for t in state_dict_of(policy).values())}  # what publish sends
    if overrides.get("use_peft"):
        result["adapter_push_bytes"] = sum(t.numel() * 4 for t in lora_adapter_of(policy)[0].values())
    return result


def merge_ranks(reports: list[dict]) -> dict:
    """One row from what each rank reported, in whatever order: rank 0's figures (only it times
    the step and counts push bytes) with the largest peak of any rank."""
    ranks = sorted(reports, key=lambda r: r["rank"])
    if not ranks or ranks[0]["rank"] != 0:
        raise ValueError(f"no figures from rank 0 among ranks {[r['rank'] for r in ranks]}")
    return {**ranks[0], "peak_mib": max(r["peak_mib"] for r in ranks), "peaks_mib": [r["peak_mib"] for r in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--model", help="policy folder instead of a preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--length", type=int, default=256, help="prompt + response tokens of every rollout")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes of the FSDP2 configs")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="the configs to run (float32, the baseline, always runs)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, prompts, overrides = json.loads(args.child)
        result = one_step(policy, prompts, args.device, args.rollouts, args.length, overrides)
        rank = int(os.environ.get("RANK", "0"))
        # A file per rank: lines that torchrun's ranks print to one pipe can interleave.
        (Path(args.child_out) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **result}))
        return
    import torch

    from rlhf_mesh.tiny_models import build

    models = build(Path(tempfile.mkdtemp()) / "models", preset=args.preset)
    policy = args.model or str(models["policy"])
    print(f"policy {policy}, {args.rollouts} rollouts x {args.length} tokens, device {args.device}", flush=True)
    results: dict[str, dict] = {}
    failed = []
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(64 << 10)} if args.device == "cpu" else {})}
    for name, overrides in CONFIGS.items():
        if name != "float32" and name not in args.configs:
            continue
        if overrides.get("fsdp") and args.device.startswith("cuda") and torch.cuda.device_count() < args.ranks:
            print(f"  {name}: skipped, {torch.cuda.device_count()} GPU(s) for {args.ranks} ranks", flush=True)
            continue
        child = json.dumps([policy, str(models["prompts"]), overrides])
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                  str(args.ranks)] if overrides.get("fsdp") else [sys.executable]
        out = tempfile.mkdtemp()
        run = subprocess.run([*launch, __file__, "--device", args.device, "--rollouts", str(args.rollouts),
                              "--length", str(args.length), "--child", child, "--child-out", out],
                             capture_output=True, text=True, env=env)
        try:
            if run.returncode != 0:
                raise ValueError(f"exit code {run.returncode}: {run.stderr[-2000:]}")
            results[name] = merge_ranks([json.loads(f.read_text()) for f in Path(out).glob("rank*.json")])
        except ValueError as err:  # the rows measured so far still count
            failed.append(name)
            print(f"  {name}: FAILED, {err}", file=sys.stderr, flush=True)
            continue
        print(f"  {name}: {results[name]}", flush=True)
        if args.json:  # after every row, so that a later failure keeps the rows measured
            Path(args.json).write_text(json.dumps(results))
    if "float32" not in results:
        sys.exit("learner_memory: the float32 baseline failed; no ratios")
    base = results["float32"]
    print("\n| config | peak MiB | of float32 | step s | of float32 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f}x | {r['seconds']:.2f} | "
              f"{r['seconds'] / base['seconds']:.2f}x |")
    lora = results.get("LoRA (r 16, all linear layers)")
    if lora is not None:
        print_push_table(base, lora)
    if failed:
        sys.exit(f"learner_memory: {', '.join(failed)} failed")


def print_push_table(base: dict, lora: dict) -> None:
    print("\n| push | MB | of a full push |\n|---|---|---|")
    print(f"| full weights | {base['push_bytes'] / 1e6:.1f} | 1.00x |")
    print(f"| LoRA merged | {lora['push_bytes'] / 1e6:.1f} | {lora['push_bytes'] / base['push_bytes']:.2f}x |")
    print(f"| LoRA adapter | {lora['adapter_push_bytes'] / 1e6:.1f} | "
          f"{lora['adapter_push_bytes'] / base['push_bytes']:.3f}x |")


if __name__ == "__main__":
    main()
