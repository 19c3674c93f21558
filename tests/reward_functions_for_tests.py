"""User reward functions the reward-function tests load by name (`--function NAME=reward_functions_for_tests:fn`),
one for every way a function can go wrong."""

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
