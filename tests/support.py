"""Helpers shared by the tests: free ports and server processes."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from rlhf_mesh.server import free_port

__all__ = ["MAX_MODEL_LEN", "PYTHON", "ROOT", "ChildServer", "free_port", "greedy", "metric", "scrape",
           "start_generation_server"]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MAX_MODEL_LEN = 256  # of the test generation servers


class ChildServer:
    """A server process started by a test, with its log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"localhost:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*args, "--port", str(self.port), "--metrics-port", str(self.metrics_port)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 30) -> int:
        if self.alive():
            self.process.terminate()
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


def scrape(server: ChildServer) -> str:
    """The server's Prometheus metrics, as text."""
    return urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric over its label sets that carry `labels`."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith((f"{name}{{", f"{name} ")) and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def start_generation_server(policy: Path, log_path: Path) -> ChildServer:
    """`rlhf-mesh serve generation` on `policy` in float32, once it is SERVING."""
    from rlhf_mesh.clients.health import wait_until_serving

    server = ChildServer(
        [PYTHON, "-m", "rlhf_mesh", "serve", "generation", "--model", str(policy),
         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN)],
        log_path,
    )
    wait_until_serving(server.address, timeout_s=300, alive=server.alive)
    return server


def greedy(model, prompt_ids, steps: int) -> list[int]:
    """`steps` greedy tokens of a transformers causal LM, one full forward per token."""
    import torch

    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]
