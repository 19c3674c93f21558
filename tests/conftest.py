"""Shared fixtures: child servers and the tiny models built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import ChildServer

# vLLM on CPU: the default KV-cache reservation does not fit NUMA node 0 of these machines.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture
def child_server(tmp_path: Path) -> Iterator[Callable[..., ChildServer]]:
    """Start server processes (args without --port/--metrics-port); all are stopped after the test."""
    started: list[ChildServer] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> ChildServer:
        server = ChildServer(args, tmp_path / f"server{len(started)}.log", env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny policy and reward model, built once per test session with seed 0."""
    from rlhf_mesh.tiny_models import build

    return build(tmp_path_factory.mktemp("models"), seed=0)
