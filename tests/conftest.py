"""Shared fixtures: child servers and the tiny models built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rlhf_mesh.clients.generation import GenerationClient

from support import ChildServer, start_generation_server

# `make test` runs the tests in parallel workers (pytest-xdist). vLLM binds every CPU engine to
# the same core by default: each worker's engines get a core of their own instead. And each
# worker, with the processes it starts, computes on one thread: OpenMP threads that outnumber
# the cores spin against each other.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    cores = sorted(os.sched_getaffinity(0))  # the cores this machine lets the tests use
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cores[int(worker.removeprefix("gw")) % len(cores)]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def tools_policy(tiny_models, tmp_path_factory) -> Path:
    """The tiny policy with a chat template that renders tools, tool calls and tool results (Hermes-style)."""
    import shutil

    from rlhf_mesh.tiny_models import TOOLS_CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("tools") / "policy"
    shutil.copytree(tiny_models["policy"], folder)
    (folder / "chat_template.jinja").write_text(TOOLS_CHAT_TEMPLATE)
    return folder


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


# The longest modules (measured on 2 cores, longest first) are handed out first, so that the
# parallel workers (`make test`) finish together instead of one running a long module alone.
LONGEST_FIRST = ("test_learner.py", "test_architectures.py", "test_fuzz.py", "test_demo.py", "test_learner_parts.py",
                 "test_reliability.py", "test_weight_updates.py", "test_checkpoints.py", "test_environment_service.py",
                 "test_agent_sessions.py", "test_real_model.py", "test_reward_service.py", "test_http_ports.py",
                 "test_reward_functions.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order stays
