"""The learner's one retry policy for calls to the generation replicas and the reward service.

Only what a restarting or draining server produces is retried: UNAVAILABLE, and a call cut by
its deadline or cancelled by the server's shutdown. A refusal (INVALID_ARGUMENT,
FAILED_PRECONDITION, ...) or a server bug (INTERNAL, UNKNOWN) fails the step at once. The
learner's channels retry nothing themselves (`learner_client`): a call is tried `attempts` times in all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc

from rlhf_mesh.services.learner.errors import LearnerError

if TYPE_CHECKING:
    from rlhf_mesh.services.learner.settings import LearnerSettings

log = logging.getLogger("rlhf_mesh.services.learner")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

T = TypeVar("T")
C = TypeVar("C")


def learner_client(cls: type[C], address: str, settings: LearnerSettings) -> C:
    """A client of the learner's: a deadline of rpc_timeout_s on every call, its credentials, and
    no retry policy on the channel (under Retry's it would multiply the attempts)."""
    return cls(address, timeout_s=settings.rpc_timeout_s, retries=False, **settings.credentials())


def failure(err: grpc.RpcError) -> str:
    return f"{err.code().name}: {err.details()}"


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a failed call is tried again."""

    attempts: int = 5
    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def backoff(self, attempt: int) -> float:
        return min(self.first_backoff_s * 2**attempt, self.max_backoff_s)

    async def call(self, attempt: Callable[[int], Awaitable[T]], what: Callable[[int], str]) -> T:
        """`await attempt(k)` for k = 0, 1, ... until it returns; a gRPC error that is not
        RETRYABLE, or the last one, raises LearnerError. `what(k)` names what attempt k called."""
        for k in itertools.count():
            try:
                return await attempt(k)
            except grpc.RpcError as err:
                message = f"{what(k)}: {failure(err)}"
                if err.code() not in RETRYABLE or k + 1 >= self.attempts:
                    raise LearnerError(message) from None
                log.warning("%s; retrying in %.0f s", message, self.backoff(k))
                await asyncio.sleep(self.backoff(k))
        raise AssertionError("unreachable")
