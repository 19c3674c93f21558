"""User reward functions the reward-function tests load by name (`--function NAME=reward_functions_for_tests:fn`),
one for every way a function can go wrong, and one a test orders calls with (`waits`)."""

from __future__ import annotations

import os
import time


def length(prompts, completions, **kwargs):
    """A well-behaved user function: a tenth of the response's length."""
    return [len(c) / 10 for c in completions]


def echo_reference(prompts, completions, reference, **kwargs):
    """The reference as the score: shows which reference reached which sample."""
    return [None if r is None else float(r) for r in reference]


def raises(prompts, completions, **kwargs):
    raise RuntimeError("this function always fails")


def hangs(prompts, completions, **kwargs):
    time.sleep(3600)


def kills_its_worker(prompts, completions, **kwargs):
    os._exit(7)


def wrong_count(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def waits(prompts, completions, gate, log, **kwargs):
    """Notes each call in the file `log` (one line of its responses), then waits until the file
    `gate` exists: a test orders the pool's calls with it, never with a clock."""
    with open(log[0], "a") as file:
        file.write(" ".join(completions) + "\n")
    while not os.path.exists(gate[0]):
        time.sleep(0.01)
    return [1.0] * len(completions)


def allocates(prompts, completions, **kwargs):
    """Asks for 1 GiB (calloc'd: no page is touched unless the allocation succeeds)."""
    memory = bytes(1 << 30)
    return [float(len(memory) > 0)] * len(completions)


def all_or_mixed(prompts, completions, **kwargs):
    """Whole groups alike, or mixed: a prompt of a length not divisible by 3 gives every sample its
    length's parity; the others give each sample its response's length parity."""
    return [float(len(p) % 2) if len(p) % 3 else float(len(c) % 2) for p, c in zip(prompts, completions, strict=True)]
