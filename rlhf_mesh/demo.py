"""`rlhf-mesh demo`: the whole RLHF loop on this machine, through the real services.

It builds the tiny models (unless given its own), starts the GenerationService (vLLM), the
RewardService and the FeedbackService as separate processes, then runs rounds of:
feedback from a scripted rater on the policy's own samples -> export -> train-rm -> hot
reload -> PPO (the learner as its own process, its WatchMetrics on the console) -> fresh
samples judged by the rater. The rater's taste is one a person can check: it prefers the
response with more polite words (POLITE_WORDS). It ends with a summary table, a plot and
the paths of the logs, TensorBoard runs and checkpoints, and stops every process it
started, also on Ctrl-C or when a step fails.

`--model real` is the longer second demo: SmolLM2-135M-Instruct (`rlhf-mesh models real`) on
arithmetic word problems (`rlhf_mesh/arithmetic.py`). The rater prefers the right answer of two,
the reward is the `math` function with the reward model trained on the rater's choices beside it
(`total = 0.8*math + 0.2*reward`), the learner trains a LoRA adapter by GRPO, and the measure is
the greedy accuracy on the 200 held-out problems.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.processes import ChildProcess, stop_all
from rlhf_mesh.settings import FileSettings, old_name_of

POLITE_WORDS = ("please", "thank", "kind", "glad", "good", "great", "happy", "lovely", "helpful", "wonderful",
                "excellent")
_POLITE = re.compile("|".join(POLITE_WORDS), re.IGNORECASE)


class DemoSettings(FileSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_DEMO_")

    out: Path = Field(Path("runs/demo"), description="everything the demo writes: models, logs, round outputs, plot")
    model: Literal["tiny", "real"] = Field(
        "tiny", description="tiny: random models built here, a rater of politeness (minutes); real: "
        "SmolLM2-135M-Instruct on arithmetic word problems, a rater of right answers, GRPO with LoRA (a longer demo, "
        "with defaults of its own for the keys not given)")
    policy: str | None = Field(None, description="initial policy folder; default: the tiny one, built under out/models")
    reward_model_path: str | None = Field(
        None, description="reward model folder, served first and the base of each round's train-rm; default: tiny")
    prompts: Path | None = Field(None, description="prompts (.jsonl with a prompt field); default: the tiny ones")
    seed: int = Field(0, description="models, sampling, rater order, PPO")
    rounds: int = Field(2, ge=1, description="feedback -> reward model -> PPO rounds")
    steps: int = Field(12, ge=1, description="PPO steps per round")
    feedback_prompts: int = Field(160, ge=2, description="prompts the rater judges per round (two responses each)")
    eval_prompts: int = Field(64, ge=1, description="prompts of the fresh samples that measure the rater's preference")
    eval_samples: int = Field(4, ge=1, description="fresh samples per evaluation prompt")
    batch_size: int = Field(16, ge=1, description="PPO prompts per step")
    num_samples_per_prompt: int = Field(4, ge=1, description="PPO responses per prompt")
    response_length: int = Field(24, ge=1, description="tokens per response")
    learning_rate: float = Field(3e-3, gt=0, description="PPO learning rate")
    kl_coef: float = Field(0.15, ge=0, description="PPO KL penalty coefficient")
    rm_epochs: int = Field(4, ge=1, description="train-rm epochs per round")
    rm_learning_rate: float = Field(1e-3, gt=0, description="train-rm learning rate")
    device: str = Field("cpu", description="torch device of the learner and the reward model")
    timeout_s: float = Field(300.0, gt=0, description="longest wait for a service to start or a call to end")
    reward: str | None = old_name_of("reward_model_path")


# `--model real`'s defaults (the tiny demo's are the fields'): a 135M model's steps take minutes.
REAL_DEFAULTS = {"rounds": 2, "steps": 3, "feedback_prompts": 160, "eval_prompts": 200, "eval_samples": 1,
                 "batch_size": 4, "num_samples_per_prompt": 8, "response_length": 64, "learning_rate": 2e-4,
                 "kl_coef": 0.0, "rm_epochs": 2, "rm_learning_rate": 2e-5}


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the service and its log."""


def politeness(text: str) -> int:
    """How many polite words the text holds: the scripted rater's whole taste."""
    return len(_POLITE.findall(text))


def judge(responses: list[str]) -> int | None:
    """The rater's choice: the response with the most polite words, None when that is a tie."""
    counts = [politeness(r) for r in responses]
    best = max(counts)
    return counts.index(best) if counts.count(best) == 1 else None


def judge_answers(responses: list[str], answer: str) -> int | None:
    """The arithmetic rater's choice: the right answer (math-verify) of a right and a wrong one, the
    shorter of two right ones; None when both are wrong or as long."""
    from rlhf_mesh.reward_functions import math

    right = [score == 1 for score in math([], responses, [answer] * len(responses))]
    if right.count(True) == 1:
        return right.index(True)
    lengths = [len(r) for r in responses]
    return lengths.index(min(lengths)) if all(right) and lengths.count(min(lengths)) == 1 else None


def _text(prompt: str | list[dict[str, str]]) -> str:
    """A prompt as the rater reads it: the last message of a chat."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _untrained_reward_model(policy: str, folder: Path) -> Path:
    """The policy with a one-label score head of zeros (every answer scores 0 until the first
    round's train-rm): the reward model the service starts with, and train-rm's base."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    torch.nn.init.zeros_(model.score.weight)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder




@dataclass
class Processes:
    """Every process the demo started; all are stopped on exit, whatever happens."""

    logs: Path
    started: list[ChildProcess] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> ChildProcess:
        child = ChildProcess(name, [sys.executable, "-m", "rlhf_mesh", *args], self.logs / f"{name}.log")
        self.started.append(child)
        return child

    def wait_serving(self, child: ChildProcess, timeout_s: float) -> None:
        try:
            child.wait_serving(timeout_s)
        except Exception as err:
            raise DemoError(f"the {child.name} service did not start ({err}); see {child.log_path}") from None

    def stop_all(self) -> None:
        stop_all(self.started)


@contextlib.contextmanager
def _phase(times: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - started


class Demo:
    def __init__(self, settings: DemoSettings) -> None:
        self.real = settings.model == "real"
        if self.real:
            settings = settings.model_copy(update={k: v for k, v in REAL_DEFAULTS.items()
                                                   if k not in settings.model_fields_set})
        self.s = settings
        self.metric = ("accuracy", "held-out accuracy") if self.real else ("polite_rate", "the rater likes")
        self.out = settings.out.resolve()
        self.processes = Processes(self.out / "logs")
        self.rounds: list[dict[str, float]] = []

    def say(self, text: str) -> None:
        print(text, flush=True)

    # --- set-up ---------------------------------------------------------------------------

    def models(self) -> tuple[str, str, Path, Path | None]:
        """Policy, reward model (the base of train-rm), prompts and, with `--model real`, the held-out problems."""
        s = self.s
        if self.real:
            from rlhf_mesh import arithmetic
            from rlhf_mesh.real_model import materialise

            if s.policy is None:
                self.say(f"the real model: {self.out / 'models' / 'real'} (materialised once)")
            policy = s.policy or str(materialise(self.out / "models" / "real"))
            train, held_out = arithmetic.write(self.out / "models" / "arithmetic", seed=s.seed)
            reward = s.reward_model_path or str(_untrained_reward_model(policy, self.out / "models" / "real-reward"))
            return policy, reward, s.prompts or train, held_out
        if s.policy and s.reward_model_path and s.prompts:
            return s.policy, s.reward_model_path, s.prompts, None
        from rlhf_mesh.tiny_models import build

        folder = self.out / "models"
        if not (folder / "models.json").is_file() or json.loads((folder / "models.json").read_text())["seed"] != s.seed:
            self.say(f"building the tiny models in {folder}")
            build(folder, seed=s.seed)
        return (s.policy or str(folder / "policy"), s.reward_model_path or str(folder / "reward"),
                s.prompts or folder / "prompts.jsonl", None)

    def start_services(self, policy: str, reward: str) -> dict[str, ChildProcess]:
        services = {
            "generation": self.processes.start("generation", [
                "serve", "generation", "--model", policy, "--dtype", "float32", "--max-model-len", "512",
                "--seed", str(self.s.seed)]),
            "reward": self.processes.start("reward", [
                "serve", "reward", "--model", f"reward={reward}", "--device", self.s.device,
                *(["--function", "math", "--composite", "total=0.8*math+0.2*reward"] if self.real else [])]),
            "feedback": self.processes.start("feedback", [
                "serve", "feedback", "--db", f"sqlite:///{self.out / 'feedback.db'}", "--rater-port", "0"]),
        }
        for service in services.values():
            self.say(f"  {service.name:<10} {service.address:<16} log {service.log_path}")
        for service in services.values():
            self.processes.wait_serving(service, self.s.timeout_s)
        self.say("  all SERVING")
        return services

    # --- one round ------------------------------------------------------------------------

    def sample(self, address: str, prompts: list, n: int, seed: int, temperature: float = 1.0) -> list[tuple[int, str]]:
        from rlhf_mesh.clients.generation import GenerationClient

        with GenerationClient(address, timeout_s=self.s.timeout_s) as client:
            return [(x.prompt_index, x.text) for x in client.generate(
                prompts, n=n, max_tokens=self.s.response_length, temperature=temperature, seed=seed)]

    def evaluate(self, services: dict[str, ChildProcess], rows: list, seed: int) -> dict[str, float]:
        """The rater's verdict on fresh samples of the served policy (with `--model real`, the share of
        greedy answers math-verify accepts), and their reward under the current reward model."""
        from rlhf_mesh.clients.reward import RewardClient
        from rlhf_mesh.v1 import reward_pb2

        prompts = [prompt for prompt, _ in rows]
        samples = self.sample(services["generation"].address, prompts, self.s.eval_samples, seed,
                              temperature=0.0 if self.real else 1.0)
        with RewardClient(services["reward"].address, timeout_s=self.s.timeout_s) as client:
            scores = client.scores([(_text(prompts[i]), text) for i, text in samples], model="reward")
            if self.real:
                right = client.scores([reward_pb2.ScoreSample(
                    text=reward_pb2.PromptResponse(prompt=_text(prompts[i]), response=text),
                    reference=rows[i][1]) for i, text in samples], model="math")
                return {"accuracy": sum(right) / len(right), "reward_mean": sum(scores) / len(scores)}
        return {
            "polite_rate": sum(politeness(t) > 0 for _, t in samples) / len(samples),
            "polite_words": sum(politeness(t) for _, t in samples) / len(samples),
            "reward_mean": sum(scores) / len(scores),
        }

    def collect_feedback(self, services: dict[str, ChildProcess], rows: list, round_: int) -> int:
        """The rater judges two fresh responses per prompt; returns how many judgements it gave."""
        from rlhf_mesh.clients.feedback import FeedbackClient, feedback

        prompts = [prompt for prompt, _ in rows]
        samples = self.sample(services["generation"].address, prompts, 2, seed=self.s.seed * 7919 + round_,
                              temperature=0.7 if self.real else 1.0)
        responses: dict[int, list[str]] = {}
        for index, text in samples:
            responses.setdefault(index, []).append(text)
        given = 0
        with FeedbackClient(services["feedback"].address, timeout_s=self.s.timeout_s) as client:
            for index, pair in sorted(responses.items()):
                choice = judge_answers(pair, rows[index][1]) if self.real else judge(pair)
                if choice is None or not all(r.strip() for r in pair):
                    continue
                rater = "answer-rater" if self.real else "polite-rater"
                client.submit(feedback(_text(prompts[index]), pair, rater_id=rater, choice=choice,
                                       feedback_id=f"round{round_}-{index}", model_id="policy",
                                       policy_version=(round_ - 1) * self.s.steps))
                given += 1
        return given

    def train_reward_model(self, services: dict[str, ChildProcess], base: str, folder: Path) -> dict[str, float]:
        from rlhf_mesh.clients.feedback import FeedbackClient
        from rlhf_mesh.clients.reward import RewardClient
        from rlhf_mesh.services.reward.training import TrainRmSettings, train

        with FeedbackClient(services["feedback"].address, timeout_s=self.s.timeout_s) as client:
            pairs, _ = client.export_preferences()
        folder.mkdir(parents=True, exist_ok=True)
        pairs_file = folder / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
                                      + "\n" for p in pairs))
        metrics = train(TrainRmSettings(preferences=pairs_file, base=base, out=folder / "reward",
                                        epochs=self.s.rm_epochs, learning_rate=self.s.rm_learning_rate,
                                        batch_size=16, eval_fraction=0.2, seed=self.s.seed))
        with RewardClient(services["reward"].address) as client:
            client.reload_model("reward", str(folder / "reward"), timeout_s=self.s.timeout_s)
        return metrics

    def ppo(self, services: dict[str, ChildProcess], policy: str, prompts_file: Path,
            round_: int) -> dict[str, float]:
        """Run the learner process until it has done round_ * steps steps; its metrics go to the console."""
        import grpc
        import yaml

        from rlhf_mesh.clients.learner import LearnerClient
        from rlhf_mesh.services.learner.settings import LearnerSettings

        s = self.s
        run_dir = self.out / "ppo"
        # The real model: GRPO on math + the reward model, a LoRA adapter on every linear layer, sampled at
        # 0.7 (at 1.0 a 135M model rarely answers right), micro-batches of 8 rows (a 49k vocabulary).
        task = dict(reward_model="total", messages_field="messages", reference_field="answer",
                    advantage_estimator="grpo", use_peft=True, lora_target_modules=["all-linear"], temperature=0.7,
                    num_ppo_epochs=1, loss_agg_mode="seq-mean-token-mean", whiten_advantages=False,
                    gradient_accumulation_steps=max(1, s.batch_size * s.num_samples_per_prompt // 8),
                    ) if self.real else dict(reward_model="reward")
        settings = LearnerSettings(
            policy=policy, generation=[services["generation"].address], reward=services["reward"].address,
            **task, prompts=prompts_file, steps=round_ * s.steps, batch_size=s.batch_size,
            num_samples_per_prompt=s.num_samples_per_prompt, response_length=s.response_length,
            learning_rate=s.learning_rate, kl_coef=s.kl_coef, seed=s.seed, device=s.device, output_dir=run_dir,
            linger_s=1, metrics_port=0,
            resume_from=run_dir / "checkpoints" / f"step-{(round_ - 1) * s.steps:06d}" if round_ > 1 else None,
        )
        config = self.out / "logs" / f"learner-round{round_}.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_unset=True)))
        learner = self.processes.start(f"learner-round{round_}", ["serve", "learner", "--config", str(config)])
        self.processes.wait_serving(learner, s.timeout_s)
        last: dict[str, float] = {}
        with LearnerClient(learner.address, timeout_s=s.timeout_s) as client, \
                contextlib.suppress(grpc.RpcError):  # the stream ends when the learner exits
            for step in client.watch_metrics(from_step=(round_ - 1) * s.steps + 1, timeout_s=s.timeout_s * 10):
                last = dict(step.scalars)
                kl = f"kl {last['objective/kl']:.3f}  " if "objective/kl" in last else ""
                self.say(f"  ppo step {step.step:>3}  reward {last['charts/reward_mean']:+.3f}  {kl}"
                         f"{last['time/step_s']:.2f}s")
        if learner.process.wait(s.timeout_s) != 0 or not last:
            raise DemoError(f"the learner failed in round {round_}; see {learner.log_path}")
        return last

    # --- the run ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Remove a previous run's outputs (the built models stay)."""
        for stale in ("logs", "ppo", *(p.name for p in self.out.glob("round*"))):
            shutil.rmtree(self.out / stale, ignore_errors=True)
        for stale in self.out.glob("feedback.db*"):
            stale.unlink()

    def run(self) -> int:
        s = self.s
        self.clear()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        policy, reward, prompts_file, held_out = self.models()
        rows = self.rows(prompts_file)
        eval_rows = self.rows(held_out if held_out is not None else prompts_file)[: s.eval_prompts]
        self.say("starting the services")
        services = self.start_services(policy, reward)
        times: dict[str, float] = {}
        with _phase(times, "eval_s"):
            before = self.evaluate(services, eval_rows, seed=s.seed * 104729)
        self.rounds.append({"round": 0, **before, **times})
        self.say(f"round 0: {self.verdict(before)}")
        for round_ in range(1, s.rounds + 1):
            times = {}
            start = (round_ - 1) * s.feedback_prompts
            feedback_rows = [rows[(start + i) % len(rows)] for i in range(s.feedback_prompts)]
            with _phase(times, "feedback_s"):
                given = self.collect_feedback(services, feedback_rows, round_)
            self.say(f"round {round_}: {given} judgements from the rater; training the reward model")
            with _phase(times, "reward_model_s"):
                rm = self.train_reward_model(services, reward, self.out / f"round{round_}")
            self.say(f"  reward model: held-out accuracy {rm['held_out_accuracy']:.2f} on {rm['held_out_pairs']} "
                     f"pairs; reloaded")
            with _phase(times, "ppo_s"):
                last = self.ppo(services, policy, prompts_file, round_)
            with _phase(times, "eval_s"):
                after = self.evaluate(services, eval_rows, seed=s.seed * 104729)
            self.say(f"round {round_}: {self.verdict(after)}")
            self.rounds.append({"round": round_, "judgements": given, "rm_accuracy": rm["held_out_accuracy"],
                                **({"kl": last["objective/kl"]} if "objective/kl" in last else {}), **after, **times})
        self.report(time.perf_counter() - started)
        return 0

    def rows(self, path: Path) -> list[tuple[str | list[dict[str, str]], str | None]]:
        """(prompt, reference answer) of each row of a prompts file, read as the learner reads it: the
        arithmetic problems' chat messages and answers, or the tiny prompts' text."""
        from rlhf_mesh.services.learner.data import PromptDataset

        dataset = PromptDataset.load(path, messages_field="messages" if self.real else None,
                                     reference_field="answer" if self.real else None)
        return list(zip(dataset.prompts, dataset.references, strict=True))

    def verdict(self, evaluation: dict[str, float]) -> str:
        if self.real:
            return (f"{evaluation['accuracy']:.1%} of the {self.s.eval_prompts} held-out problems answered right "
                    f"(greedy)")
        return f"the rater likes {evaluation['polite_rate']:.0%} of fresh samples"

    def report(self, seconds: float) -> None:
        measure = [("accuracy", "held-out accuracy", "{:.1%}")] if self.real else [
            ("polite_rate", "rater likes", "{:.0%}"), ("polite_words", "polite words/resp", "{:.2f}")]
        columns = [("round", "round", "{:.0f}"), ("judgements", "judgements", "{:.0f}"),
                   ("rm_accuracy", "RM held-out acc", "{:.2f}"), *measure,
                   ("reward_mean", "reward (that RM)", "{:+.3f}"),
                   ("kl", "KL to reference", "{:.3f}"), ("feedback_s", "feedback s", "{:.1f}"),
                   ("reward_model_s", "train-rm s", "{:.1f}"), ("ppo_s", "PPO s", "{:.1f}"),
                   ("eval_s", "eval s", "{:.1f}")]
        rows = [[title for _, title, _ in columns]]
        rows += [[fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns] for r in self.rounds]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        table = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
        (self.out / "summary.txt").write_text(table + "\n")
        (self.out / "rounds.json").write_text(json.dumps(self.rounds, indent=1) + "\n")
        plot = self.plot()
        first, last = self.rounds[0], self.rounds[-1]
        outcome = (f"held-out accuracy {first['accuracy']:.1%} before RLHF and {last['accuracy']:.1%}" if self.real
                   else f"the rater liked {first['polite_rate']:.0%} of fresh samples before RLHF and "
                   f"{last['polite_rate']:.0%}")
        self.say(f"\n{table}\n\n{outcome} after {self.s.rounds} rounds ({seconds / 60:.1f} min)")
        self.say(f"plot: {plot}\ntensorboard: {self.out / 'ppo' / 'tensorboard'}\n"
                 f"checkpoints: {self.out / 'ppo' / 'checkpoints'}\nlogs: {self.out / 'logs'}")

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        history = json.loads((self.out / "ppo" / "history.json").read_text())
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        rounds = [r["round"] for r in self.rounds]
        key, label = self.metric
        axes[0].plot(rounds, [r[key] for r in self.rounds], marker="o")
        axes[0].set(title=label, xlabel="round", ylim=(0, 1), xticks=rounds)
        history = [h for h in history if h["step"] >= 1]
        steps = [h["step"] for h in history]
        axes[1].plot(steps, [h["charts/reward_mean"] for h in history], marker=".")
        axes[1].set(title="PPO reward (math + RM)" if self.real else "PPO reward (current RM)", xlabel="step")
        third = "objective/kl" if all("objective/kl" in h for h in history) else "charts/response_length"
        axes[2].plot(steps, [h[third] for h in history], marker=".")
        axes[2].set(title="KL to reference" if third == "objective/kl" else "response length (tokens)",
                    xlabel="step")
        for ax in axes:
            ax.grid(alpha=0.3)
        for boundary in range(1, self.s.rounds):
            for ax in axes[1:]:
                ax.axvline(boundary * self.s.steps + 0.5, color="grey", linestyle=":")
        fig.tight_layout()
        path = self.out / "demo.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    import grpc

    from rlhf_mesh.settings import SettingsError, load_settings

    try:
        settings = load_settings(DemoSettings, argv, "rlhf-mesh demo")
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The console is for the loop's story: no download-style progress bars or load reports.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    demo = Demo(settings)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: every process goes too
    try:
        return demo.run()
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:  # a service refused or failed a call
        print(f"error: {err.code().name}: {err.details()}; the services' logs are in {demo.out / 'logs'}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopping the services", file=sys.stderr)
        return 130
    finally:
        demo.processes.stop_all()
