"""What the benchmarks share: free ports and server processes that wait until they serve."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.server import free_port

__all__ = ["free_port", "server", "server_process", "vllm_kv_cache_flag", "wait_http"]


def vllm_kv_cache_flag() -> list[str]:
    """`vllm serve`'s flag for the KV cache size the project's own engines default to."""
    from rlhf_mesh.vllm_memory import kv_cache_memory_bytes

    size = kv_cache_memory_bytes(None)
    return [] if size is None else ["--kv-cache-memory-bytes", str(size)]


@contextmanager
def server_process(args: list[str], ready: Callable[[str, Callable[[], bool]], None] | None = None,
                   ) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `args --port PORT` until the block ends; yields HOST:PORT and the process once `ready`
    (gRPC health by default)."""
    port = free_port()
    process = subprocess.Popen([*args, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its group: the engine processes it starts go with it
    address = f"localhost:{port}"
    try:
        (ready or (lambda a, alive: wait_until_serving(a, timeout_s=300, alive=alive)))(
            address, lambda: process.poll() is None)
        yield address, process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def server(args: list[str], ready: Callable[[str, Callable[[], bool]], None] | None = None) -> Iterator[str]:
    """server_process, yielding only HOST:PORT."""
    with server_process(args, ready) as (address, _):
        yield address


def wait_http(address: str, alive: Callable[[], bool]) -> None:
    """Block until vLLM's OpenAI-compatible server at `address` answers /health (a `ready` for `server`)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and alive():
        try:
            urllib.request.urlopen(f"http://{address}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"vLLM's OpenAI server at {address} did not come up")
