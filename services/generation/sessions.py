"""Sessions of the OpenAI-compatible port: every call of a named session, recorded token-exact.

A session holds branches (trajectories). A branch is the token ids the model saw, in order, with
a loss mask (1 = sampled here), the sampler's log-prob and policy version of each sampled token,
and its calls. A call's messages are matched against the history of every recorded call (its
messages plus the assistant message it returned):
- They continue the newest call of a branch (the usual agent loop): the prompt is the branch's
  ids, an end-of-message token where the sample did not end with one (mask 0), then the new
  messages rendered on their own (rlhf_mesh/chat_tokens.py); earlier sampled tokens are never
  re-tokenized, and the branch grows.
- They continue an earlier call, or another choice of a call with n > 1: a new branch that shares
  the prefix up to that call (`forked_from`).
- They continue nothing (the agent rewrote its history): a new branch from a fresh render of the
  messages, counted as a fork (`rewritten`).
Sessions are bounded (count, tokens, idle time); a weight push does not end them (each token has
its version). They end when closed with a reward and taken, dropped, or idle for session_idle_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge

from rlhf_mesh.v1 import common_pb2, environment_pb2

SESSION_ID = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: it is logged and sent back
SESSIONS = Gauge("rlhf_mesh_generation_sessions", "Sessions held, by state.", ["state"])
SESSION_TOKENS = Gauge("rlhf_mesh_generation_session_tokens", "Tokens held by all sessions' branches.")


class SessionError(ValueError):
    """A call or reward the sessions refuse; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _position(items: list, item: Any) -> int:
    """Where `item` itself is in `items` (equal branches or calls are not the same one)."""
    return next(i for i, other in enumerate(items) if other is item)


def message_key(message: dict[str, Any]) -> tuple:
    """What two chat messages must share to be the same message: role, text, tool calls (their
    arguments as JSON values), tool_call_id and name; ids of tool calls and empty fields aside."""
    content = message.get("content")
    if isinstance(content, list):  # content parts: their text
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        calls.append((function.get("name"), json.dumps(arguments, sort_keys=True)))
    return (message.get("role"), content or "", tuple(calls), message.get("tool_call_id") or "",
            message.get("name") or "")


@dataclass
class Call:
    """One choice of one call, as a branch recorded it."""

    id: str  # the response's id
    choice: int
    history: tuple  # message keys of the call's messages and the reply it returned (a completion: its ids)
    start: int  # where the ids this call added begin (its prompt's new part)
    sampled_start: int
    sampled_end: int
    finish_reason: str
    text: str  # what the choice's message said (its content)
    reward: float | None = None


@dataclass
class Branch:
    """One trajectory of a session: every token in order, and the calls that made it."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    prompt_length: int = 0
    forked_from: tuple[int, int] | None = None  # (branch, call) whose prefix it shares
    rewritten: bool = False  # began from a fresh render although the session had calls
    messages: list[dict[str, Any]] = field(default_factory=list)  # its newest call's messages and reply

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None = None,
            versions: Sequence[int] | None = None) -> None:
        """Append prompt ids (mask 0), or sampled ids with their log-probs and versions."""
        self.token_ids += ids
        sampled = logprobs is not None
        self.loss_mask += [int(sampled)] * len(ids)
        self.logprobs += logprobs if sampled else [0.0] * len(ids)
        self.versions += versions if sampled else [0] * len(ids)

    def prefix(self, length: int) -> Branch:
        """A new branch holding this one's first `length` tokens (and the calls inside them)."""
        return Branch(self.token_ids[:length], self.loss_mask[:length], self.logprobs[:length],
                      self.versions[:length], [c for c in self.calls if c.sampled_end <= length], self.prompt_length,
                      messages=self.messages)


@dataclass
class Session:
    id: str
    branches: list[Branch] = field(default_factory=list)
    used: float = field(default_factory=time.monotonic)
    closed: bool = False
    reward: float | None = None
    forks: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)  # what OpenSession imposes on every call
    samples: int = 0  # samples drawn so far (the k of a seeded session's k-th sample)

    @property
    def tokens(self) -> int:
        return sum(len(b.token_ids) for b in self.branches)


@dataclass
class CallPlan:
    """Where a call's samples go: its prompt ids, and the call it continues (None: a fresh render)."""

    session: Session
    prompt_ids: list[int]
    history: tuple  # the call's keys
    messages: list[dict[str, Any]]  # the call's messages (none for a completion)
    parent: tuple[Branch, Call] | None
    base_length: int  # parent branch ids the prompt starts with
    extends: bool  # the parent call is its branch's newest: choice 0 grows that branch
    opened: bool = False  # the call opened the session


@dataclass
class Choice:
    """One sampled choice of a call, for `record`."""

    history: tuple  # what a call continuing it repeats after the call's keys: the reply's message_key, or
    # a completion's ids
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    text: str
    message: dict[str, Any] | None = None  # the reply as a chat message (none for a completion)


class Sessions:
    """Every session of one GenerationService, bounded by count, tokens and idle time."""

    def __init__(self, max_sessions: int, max_session_tokens: int, idle_s: float, max_total_tokens: int) -> None:
        self.max_sessions, self.max_session_tokens, self.idle_s = max_sessions, max_session_tokens, idle_s
        self.max_total_tokens = max_total_tokens
        self.total_tokens = 0  # over every held session, as of the last change
        self._sessions: dict[str, Session] = {}
        self._closed = asyncio.Event()  # set when a session closes (TakeSessions waits on it)

    def held(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def get(self, session_id: str) -> Session:
        self._expire()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(404, f"no session {session_id!r} (never opened, taken, dropped or expired)")
        return session

    def open(self, session_id: str, sampling: dict[str, Any]) -> Session:
        """A new session whose calls are sampled with `sampling` (temperature, top_p, top_k,
        max_tokens as a cap, seed) whatever they ask."""
        self._expire()
        if session_id in self._sessions:
            raise SessionError(409, f"session {session_id!r} is held already")
        self._room()
        session = self._sessions[session_id] = Session(session_id, sampling=sampling)
        self._count()
        return session

    def _room(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise SessionError(429, f"{len(self._sessions)} sessions are held, max_sessions={self.max_sessions}; "
                                    "close or drop some, or retry later")

    def plan(self, session_id: str, keys: tuple, fresh: list[int], follow: Callable[[int], list[int]],
             n: int, max_new_tokens: int, eos_ids: set[int], end_of_message: int | None,
             messages: list[dict[str, Any]] = ()) -> CallPlan:
        """The prompt of a call in session `session_id` (opened by its first call). `keys` are its
        messages' `message_key`s (or, for a completion, its prompt ids); `fresh` its prompt
        rendered afresh; `follow(k)` the ids of what follows the first k keys, after an
        end-of-message token (`end_of_message`, added where a sample did not end with one of
        `eos_ids`; None: nothing is added). Its `n` samples add up to `max_new_tokens` each."""
        self._expire()
        session = self._sessions.get(session_id)
        opens = session is None  # held only once the call passes the bounds
        if opens:
            self._room()
            session = Session(session_id)
        if session.closed:
            raise SessionError(400, f"session {session_id!r} is closed; name a new session")
        session.used = time.monotonic()
        parent = self._parent(session, keys)
        if parent is None:
            ids, base_length, extends = fresh, 0, False
        else:
            branch, call = parent
            ids = branch.token_ids[:call.sampled_end]
            if end_of_message is not None and (call.sampled_end == call.sampled_start
                                               or ids[-1] not in eos_ids):
                ids = [*ids, end_of_message]
            ids = [*ids, *follow(len(call.history))]
            base_length, extends = call.sampled_end, call is branch.calls[-1]
        # The first sample grows the branch it extends; every other one is a branch of its own.
        added = (len(ids) + max_new_tokens) * n - base_length * extends
        if session.tokens + added > self.max_session_tokens:
            raise SessionError(400, f"session {session_id!r} holds {session.tokens} tokens; this call's "
                                    f"{n} x ({len(ids)} prompt tokens and up to {max_new_tokens} sampled ones) "
                                    f"exceed max_session_tokens={self.max_session_tokens}; close it and open a "
                                    "new one")
        if self.total_tokens + added > self.max_total_tokens:
            raise SessionError(429, f"sessions hold {self.total_tokens} tokens; this call's {added} would exceed "
                                    f"max_total_session_tokens={self.max_total_tokens}; retry when some are taken")
        if opens:
            self._sessions[session_id] = session
        self._count()
        return CallPlan(session, ids, keys, list(messages), parent, base_length, extends, opened=opens)

    @staticmethod
    def _parent(session: Session, keys: tuple) -> tuple[Branch, Call] | None:
        """The recorded call with the longest history the messages continue (newest first on ties)."""
        best: tuple[Branch, Call] | None = None
        for branch in reversed(session.branches):
            for call in reversed(branch.calls):
                history = call.history
                if len(history) < len(keys) and keys[:len(history)] == history and (
                        best is None or len(history) > len(best[1].history)):
                    best = branch, call
        return best

    def abandon(self, plan: CallPlan) -> None:
        """A planned call that will not run: the session it opened goes if it holds nothing yet."""
        if plan.opened and not plan.session.branches and self._sessions.get(plan.session.id) is plan.session:
            del self._sessions[plan.session.id]
            self._count()

    def record(self, plan: CallPlan, call_id: str, choices: list[Choice]) -> None:
        """Add a finished call's choices to its session."""
        session = plan.session
        if self._sessions.get(session.id) is not session or session.closed:
            return  # dropped, expired or closed while the call ran: nothing to add to
        session.used = time.monotonic()
        earlier = len(session.branches)  # what the session held before this call
        for index, choice in enumerate(choices):
            branch = self._branch_for(session, plan, grow=index == 0, earlier=earlier)
            start = len(branch.token_ids)
            branch.add(plan.prompt_ids[start:])
            if not branch.prompt_length:
                branch.prompt_length = len(branch.token_ids)
            sampled_start = len(branch.token_ids)
            branch.add(choice.token_ids, choice.logprobs, choice.versions)
            branch.calls.append(Call(call_id, index, (*plan.history, *choice.history), start, sampled_start,
                                     len(branch.token_ids), choice.finish_reason, choice.text))
            if choice.message is not None:
                branch.messages = [*plan.messages, choice.message]
        self._count()

    @staticmethod
    def _branch_for(session: Session, plan: CallPlan, grow: bool, earlier: int) -> Branch:
        if plan.parent is None:  # a fresh render: after earlier calls, the agent rewrote its history
            branch = Branch(rewritten=earlier > 0)
            session.forks += earlier > 0
        else:
            parent, call = plan.parent
            # Grown only if no other call grew it meanwhile (two calls at once on one branch).
            if grow and plan.extends and len(parent.token_ids) == plan.base_length:
                return parent
            branch = parent.prefix(plan.base_length)
            branch.forked_from = (_position(session.branches, parent), _position(parent.calls, call))
            session.forks += 1
        session.branches.append(branch)
        return branch

    def take_one(self, session_id: str) -> Session:
        """The session, no longer held."""
        session = self.get(session_id)
        del self._sessions[session_id]
        self._count()
        return session

    def reward(self, session_id: str, reward: float, call_id: str | None, close: bool) -> Session:
        """Attach `reward` to the session (or to every choice of call `call_id`), and close it."""
        session = self.get(session_id)
        if session.closed:
            raise SessionError(400, f"session {session_id!r} is closed already")
        if call_id is None:
            session.reward = reward
        else:
            calls = [c for b in session.branches for c in b.calls if c.id == call_id]
            if not calls:
                raise SessionError(404, f"session {session_id!r} has no call {call_id!r}")
            for call in calls:
                call.reward = reward
        session.closed = session.closed or close
        if session.closed:
            self._closed.set()
        session.used = time.monotonic()
        self._count()
        return session

    def drop(self, session_id: str) -> None:
        self.take_one(session_id)

    def take(self, limit: int) -> list[Session]:
        """Up to `limit` closed sessions, oldest first; they are no longer held."""
        self._expire()
        taken = [s for s in self._sessions.values() if s.closed][:limit]
        for session in taken:
            del self._sessions[session.id]
        self._count()
        return taken

    async def wait_taken(self, limit: int, wait_s: float) -> list[Session]:
        """`take`, waiting up to `wait_s` for a session to close when none is."""
        deadline = time.monotonic() + wait_s
        while not (taken := self.take(limit)) and (left := deadline - time.monotonic()) > 0:
            self._closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), left)
        return taken

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        for session_id in [k for k, s in self._sessions.items() if s.used < cutoff]:
            del self._sessions[session_id]

    def _count(self) -> None:
        closed = sum(s.closed for s in self._sessions.values())
        SESSIONS.labels("open").set(len(self._sessions) - closed)
        SESSIONS.labels("closed").set(closed)
        self.total_tokens = sum(s.tokens for s in self._sessions.values())
        SESSION_TOKENS.set(self.total_tokens)


def describe(session: Session) -> dict[str, Any]:
    """A session as JSON: its state and every branch, token by token."""
    return {
        "id": session.id, "closed": session.closed, "reward": session.reward, "forks": session.forks,
        "branches": [{
            "token_ids": b.token_ids, "loss_mask": b.loss_mask, "logprobs": b.logprobs,
            "policy_versions": b.versions, "prompt_length": b.prompt_length,
            "forked_from": None if b.forked_from is None else {"branch": b.forked_from[0], "call": b.forked_from[1]},
            "rewritten": b.rewritten,
            "calls": [{"id": c.id, "choice": c.choice, "start": c.start, "sampled_start": c.sampled_start,
                       "sampled_end": c.sampled_end, "finish_reason": c.finish_reason, "reward": c.reward}
                      for c in b.calls],
        } for b in session.branches],
    }


def _text(message: dict[str, Any]) -> str:
    """A message's text for display and scoring; an assistant's tool calls as their JSON."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    calls = [c.get("function") for c in message.get("tool_calls") or ()]
    return (content or "") + (json.dumps(calls) if calls else "")


def episodes(session: Session) -> list[environment_pb2.Episode]:
    """Each branch of a session as an episode: the calls are its turns, its messages those of its
    newest call. Its reward (and environment_reward) is the session's, or, where only calls were
    rewarded, the sum of its calls' rewards; unrewarded, it has no environment_reward."""
    found = []
    for index, branch in enumerate(session.branches):
        episode = environment_pb2.Episode(
            episode_index=index, token_ids=branch.token_ids, prompt_length=branch.prompt_length,
            loss_mask=branch.loss_mask, logprobs=branch.logprobs, policy_versions=branch.versions,
            end=environment_pb2.EPISODE_END_DONE)
        for i, call in enumerate(branch.calls):
            following = branch.calls[i + 1].start if i + 1 < len(branch.calls) else len(branch.token_ids)
            turn = episode.turns.add(start=call.sampled_start, sampled_end=call.sampled_end, end=following,
                                     text=call.text, truncated=call.finish_reason == "length")
            if call.reward is not None:
                turn.reward = call.reward
        rewards = [c.reward for c in branch.calls if c.reward is not None]
        if session.reward is not None or rewards:
            episode.environment_reward = session.reward if session.reward is not None else sum(rewards)
        episode.reward = episode.environment_reward
        episode.messages.extend(common_pb2.ChatMessage(role=m.get("role", ""), content=_text(m))
                                for m in branch.messages)
        found.append(episode)
    return found
