"""Environments the EnvironmentService tests load as user code (`--environment NAME=environments_for_tests:Class`)."""

from __future__ import annotations

import os
import time

from rlhf_mesh.services.environment.environments import Step


class Chatty:
    """Never done: answers every turn with "Tell me more." (the limits end its episodes)."""

    def reset(self, task: dict) -> str:
        return task["question"]

    def step(self, action: str) -> Step:
        return Step("Tell me more.")


class Faulty:
    """The task's `fault` happens on the first step: raise, hang, kill the worker, or none (done, reward 1)."""

    def reset(self, task: dict) -> str:
        self.fault = task["fault"]
        return "Say something."

    def step(self, action: str) -> Step:
        if self.fault == "raise":
            raise ZeroDivisionError("a secret the caller must not see")
        if self.fault == "hang":
            time.sleep(3600)
        if self.fault == "kill":
            os._exit(3)
        return Step(reward=1.0, done=True)
