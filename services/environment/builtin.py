"""Built-in environments: `calculator` (tool use) and `retry` (answers with feedback).

Both take a task `{"question": ..., "answer": ...}` and check a final answer with the
RewardService's own reward functions (rlhf_mesh/reward_functions.py): `math` by default, or the
task's `check` (`exact`, `regex`).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import ClassVar

from rlhf_mesh import reward_functions as functions
from rlhf_mesh.services.environment.environments import EnvironmentFailed, Step

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression (+, -, *, /, //, %, ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}
# Hermes' tool-call format: what Qwen's chat templates emit and vLLM's `hermes` parser reads.
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}
_LARGEST = 10**18


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression, without eval: numbers, + - * / // % ** and
    parentheses; ValueError for anything else, or a value or power too large."""
    if len(expression) > 200:
        raise ValueError("the expression is longer than 200 characters")

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value,
                                                                                                      bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
                raise ValueError("the power is too large")
            result = _OPERATORS[type(node.op)](left, right)
            if abs(result) > _LARGEST:
                raise ValueError("the value is too large")
            return result
        raise ValueError(f"{ast.unparse(node)!r} is not arithmetic")

    try:
        return value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError) as err:
        raise ValueError(str(err)) from None


def _correct(task: dict, answer: str) -> bool:
    check = functions.load(task.get("check", "math"))
    return check([task["question"]], [answer], reference=[str(task["answer"])]) == [1.0]


def _task(task: dict) -> dict:
    """The task, or EnvironmentFailed saying what it lacks (the caller sees the message)."""
    if not isinstance(task.get("question"), str) or not isinstance(task.get("answer"), str | int | float):
        raise EnvironmentFailed("the task needs a string 'question' and an 'answer' (string or number)")
    if task.get("check", "math") not in ("math", "exact", "regex"):
        raise EnvironmentFailed("the task's 'check' is one of math, exact, regex")
    return task


class Calculator:
    """Arithmetic with a calculator tool. Each turn either calls the tool (a `<tool_call>` with
    `{"name": "calculator", "arguments": {"expression": ...}}`; the result comes back as a tool
    message) or answers: reward 1.0 when the answer is right, else 0.0, and the episode ends."""

    tools: ClassVar[list[dict]] = [CALCULATOR_TOOL]
    SYSTEM = ("You can use a calculator. To call it, write <tool_call>{\"name\": \"calculator\", \"arguments\": "
              "{\"expression\": \"12 * 7\"}}</tool_call> and stop; its result comes back to you. When you know "
              "the answer, give it as a number in \\boxed{}.")

    def reset(self, task: dict) -> list[dict[str, str]]:
        self.task = _task(task)
        return [{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": task["question"]}]

    def step(self, action: str) -> Step:
        calls = TOOL_CALL.findall(action)
        if not calls:
            return Step(reward=float(_correct(self.task, action)), done=True)
        results = []
        for call in calls:
            try:
                request = json.loads(call)
                if request.get("name") != "calculator":
                    raise ValueError(f"no tool {request.get('name')!r}: the tool is calculator")
                results.append(str(evaluate(str(request["arguments"]["expression"]))))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                results.append(f"error: {err}")
        return Step([{"role": "tool", "content": result} for result in results], tool_calls=len(calls))


class Retry:
    """A question answered in up to `attempts` tries (task key, default 3). A wrong answer gets
    "Wrong, try again." and no reward; a right one ends the episode with `discount ** (tries - 1)`
    (task key, default 0.5): 1.0 at the first try, less for each retry, 0 if never right."""

    def reset(self, task: dict) -> list[dict[str, str]]:
        self.task, self.tries = _task(task), 0
        return [{"role": "user", "content": task["question"]}]

    def step(self, action: str) -> Step:
        self.tries += 1
        if _correct(self.task, action):
            return Step(reward=float(self.task.get("discount", 0.5)) ** (self.tries - 1), done=True)
        if self.tries >= int(self.task.get("attempts", 3)):
            return Step(reward=0.0, done=True)
        return Step("Wrong, try again.")
