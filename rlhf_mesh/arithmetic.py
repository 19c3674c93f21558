"""A real task with reference answers: arithmetic word problems (addition and subtraction of
1-3 digit numbers, multiplication of one by a factor of 2-19, each phrased four ways), scored by
the RewardService's `math` function (math-verify) against each problem's answer.

`problems(count, seed)` is a pure function of its arguments; the held-out set is
`problems(HELD_OUT_SIZE, HELD_OUT_SEED)` and never overlaps a training set (`write` drops every
training problem whose text is held out). Rows are chat messages (`messages`) with the answer
(`answer`), as the learner reads them with `messages_field: messages` and `reference_field: answer`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_SEED, HELD_OUT_SIZE = 20261206, 200
INSTRUCTION = "Give the final answer as a number in \\boxed{}."

# (operator, phrasings): {a} and {b} are the operands, {name} someone; an answer of a - b is never negative.
PHRASINGS = {
    "+": (
        "What is {a} + {b}?",
        "Compute the sum of {a} and {b}.",
        "{name} has {a} marbles and finds {b} more. How many marbles does {name} have now?",
        "A library gets {a} books on Monday and {b} books on Tuesday. How many books does it get in all?",
    ),
    "-": (
        "What is {a} - {b}?",
        "Subtract {b} from {a}.",
        "{name} has {a} stickers and gives away {b}. How many stickers are left?",
        "A tank holds {a} litres of water. {b} litres leak out. How many litres are still in the tank?",
    ),
    "*": (
        "What is {a} * {b}?",
        "Multiply {a} by {b}.",
        "{name} buys {a} boxes with {b} pencils in each. How many pencils is that?",
        "A garden has {a} rows of {b} plants. How many plants are in the garden?",
    ),
}
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int

    def row(self) -> dict:
        """The problem as the learner's prompt file holds it."""
        return {"messages": [{"role": "user", "content": f"{self.question} {INSTRUCTION}"}],
                "answer": str(self.answer)}

    def task(self) -> dict:
        """The problem as a task of the `calculator` environment (its system message explains the tool)."""
        return {"question": f"{self.question} {INSTRUCTION}", "answer": str(self.answer)}


def _operand(rng: random.Random) -> int:
    digits = rng.choice((1, 2, 3))
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def problem(rng: random.Random) -> Problem:
    op = rng.choice(tuple(PHRASINGS))
    a, b = _operand(rng), _operand(rng)
    if op == "-" and a < b:
        a, b = b, a
    if op == "*":  # one factor of one or two digits keeps products a small model can learn
        b = rng.randint(2, 19)
    text = rng.choice(PHRASINGS[op]).format(a=a, b=b, name=rng.choice(NAMES))
    return Problem(text, {"+": a + b, "-": a - b, "*": a * b}[op])


def problems(count: int, seed: int) -> list[Problem]:
    """`count` problems drawn with `seed`: the same arguments give the same problems."""
    rng = random.Random(seed)
    return [problem(rng) for _ in range(count)]


def held_out() -> list[Problem]:
    return problems(HELD_OUT_SIZE, HELD_OUT_SEED)


def write(out_dir: str | Path, train_size: int = 5000, seed: int = 0, tasks: bool = False) -> tuple[Path, Path]:
    """`train.jsonl` (without any held-out question) and `held_out.jsonl` under `out_dir`: prompts
    with their answers, or with `tasks` the `calculator` environment's tasks (`*_tasks.jsonl`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluation = held_out()
    seen = {p.question for p in evaluation}
    train = [p for p in problems(train_size, seed) if p.question not in seen]
    suffix = "_tasks" if tasks else ""
    paths = out / f"train{suffix}.jsonl", out / f"held_out{suffix}.jsonl"
    for path, rows in zip(paths, (train, evaluation), strict=True):
        path.write_text("".join(json.dumps(p.task() if tasks else p.row()) + "\n" for p in rows))
    return paths
