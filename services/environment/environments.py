"""The environment protocol, its loader, and the entry points the worker processes run.

An environment is a class with a no-argument constructor:

    class Guess:
        tools: list[dict] = []                          # OpenAI function specs it exposes (optional)

        def reset(self, task: dict) -> list[dict] | str:
            ...                                         # the first messages (or one user message)

        def step(self, action: str) -> Step:
            ...                                         # the model's turn, as text -> what follows

`Step(observation, reward, done, tool_calls)`: the messages that answer the turn (a string is
one user message; role "tool" for tool output), the turn's reward or None, whether the episode
is over, and how many tool calls the turn made. The episode's environment reward is the sum of
its turns' rewards (None when no turn gave one). An instance lives for one episode; between
calls it is pickled, so the server holds its state as bytes and never imports user code.

An environment may instead be an agent program, a function that runs its own loop against an
OpenAI-compatible API (the `openai` SDK, tools, any framework), unchanged:

    def solve(task: dict, base_url: str, session_id: str) -> float | None:
        client = openai.OpenAI()                        # OPENAI_BASE_URL and OPENAI_API_KEY are set
        ...                                             # its calls, recorded token-exact
        return reward                                   # or None: the reward_model's score, or 0

`base_url` is a replica's port under the episode's own session (`.../sessions/<id>/v1`), so every
call it makes lands in that session; the session's main branch becomes the episode.

Both run in the worker pool of rlhf_mesh/worker_pool.py (the RewardService's too): a raise, a
hang past the timeout (an agent's whole run) or a killed worker ends its episode alone.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, Protocol

from rlhf_mesh.user_code import resolve
from rlhf_mesh.worker_pool import FunctionFailed, is_score, loaded


@dataclass
class Step:
    """What an environment answers to one model turn."""

    observation: list[dict[str, str]] | str = ""
    reward: float | None = None
    done: bool = False
    tool_calls: int = 0


class Environment(Protocol):
    tools: list[dict]

    def reset(self, task: dict) -> list[dict[str, str]] | str: ...

    def step(self, action: str) -> Step: ...


class EnvironmentFailed(FunctionFailed):
    """An environment answered something that is not the protocol's; the message says what."""


def builtin() -> dict[str, type]:
    from rlhf_mesh.services.environment import builtin as library

    return {"calculator": library.Calculator, "retry": library.Retry}


def load(spec: str) -> Any:
    """The class or agent function a spec names: a built-in's name, or `package.module:attribute`."""
    found = resolve(spec, builtin(), "environment", "Class")
    if inspect.isfunction(found):
        return found
    if not isinstance(found, type) or not callable(getattr(found, "reset", None)) or not callable(
            getattr(found, "step", None)):
        module, _, attribute = spec.partition(":")
        raise ValueError(f"environment {spec!r}: {module} has no class {attribute!r} with reset() and step(), "
                         "nor an agent function")
    return found


def _messages(observation: Any, what: str) -> list[dict[str, str]]:
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}] if observation else []
    if not isinstance(observation, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in observation):
        raise EnvironmentFailed(f"{what} must be a string or a list of {{role, content}} messages, "
                                f"not {type(observation).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in observation]


# --- in the worker processes (through FunctionPool.run) -----------------------------------------

def is_agent_in_worker(spec: str) -> bool:
    """Whether the spec names an agent program (a function) rather than an environment class."""
    return inspect.isfunction(loaded(spec))


def agent_in_worker(spec: str, task: dict, base_url: str, api_key: str, session_id: str,
                    ca_file: str | None) -> float | None:
    """One run of an agent program on the session under `base_url`; its reward."""
    settings = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": api_key or "none"}
    if ca_file:  # the replicas' CA, for https
        settings["SSL_CERT_FILE"] = ca_file
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        reward = loaded(spec)(task, base_url, session_id)
    finally:  # the worker runs other episodes and environments next: as it was
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if not is_score(reward):
        raise EnvironmentFailed(f"{spec} returned {reward!r}: a finite number or None is needed")
    return None if reward is None else float(reward)


def tools_in_worker(spec: str) -> list[dict]:
    """The tools the class exposes, as JSON-able OpenAI function specs."""
    tools = getattr(loaded(spec), "tools", None) or []
    try:
        json.dumps(tools)
    except (TypeError, ValueError) as err:
        raise EnvironmentFailed(f"{spec}.tools is not JSON: {err}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise EnvironmentFailed(f"{spec}.tools must be a list of OpenAI function specs (dicts)")
    return tools


def reset_in_worker(spec: str, task: dict) -> tuple[bytes, list[dict[str, str]]]:
    """A new instance reset to `task`: its pickled state and the first messages."""
    environment = loaded(spec)()
    messages = _messages(environment.reset(task), f"{spec} reset()")
    if not messages:
        raise EnvironmentFailed(f"{spec} reset() gave no messages")
    return pickle.dumps(environment), messages


def step_in_worker(spec: str, state: bytes, action: str) -> tuple[bytes, dict[str, Any]]:
    """One step of the pickled instance: its new state and the Step as plain values."""
    environment = pickle.loads(state)  # bytes this pool pickled itself
    step = environment.step(action)
    if not isinstance(step, Step):
        raise EnvironmentFailed(f"{spec} step() returned a {type(step).__name__}, not a Step")
    reward = step.reward
    if not is_score(reward):
        raise EnvironmentFailed(f"{spec} step() gave the reward {reward!r}: a finite number or None is needed")
    if not isinstance(step.tool_calls, int) or isinstance(step.tool_calls, bool) or step.tool_calls < 0:
        raise EnvironmentFailed(f"{spec} step() gave tool_calls={step.tool_calls!r}: a count is needed")
    return pickle.dumps(environment), {
        "observation": [] if step.done else _messages(step.observation, f"{spec} step()'s observation"),
        "reward": None if reward is None else float(reward), "done": bool(step.done), "tool_calls": step.tool_calls}
