"""Learner memory and step time under each memory lever, on one config.

    python benchmarks/learner_memory.py [--preset base] [--rollouts 32] [--length 256] [--device cuda] [--json PATH]

One PPO step (GAE with a value head on the policy, 4 epochs) on fixed made-up rollouts of
`--length` tokens, each config in a fresh process so that its peak is its own: peak memory
(the process's peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA) and the step's
seconds, against float32 without checkpointing measured in the same run. Then the bytes a
push of the trained policy sends: the full (or merged) weights, and a LoRA adapter alone
(lora_publish adapter), in the float32 the replicas serve here.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "float32": {},
    "bf16": {"dtype": "bfloat16"},
    "bf16 + gradient checkpointing": {"dtype": "bfloat16", "gradient_checkpointing": True},
    "LoRA (r 16, all linear layers)": {"use_peft": True, "lora_target_modules": ["all-linear"]},
    "LoRA + bf16 + gradient checkpointing": {"use_peft": True, "lora_target_modules": ["all-linear"],
                                             "dtype": "bfloat16", "gradient_checkpointing": True},
}


def one_step(policy: str, prompts: str, device: str, rollouts: int, length: int, overrides: dict) -> dict:
    """In a fresh process: build the trainer, time one step, report the peak memory in MiB."""
    import torch

    from rlhf_mesh.services.learner.rollouts import Rollout
    from rlhf_mesh.services.learner.settings import LearnerSettings
    from rlhf_mesh.services.learner.trainer import Trainer

    settings = LearnerSettings(policy=policy, generation=["localhost:1"], reward="localhost:2", prompts=prompts,
                               output_dir=tempfile.mkdtemp(), device=device, batch_size=rollouts // 4,
                               num_samples_per_prompt=4, num_mini_batches=2, gradient_accumulation_steps=2,
                               learning_rate=1e-5, value_head=True, **overrides)
    trainer = Trainer(settings)
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
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    from rlhf_mesh.weights import lora_adapter_of, state_dict_of

    policy = trainer.models.policy
    result = {"peak_mib": peak, "seconds": seconds,
              "push_bytes": sum(t.numel() * 4 for t in state_dict_of(policy).values())}  # what publish sends
    if overrides.get("use_peft"):
        result["adapter_push_bytes"] = sum(t.numel() * 4 for t in lora_adapter_of(policy)[0].values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--model", help="policy folder instead of a preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--length", type=int, default=256, help="prompt + response tokens of every rollout")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, prompts, overrides = json.loads(args.child)
        print(json.dumps(one_step(policy, prompts, args.device, args.rollouts, args.length, overrides)))
        return
    from rlhf_mesh.tiny_models import build

    models = build(Path(tempfile.mkdtemp()) / "models", preset=args.preset)
    policy = args.model or str(models["policy"])
    print(f"policy {policy}, {args.rollouts} rollouts x {args.length} tokens, device {args.device}", flush=True)
    results = {}
    for name, overrides in CONFIGS.items():
        child = json.dumps([policy, str(models["prompts"]), overrides])
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--rollouts", str(args.rollouts),
                              "--length", str(args.length), "--child", child],
                             capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"  {name}: {results[name]}", flush=True)
    base = results["float32"]
    print("\n| config | peak MiB | of float32 | step s | of float32 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f}x | {r['seconds']:.2f} | "
              f"{r['seconds'] / base['seconds']:.2f}x |")
    lora = results["LoRA (r 16, all linear layers)"]
    print("\n| push | MB | of a full push |\n|---|---|---|")
    print(f"| full weights | {base['push_bytes'] / 1e6:.1f} | 1.00x |")
    print(f"| LoRA merged | {lora['push_bytes'] / 1e6:.1f} | {lora['push_bytes'] / base['push_bytes']:.2f}x |")
    print(f"| LoRA adapter | {lora['adapter_push_bytes'] / 1e6:.1f} | "
          f"{lora['adapter_push_bytes'] / base['push_bytes']:.3f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
