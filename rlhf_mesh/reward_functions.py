"""Reward functions with TRL's calling convention: `fn(prompts, completions, **kwargs) -> list[float | None]`.

`prompts[i]` is the prompt text, or the chat messages before the response (a list of
`{"role", "content"}`); `completions[i]` is the response text. kwargs carry `reference` (each
sample's reference answer, None where it has none) and every metadata key as a list (None
where a sample lacks it); a metadata key may not be one of these argument names (RESERVED).
None means "does not apply" (TRL: a skipped reward).

Built-ins: `math` (math-verify equivalence of the response's answer, from `\\boxed{}` or the
last expression, with the reference), `exact` (the stripped response equals the reference),
`regex` (the reference is a pattern the response must match), `format` (DeepSeek-R1's
`<think>...</think>` then an answer). A user function is `package.module:callable`, named by
the operator at start. They run in worker processes (rlhf_mesh/worker_pool.py); the
EnvironmentService's built-in environments check answers with them too.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rlhf_mesh.user_code import resolve

RewardFunction = Callable[..., list[float | None]]


def math(prompts: list, completions: list[str], reference: list[str | None], **_: object) -> list[float | None]:
    """1.0 when the response's final answer equals the reference mathematically, else 0.0."""
    from math_verify import parse, verify

    scores: list[float | None] = []
    for completion, gold in zip(completions, reference, strict=True):
        if gold is None:
            scores.append(None)
            continue
        # A bare reference ("0.5") is an expression; wrapping it lets LaTeX references parse too.
        expected = parse(gold if "$" in gold or "\\" in gold else f"${gold}$")
        scores.append(1.0 if expected and verify(expected, parse(completion)) else 0.0)
    return scores


def exact(prompts: list, completions: list[str], reference: list[str | None], **_: object) -> list[float | None]:
    """1.0 when the response, stripped, is the reference, else 0.0."""
    return [None if gold is None else float(c.strip() == gold.strip()) for c, gold in zip(completions, reference,
                                                                                           strict=True)]


def regex(prompts: list, completions: list[str], reference: list[str | None], **_: object) -> list[float | None]:
    """1.0 when the reference, a regular expression, matches the response (re.search), else 0.0."""
    return [None if pattern is None else float(re.search(pattern, c) is not None)
            for c, pattern in zip(completions, reference, strict=True)]


_THINK_THEN_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*\S.*$", re.DOTALL)


def format_(prompts: list, completions: list[str], **_: object) -> list[float | None]:
    """1.0 when the response reasons inside `<think>...</think>` and then answers, else 0.0."""
    return [float(_THINK_THEN_ANSWER.match(c) is not None) for c in completions]


BUILTINS: dict[str, RewardFunction] = {"math": math, "exact": exact, "regex": regex, "format": format_}

# Built-ins score each sample alone, so the pool may run them one sample a task; a user
# function gets its call's samples together (TRL passes a batch, and a reward may compare them).
PER_SAMPLE = frozenset(BUILTINS)

# The arguments the server itself passes; a metadata key of one of these names would collide.
RESERVED = frozenset({"prompts", "completions", "reference"})


def load(spec: str) -> RewardFunction:
    """The function a spec names: a built-in's name, or `package.module:callable`."""
    function = resolve(spec, BUILTINS, "reward function", "callable")
    if not callable(function):
        module, _, attribute = spec.partition(":")
        raise ValueError(f"reward function {spec!r}: {module} has no callable {attribute!r}")
    return function
