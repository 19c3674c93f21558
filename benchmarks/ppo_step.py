"""PPO step time: where a synchronous step spends its time, against real services.

    python benchmarks/ppo_step.py [--preset tiny|small] [--steps 6] [--batch-size 16] [-n 4]

Starts a GenerationService (vLLM, float32) and a RewardService (transformers) on the
preset's policy and reward model, then runs the learner in this process for `--steps`
steps (the first one warms up and is not counted). Prints the mean time per phase
(generate, the scoring that did not overlap generation, reference + values, train, push),
samples per second, and, as the baseline measured in the same run, the same rollouts
generated first and scored afterwards in one batch: the ratio shows what streaming each
sample to the RewardService as it finishes saves.
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
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.services.learner.trainer import Trainer
from rlhf_mesh.tiny_models import build

from common import server

PHASES = ("time/generate_s", "time/score_s", "time/reference_values_s", "time/train_s", "time/push_s")


async def sequential(generation: str, reward: str, prompts: list[str], args: argparse.Namespace) -> float:
    """Seconds to generate every sample, then score them all in one call."""
    async with AsyncGenerationClient(generation) as gen, AsyncRewardClient(reward, timeout_s=600) as rm:
        started = time.perf_counter()
        samples = [s async for s in gen.generate(prompts, n=args.n, max_tokens=args.response_length,
                                                 temperature=1.0, seed=1)]
        await rm.score([(prompts[s.prompt_index], s.text) for s in samples])
        return time.perf_counter() - started


async def run(models: dict[str, Path], generation: str, reward: str, args: argparse.Namespace) -> None:
    settings = LearnerSettings(
        policy=str(models["policy"]), generation=[generation], reward=reward, prompts=models["prompts"],
        steps=args.steps, batch_size=args.batch_size, num_samples_per_prompt=args.n,
        response_length=args.response_length, num_ppo_epochs=args.ppo_epochs, learning_rate=1e-4,
        output_dir=Path(tempfile.mkdtemp()),
    )
    trainer = Trainer(settings)
    await trainer.connect()
    try:
        history = [await trainer.run_step() for _ in range(args.steps)][1:]
    finally:
        await trainer.close()
    baseline = [await sequential(generation, reward, trainer.dataset.batch(k, args.batch_size), args)
                for k in range(3)]

    def mean(name: str) -> float:
        return statistics.mean(h[name] for h in history)

    step = mean("time/step_s")
    print(f"\n{args.preset} policy, {args.batch_size} prompts x {args.n} samples x {args.response_length} tokens, "
          f"{args.ppo_epochs} PPO epochs, critic from the policy; mean of {len(history)} steps")
    print(f"{'phase':<26}{'seconds':>10}{'share':>8}")
    for name in PHASES:
        print(f"{name:<26}{mean(name):>10.3f}{mean(name) / step:>8.0%}")
    print(f"{'time/step_s':<26}{step:>10.3f}")
    print(f"samples/s: {mean('charts/samples_per_s'):.1f}")
    overlapped = mean("time/generate_s") + mean("time/score_s")
    print(f"generate + score, streamed: {overlapped:.3f} s; generate, then score in one batch: "
          f"{statistics.mean(baseline):.3f} s; ratio {overlapped / statistics.mean(baseline):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--steps", type=int, default=6, help="steps, the first one not counted")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("-n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--pin", action="store_true",
                        help="generation on CPU 0, reward on CPU 1 (taskset), as on separate devices")
    args = parser.parse_args()
    models = build(Path(tempfile.mkdtemp()) / "models", preset=args.preset)
    serve = [sys.executable, "-m", "rlhf_mesh", "serve"]
    on = (lambda cpu: ["taskset", "-c", str(cpu)]) if args.pin else (lambda cpu: [])
    if args.pin:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # vLLM would otherwise bind its threads to every core
    with (server([*on(0), *serve, "generation", "--model", str(models["policy"]), "--dtype", "float32",
                  "--max-model-len", "512"]) as generation,
          server([*on(1), *serve, "reward", "--model", str(models["reward"])]) as reward):
        asyncio.run(run(models, generation, reward, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
