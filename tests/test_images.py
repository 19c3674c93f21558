"""The CPU image, built and run: `make images` builds rlhf-mesh:<version>-cpu (with buildah where
there is no Docker engine); its entry point serves reward, generation and feedback on models
mounted into it, as its non-root user on a read-only root file system (volumes only where
deploy/k8s mounts them), answers from the host, and stops on SIGTERM with exit 0; every command,
flag and config deploy/k8s hands the container is accepted by the image's own CLI.

A process under `buildah run --isolation chroot` shares the host's network, so the host's clients
reach it on loopback. The image is built once (by .ci/run, or here when it is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from transformers import AutoModelForCausalLM

from rlhf_mesh.clients.feedback import FeedbackClient, feedback
from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import RewardClient

from support import PYTHON, ROOT, ChildServer, cli_args, free_port, greedy, rendered_overlay

BUILDAH = shutil.which("buildah")
VERSION = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
               if line.startswith("version = "))
IMAGE = f"localhost/rlhf-mesh:{VERSION}-cpu"
USER_ID = 10001
BUILDAH_ENV = {"BUILDAH_ISOLATION": "chroot"}
# Where deploy/k8s mounts volumes into the rlhf-mesh containers; everything else is read-only.
MOUNT_POINTS = ("/models", "/etc/rlhf-mesh", "/tmp", "/home/rlhf/.cache", "/var/lib/rlhf-mesh", "/dev/shm")
# What `buildah run` binds over the root file system for every command.
BUILDAH_BINDS = {"run", "run/.containerenv", "etc/hosts", "etc/resolv.conf", "etc/hostname"}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    BUILDAH is None or os.geteuid() != 0,
    reason="the image tests need buildah, as root (apt-get install buildah debootstrap; .ci/run installs them)")]


def _buildah(*args: str, check: bool = True, timeout: float = 600) -> str:
    return subprocess.run([BUILDAH, *args], capture_output=True, text=True, check=check, timeout=timeout,
                          env={**os.environ, **BUILDAH_ENV}).stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    if subprocess.run([BUILDAH, "inspect", "--type", "image", IMAGE], capture_output=True,
                      env={**os.environ, **BUILDAH_ENV}).returncode != 0:
        subprocess.run(["bash", str(ROOT / "deploy" / "docker" / "build-images.sh"), "cpu"], check=True,
                       timeout=3600, env={**os.environ, **BUILDAH_ENV, "PYTHON": PYTHON})
    return IMAGE


@dataclass
class Container:
    """A working container of the image: its name, its entry point, and the folder its own writes land
    in (the overlay's upper layer), where nothing may appear but mount points: the root file system
    is as good as read-only, as deploy/k8s runs it (buildah run cannot mount it read-only itself)."""

    name: str
    entrypoint: list[str]
    writes: Path
    mount_points: set[str]

    def written(self) -> set[str]:
        """What the container wrote outside its volumes (buildah's own bind targets aside)."""
        found = {p.relative_to(self.writes).as_posix() for p in self.writes.rglob("*")}
        return found - self.mount_points - BUILDAH_BINDS


@pytest.fixture(scope="module")
def container(image) -> Iterator[Container]:
    name = f"rlhf-mesh-test-{uuid.uuid4().hex[:8]}"
    _buildah("from", "--name", name, image)
    try:
        root = Path(_buildah("mount", name))
        writes = root.parent / "diff"
        assert writes.is_dir(), f"{root}: not an overlay mount; the image tests need buildah's overlay storage"
        for point in MOUNT_POINTS:  # as a runtime makes them
            (root / point.lstrip("/")).mkdir(parents=True, exist_ok=True)
        made = {p.relative_to(writes).as_posix() for p in writes.rglob("*")}
        config = json.loads(_buildah("inspect", "--type", "image", image))["OCIv1"]["config"]
        assert config["User"] == str(USER_ID)
        yield Container(name, config["Entrypoint"], writes, made)
    finally:
        _buildah("rm", name, check=False)


def _volume(folder: Path) -> str:
    """A host folder the image's user may write, as a volume."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, USER_ID, USER_ID)
    return str(folder)


def _in_image(container: Container, args: list[str], volumes: dict[str, str], log: Path) -> ChildServer:
    """The image's entry point with `args`, under buildah run (the host's network), as a ChildServer."""
    mounts = [f"--volume={host}:{inside}:{'ro' if inside in ('/models', '/etc/rlhf-mesh') else 'rw'}"
              for inside, host in volumes.items()]
    return ChildServer([BUILDAH, "run", "--isolation", "chroot", "--network", "host", *mounts, container.name,
                        "--", *container.entrypoint, *args], log, env=BUILDAH_ENV)


def _service_process(server: ChildServer) -> psutil.Process:
    """The rlhf-mesh process buildah started (a descendant of `buildah run`)."""
    for process in psutil.Process(server.process.pid).children(recursive=True):
        command = process.cmdline()  # python3.11 /opt/venv/bin/rlhf-mesh serve ..., under buildah-chroot-exec
        if "serve" in command and not command[0].startswith("buildah") and any(
                part.endswith("/rlhf-mesh") for part in command):
            return process
    raise AssertionError(f"no rlhf-mesh process under buildah run: {server.log()[-2000:]}")


def _stops_cleanly(server: ChildServer, container: Container) -> None:
    """SIGTERM to the service, as kubelet sends it: it drains and exits 0 within the grace period,
    having written nothing outside its volumes."""
    _service_process(server).terminate()
    assert server.process.wait(60) == 0, server.log()[-3000:]
    assert not container.written(), sorted(container.written())[:20]


def _readable(folder: Path) -> str:
    """A host folder of models, as a read-only volume every user may read (test folders are root's alone)."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return str(folder)


def _common(tmp_path: Path, models: Path) -> dict[str, str]:
    return {"/models": _readable(models), "/tmp": _volume(tmp_path / "tmp"),
            "/home/rlhf/.cache": _volume(tmp_path / "cache"), "/dev/shm": _volume(tmp_path / "shm")}


def test_the_image_serves_reward_as_the_host_does(container, tiny_models, tmp_path):
    models = tiny_models["reward"].parent
    http_port = free_port()
    server = _in_image(container, ["serve", "reward", "--model", "rm=/models/reward", "--http-port", str(http_port)],
                       _common(tmp_path, models), tmp_path / "image.log")
    host = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"rm={tiny_models['reward']}"],
                       tmp_path / "host.log")
    try:
        wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        wait_until_serving(host.address, timeout_s=300, alive=host.alive)
        process = _service_process(server)
        assert process.uids().real == USER_ID
        pairs = [("What is 2 + 2?", "4."), ("Say hi", "Go away.")]
        with RewardClient(server.address) as inside, RewardClient(host.address) as outside:
            scores = inside.scores(pairs, model="rm")
            assert scores == outside.scores(pairs, model="rm")
        body = json.dumps({"query": [p + r for p, r in pairs]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/get_reward", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.status == 200 and len(json.loads(reply.read())["rewards"]) == 2
        _stops_cleanly(server, container)
    finally:
        server.stop()
        host.stop()


def test_the_image_serves_generation_with_vllm(container, tiny_models, tmp_path):
    models = tiny_models["policy"].parent
    server = _in_image(container, ["serve", "generation", "--model", "/models/policy", "--dtype", "float32",
                                   "--max-model-len", "256"], _common(tmp_path, models), tmp_path / "image.log")
    try:
        wait_until_serving(server.address, timeout_s=600, alive=server.alive)
        assert _service_process(server).uids().real == USER_ID
        with GenerationClient(server.address, timeout_s=120) as client:
            (sample,) = client.generate(["The sea is"], max_tokens=8, temperature=0.0)
        policy = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
        assert list(sample.completion_token_ids) == greedy(policy, list(sample.prompt_token_ids), 8)
        _stops_cleanly(server, container)
    finally:
        server.stop()


def test_the_image_serves_feedback_and_its_rater_page(container, tiny_models, tmp_path):
    state = _volume(tmp_path / "state")
    rater_port = free_port()
    volumes = {**_common(tmp_path, tiny_models["policy"].parent), "/var/lib/rlhf-mesh": state}
    server = _in_image(container, ["serve", "feedback", "--db", "sqlite:////var/lib/rlhf-mesh/feedback.db",
                                   "--rater-port", str(rater_port)], volumes, tmp_path / "image.log")
    try:
        wait_until_serving(server.address, timeout_s=300, alive=server.alive)
        assert _service_process(server).uids().real == USER_ID
        with FeedbackClient(server.address) as client:
            client.submit(feedback("Say hi", ["Hi!", "Go away."], rater_id="ana", choice=0))
            assert [f.rater_id for f in client.list()] == ["ana"]
        with urllib.request.urlopen(f"http://127.0.0.1:{rater_port}/", timeout=60) as page:
            assert page.status == 200 and "text/html" in page.headers["Content-Type"]
        _stops_cleanly(server, container)
        assert (Path(state) / "feedback.db").stat().st_size > 0  # written to the volume, nowhere else
    finally:
        server.stop()


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_every_command_the_manifests_give_the_image_is_accepted_by_its_cli(container, tiny_models, tmp_path,
                                                                          overlay):
    """Each rlhf-mesh container's arguments, environment and mounted config, checked by the image's
    own `rlhf-mesh check` (torchrun's too): a renamed flag or key fails here, not in the cluster."""
    docs = [d for d in yaml.safe_load_all(rendered_overlay(overlay)) if d]
    configs = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    models = tmp_path / "models"
    shutil.copytree(tiny_models["policy"], models / "policy")
    shutil.copytree(tiny_models["reward"], models / "reward")
    (models / "prompts.jsonl").write_text('{"prompt": "Hi"}\n')
    checked = 0
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")):
        pod = workload["spec"]["template"]["spec"]
        for container_spec in pod["containers"]:
            if not container_spec["image"].startswith("rlhf-mesh:"):
                continue
            assert container_spec["image"] == f"rlhf-mesh:{VERSION}-{'gpu' if overlay == 'gpu' else 'cpu'}"
            folder = tmp_path / f"{workload['metadata']['name']}-{container_spec['name']}"
            volumes = {"/models": _readable(models)}
            referenced = set(_strings([container_spec.get("args", []), container_spec.get("env", []),
                                       list(configs.values())]))
            for mount in container_spec.get("volumeMounts", []):
                source = next(v for v in pod["volumes"] if v["name"] == mount["name"])
                host = folder / mount["name"]
                host.mkdir(parents=True, exist_ok=True)
                if "configMap" in source:
                    for key, text in configs[source["configMap"]["name"]].items():
                        (host / key).write_text(text)
                elif "secret" in source:  # the operator's secrets: stand-ins at every path the settings name
                    for path in referenced:
                        if path.startswith(mount["mountPath"] + "/"):
                            (host / path[len(mount["mountPath"]) + 1:]).write_text("stand-in\n")
                else:
                    continue
                volumes[mount["mountPath"]] = str(host)
            for inside in volumes:  # a mount inside another volume needs its mount point there
                parent = max((m for m in volumes if inside.startswith(m + "/")), key=len, default=None)
                if parent is not None:
                    (Path(volumes[parent]) / inside[len(parent) + 1:]).mkdir(parents=True, exist_ok=True)
            env = {e["name"]: e.get("value", "postgresql://u:p@h/db" if e["name"].endswith("_DB") else "x")
                   for e in container_spec.get("env", [])}
            args = cli_args(container_spec)
            if container_spec.get("command") == ["torchrun"]:
                assert _run(container, ["torchrun", "--help"], volumes, env).returncode == 0
            result = _run(container, [*container.entrypoint, "check", *args], volumes, env)
            assert result.returncode == 0, (workload["metadata"]["name"], args, result.stdout[-2000:])
            checked += 1
    assert checked >= 5


def _run(container: Container, command: list[str], volumes: dict[str, str], env: dict[str, str],
         ) -> subprocess.CompletedProcess:
    mounts = [f"--volume={host}:{inside}:ro" for inside, host in volumes.items()]
    return subprocess.run([BUILDAH, "run", "--isolation", "chroot", "--network", "host", *mounts,
                           *(f"--env={k}={v}" for k, v in env.items()), container.name, "--", *command],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **BUILDAH_ENV})
