"""What the benchmarks share: free ports and server processes that wait until they serve."""

from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_mesh.processes import ChildProcess, free_port

__all__ = ["add_policy_arguments", "free_port", "peak_mib", "policy_folder", "scrape_metric", "server",
           "server_process", "vllm_kv_cache_flag", "wait_http"]


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --preset, --dtype and --repeats, as the generation benchmarks take them."""
    parser.add_argument("--model", help="policy folder (default: build the --preset policy)")
    parser.add_argument("--preset", default="small", help="tiny (0.5M, overhead-bound) or small (20M)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)


def policy_folder(args: argparse.Namespace) -> str:
    """--model, or the --preset policy built in a temporary folder (its chat template included)."""
    if args.model is not None:
        return args.model
    from rlhf_mesh.tiny_models import build

    return str(build(Path(tempfile.mkdtemp()) / "models", preset=args.preset)["policy"])


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
    child = ChildProcess(Path(args[0]).name, args)
    try:
        if ready is None:
            child.wait_serving()
        else:
            ready(child.address, child.alive)
        yield child.address, child.process
    finally:
        child.stop(60)


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


def scrape_metric(port: int, name: str) -> float:
    """The value of an unlabelled metric on the Prometheus endpoint at localhost:`port`."""
    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10).read().decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"{name} ")))


def peak_mib(device: str) -> float:
    """This process's peak memory in MiB: the most torch allocated on CUDA, the peak RSS on CPU."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
