"""PPO step time against real services: where a step spends its time, sync against async.

    python benchmarks/ppo_step.py [--mode sync|async|both] [--pin] [--preset tiny|small] [--steps 6]

For each mode it starts a GenerationService (vLLM, float32) and a RewardService
(transformers) on the preset's models, runs the learner in this process for `--steps`
steps (the first one warms up and is not counted) and prints the mean time per phase and
samples per second. sync: generate -> score -> train -> push. async: the next step's
rollouts are generated while this step trains (max_policy_lag 1). The baseline for the
ratio is the sync run of the same config in the same invocation. In sync mode it also
times the same rollouts generated first and scored afterwards in one call, to show what
streaming samples to the RewardService as they finish saves.

--pin puts generation on CPU 0 and the reward model and the learner on CPU 1 (taskset), as
generation and training would sit on separate GPUs; without it all share both cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rlhf_mesh.clients.generation import AsyncGenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.services.learner.run import Run
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.tiny_models import build

from common import server

PHASES = ("time/wait_rollouts_s", "time/generate_s", "time/score_s", "time/reference_values_s", "time/train_s",
          "time/push_s")


async def sequential(generation: str, reward: str, prompts: list[str], args: argparse.Namespace) -> float:
    """Seconds to generate every sample, then score them all in one call."""
    async with AsyncGenerationClient(generation) as gen, AsyncRewardClient(reward, timeout_s=600) as rm:
        started = time.perf_counter()
        samples = [s async for s in gen.generate(prompts, n=args.n, max_tokens=args.response_length,
                                                 temperature=1.0, seed=1)]
        await rm.score([(prompts[s.prompt_index], s.text) for s in samples])
        return time.perf_counter() - started


async def run(mode: str, models: dict[str, Path], generation: str, reward: str,
              args: argparse.Namespace) -> dict[str, float]:
    settings = LearnerSettings(
        policy=str(models["policy"]), generation=[generation], reward=reward, prompts=models["prompts"],
        steps=args.steps, batch_size=args.batch_size, num_samples_per_prompt=args.n,
        response_length=args.response_length, num_ppo_epochs=args.ppo_epochs, learning_rate=1e-4,
        async_generation=mode == "async", output_dir=Path(tempfile.mkdtemp()),
    )
    learner = Run(settings)
    try:
        await learner.start()
        history = [await learner.run_step() for _ in range(args.steps)][1:]
    finally:
        await learner.close()
    means = {name: statistics.mean(h[name] for h in history) for name in history[0]}
    step = means["time/step_s"]
    print(f"\n{mode}: {args.preset} policy, {args.batch_size} prompts x {args.n} samples x {args.response_length} "
          f"tokens, {args.ppo_epochs} PPO epochs, critic from the policy; mean of {len(history)} steps")
    print(f"{'phase':<26}{'seconds':>10}{'share':>8}")
    for name in PHASES:
        print(f"{name:<26}{means[name]:>10.3f}{means[name] / step:>8.0%}")
    print(f"{'time/step_s':<26}{step:>10.3f}\nsamples/s: {means['charts/samples_per_s']:.1f}; "
          f"policy lag: mean {means['async/lag_mean']:.2f}, max {max(h['async/lag_max'] for h in history):.0f}")
    # Busy share of each side, as a stand-in for GPU utilisation: generation+scoring, and training.
    print(f"generation busy {min(1, (means['time/generate_s'] + means['time/score_s']) / step):.0%}, "
          f"learner busy {(means['time/reference_values_s'] + means['time/train_s']) / step:.0%}")
    if mode == "sync":
        baseline = statistics.mean([await sequential(generation, reward, learner.dataset.batch(k, args.batch_size),
                                                      args) for k in range(3)])
        streamed = means["time/generate_s"] + means["time/score_s"]
        print(f"generate + score, streamed: {streamed:.3f} s; generate, then score in one batch: {baseline:.3f} s; "
              f"ratio {streamed / baseline:.2f}")
    return means


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="both", choices=("sync", "async", "both"))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--steps", type=int, default=6, help="steps, the first one not counted")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("-n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--pin", action="store_true",
                        help="generation on CPU 0; reward and learner on CPU 1 (taskset)")
    args = parser.parse_args()
    models = build(Path(tempfile.mkdtemp()) / "models", preset=args.preset)
    serve = [sys.executable, "-m", "rlhf_mesh", "serve"]
    on = (lambda cpu: ["taskset", "-c", str(cpu)]) if args.pin else (lambda cpu: [])
    if args.pin:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # vLLM would otherwise bind its threads to every core
        os.sched_setaffinity(0, {1})
        import torch

        torch.set_num_threads(1)
    results = {}
    for mode in ("sync", "async") if args.mode == "both" else (args.mode,):
        # A fresh generation server per mode: every run starts at policy version 0.
        with (server([*on(0), *serve, "generation", "--model", str(models["policy"]), "--dtype", "float32",
                      "--max-model-len", "512"]) as generation,
              server([*on(1), *serve, "reward", "--model", str(models["reward"])]) as reward):
            results[mode] = asyncio.run(run(mode, models, generation, reward, args))
    if len(results) == 2:
        ratio = results["async"]["time/step_s"] / results["sync"]["time/step_s"]
        print(f"\nasync / sync step time: {ratio:.2f} (target <= 0.75)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
