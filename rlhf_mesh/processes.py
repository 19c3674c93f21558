"""Server processes started by the demo, the tests and the benchmarks, and the ports they take.

Each child runs in its own process group (vLLM's engine processes and a reward server's
function workers go with it), writes to its own log, and is stopped as a container is:
SIGTERM (the server drains), then SIGKILL to the whole group after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "localhost") -> int:
    """A TCP port nothing listens on right now (for child servers and collective groups)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ChildProcess:
    """`args --port PORT` in its own process group, its output appended to `log_path` (or dropped)."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path | None = None, *,
                 env: dict[str, str] | None = None, cwd: Path | None = None, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.address = f"localhost:{self.port}"
        self.log_path = log_path
        output = open(log_path, "a") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [*args, "--port", str(self.port)], stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
                env=None if env is None else {**os.environ, **env}, start_new_session=True)
        finally:
            if log_path is not None:
                output.close()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path is not None else ""

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        """Block until its gRPC health reports SERVING; RuntimeError at once if it exits first."""
        from rlhf_mesh.clients.health import wait_until_serving

        wait_until_serving(self.address, timeout_s=timeout_s, alive=self.alive)

    def terminate(self) -> None:
        if self.alive():
            self.process.terminate()

    def kill(self) -> int:
        """kill -9 the process and everything it started, as a container dies with its main process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then after `timeout_s` SIGKILL; the exit code of the process."""
        return stop_all([self], timeout_s)[0]


def stop_all(children: Sequence[ChildProcess], timeout_s: float = 30.0) -> list[int]:
    """SIGTERM to every child at once (they drain side by side), SIGKILL to the groups of those still
    running `timeout_s` later and to whatever any child left behind; their exit codes."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout_s
    codes = []
    for child in children:
        try:
            code = child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        killed = child.kill()
        codes.append(killed if code is None else code)
    return codes
