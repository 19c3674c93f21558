"""Shared fixtures: child servers and the tiny models built once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rlhf_mesh.clients.generation import GenerationClient

from support import ChildServer, start_generation_server


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


@pytest.fixture(scope="module")
def generation_server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                      request: pytest.FixtureRequest) -> Iterator[ChildServer]:
    """A GenerationService on the tiny policy (float32, support.MAX_MODEL_LEN), one per test module;
    a module's GENERATION_SERVER dict overrides start_generation_server's options."""
    server = start_generation_server(tiny_models["policy"], tmp_path_factory.mktemp("generation") / "server.log",
                                     **getattr(request.module, "GENERATION_SERVER", {}))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def generation_client(generation_server: ChildServer) -> Iterator[GenerationClient]:
    with GenerationClient(generation_server.address, timeout_s=120) as client:
        yield client
