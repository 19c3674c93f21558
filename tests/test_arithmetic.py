"""The arithmetic task: right answers, a fixed held-out set no training set contains, rows the
learner reads, and the `math` reward function scoring them."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

from rlhf_mesh import arithmetic
from rlhf_mesh.reward_functions import math
from rlhf_mesh.services.learner.data import PromptDataset


def test_every_answer_is_the_operation_on_the_numbers_in_the_question():
    words = {"sum": "+", "Subtract": "-", "Multiply": "*", "finds": "+", "gets": "+", "gives away": "-",
             "leak out": "-", "boxes": "*", "rows": "*"}
    kinds = Counter()
    for problem in arithmetic.problems(2000, seed=3):
        a, b = map(int, re.findall(r"\d+", problem.question))
        op = next((o for w, o in words.items() if w in problem.question), None) or re.search(
            r"What is \d+ ([-+*]) \d+\?", problem.question).group(1)
        if problem.question.startswith("Subtract"):
            a, b = b, a  # "Subtract b from a"
        assert problem.answer == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0, problem
        kinds[op] += 1
        assert max(a, b) < 1000
    assert min(kinds.values()) > 500  # the three operations, about evenly


def test_the_held_out_set_is_fixed_and_never_trained_on(tmp_path):
    assert arithmetic.held_out() == arithmetic.held_out() and len(arithmetic.held_out()) == 200
    train, held_out = arithmetic.write(tmp_path, train_size=3000)
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [str(p.answer) for p in arithmetic.held_out()]
    questions = {r["messages"][0]["content"] for r in rows}
    trained = [json.loads(line)["messages"][0]["content"] for line in train.read_text().splitlines()]
    assert len(trained) > 2500 and not questions & set(trained)
    dataset = PromptDataset.load(train, "prompt", "messages", 0, "answer")  # as the learner reads it
    assert dataset.prompts[0][0]["role"] == "user" and dataset.references[0] == json.loads(
        train.read_text().splitlines()[0])["answer"]
    # The same problems as the calculator environment's tasks: the question as the prompt says it.
    train_tasks, held_out_tasks = arithmetic.write(tmp_path, train_size=3000, tasks=True)
    tasks = [json.loads(line) for line in held_out_tasks.read_text().splitlines()]
    assert [(t["question"], t["answer"]) for t in tasks] == [(r["messages"][0]["content"], r["answer"]) for r in rows]
    assert len(train_tasks.read_text().splitlines()) == len(trained)


def test_math_accepts_the_answer_however_it_is_written_and_nothing_else():
    problem = arithmetic.problems(1, seed=random.Random(5).randint(0, 99))[0]
    answer = problem.answer
    completions = [f"\\boxed{{{answer}}}", f"So the result is {answer}.", f"{answer + 1}", "I do not know."]
    assert math([problem.question] * 4, completions, [str(answer)] * 4) == [1.0, 1.0, 0.0, 0.0]
