"""What a run shows: a progress bar or log lines, TensorBoard and W&B scalars, a PNG plot, a summary."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# The columns of the progress line and the summary table: (scalar, short name).
HEADLINE = (("charts/reward_mean", "reward"), ("objective/kl", "kl"), ("time/step_s", "step_s"))
PLOTTED = ("charts/reward_mean", "objective/kl", "losses/policy_loss", "losses/value_loss", "objective/entropy",
           "losses/approx_kl")


def _headline(scalars: dict[str, float]) -> str:
    return " ".join(f"{short}={scalars[name]:.4g}" for name, short in HEADLINE if name in scalars)


def _markdown_cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


class Reporter:
    """Every step's scalars to TensorBoard (`output_dir/tensorboard`) and W&B, as `report_to` says;
    a tqdm bar on a terminal, one log line per step otherwise.

    The W&B run lives under `output_dir/wandb` and its id in `output_dir/wandb-run-id`, so a
    resumed run goes on in the same W&B run. Offline (`WANDB_MODE=offline`) it needs no
    network; `wandb sync output_dir/wandb/offline-run-*` uploads it later.
    """

    def __init__(self, output_dir: Path, total_steps: int, first_step: int = 0,
                 report_to: Sequence[str] = ("tensorboard",), wandb_project: str = "rlhf-mesh",
                 run_name: str | None = None, config: dict | None = None) -> None:
        self.writer = self.wandb = None
        self.output_dir = output_dir
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            id_file = output_dir / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: W&B picks one
            self.wandb = wandb.init(project=wandb_project, name=run_name, id=run_id, resume="allow",
                                    dir=str(output_dir), config=config)
            id_file.write_text(self.wandb.id)
        self.bar = None
        self.total_steps = total_steps
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc="ppo", unit="step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """The scalars to TensorBoard and W&B."""
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        """Samples people read: appended to output_dir/samples.jsonl, a TensorBoard text table, a W&B table."""
        with (self.output_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        columns = list(rows[0])
        if self.writer is not None:
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            table += ["| " + " | ".join(_markdown_cell(row[c]) for c in columns) + " |" for row in rows]
            self.writer.add_text("samples", "\n".join(table), step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=columns, data=[[json.dumps(row[c]) if isinstance(
                row[c], dict | list) else row[c] for c in columns] for row in rows])}, step=step)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        """A step's scalars logged, and the progress shown."""
        self.log(step, scalars)
        if self.bar is not None:
            self.bar.set_postfix_str(_headline(scalars), refresh=False)
            self.bar.update(1)
        else:
            log.info("step %d/%d %s", step, self.total_steps, _headline(scalars))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot(history: list[dict[str, float]], path: Path) -> Path:
    """One panel per plotted scalar against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PLOTTED if any(n in h for h in history)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        points = [(h["step"], h[name]) for h in history if name in h]
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(history: list[dict[str, float]]) -> str:
    """A table: the first and last step, and the mean step time per phase."""
    history = [h for h in history if h["step"] >= 1]  # not the evaluation before training
    if not history:
        return "no steps ran"
    first, last = history[0], history[-1]
    rows = [("", "first step", "last step")]
    for name, _ in HEADLINE[:2]:
        if name in first or name in last:  # objective/kl: only with a reference (kl_coef > 0)
            rows.append((name, f"{first.get(name, float('nan')):.4f}", f"{last.get(name, float('nan')):.4f}"))
    phases = sorted(k for k in last if k.startswith("time/"))
    for name in phases:
        mean = sum(h.get(name, 0.0) for h in history) / len(history)
        rows.append((f"{name} (mean)", f"{mean:.3f}", ""))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}" for r in rows)


def write_report(history: list[dict[str, float]], out: Path) -> tuple[Path | None, str]:
    """The run's summary table, history.json and plot under `out`; the plot's path and the table."""
    table = summary(history)
    (out / "summary.txt").write_text(table + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return (plot(history, out / "ppo.png") if history else None), table
