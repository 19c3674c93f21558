"""Helpers shared by the tests: free ports and server processes."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rlhf_mesh.processes import ChildProcess, free_port

__all__ = [
    "MAX_MODEL_LEN",
    "PYTHON",
    "ROOT",
    "ChildServer",
    "free_port",
    "greedy",
    "metric",
    "perturbed",
    "scrape",
    "serves",
    "start_generation_server",
    "wait_for",
    "write_pki",
]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MAX_MODEL_LEN = 256  # of the test generation servers
T = TypeVar("T")


class ChildServer(ChildProcess):
    """A server process started by a test, with its own metrics port; its log is appended to
    `log_path` (a restart appends)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.metrics_port = free_port()
        super().__init__(Path(log_path).stem, [*args, "--metrics-port", str(self.metrics_port)], log_path,
                         env=env, cwd=ROOT, port=port)


def wait_for(condition: Callable[[], T], timeout_s: float = 60.0, what: str = "the condition",
             every_s: float = 0.02) -> T:
    """Poll `condition` every `every_s` until it holds, and return what it returned then: a
    test's way to order events, never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout_s:g} s"
        time.sleep(every_s)
    return value


def scrape(server: ChildServer) -> str:
    """The server's Prometheus metrics, as text."""
    return urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric over its label sets that carry `labels`."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith((f"{name}{{", f"{name} ")) and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def start_generation_server(policy: Path, log_path: Path, *flags: str, port: int | None = None,
                            max_model_len: int = MAX_MODEL_LEN, nice: int = 0) -> ChildServer:
    """`rlhf-mesh serve generation` on `policy` in float32 with `flags`, once it is SERVING.

    `nice` lowers the priority of the server and its engine processes: on two cores, a
    generating engine can keep a waking test process off the CPU for over a second.
    """
    server = ChildServer(
        [*(["nice", "-n", str(nice)] if nice else []), PYTHON, "-m", "rlhf_mesh", "serve", "generation",
         "--model", str(policy), "--dtype", "float32", "--max-model-len", str(max_model_len), *flags],
        log_path, port=port,
    )
    server.wait_serving()
    return server


def push_messages(tensors: dict, version: int) -> list:
    """The PushWeightsRequest messages `push_weights` sends, parsed, for tests that alter or withhold some."""
    from rlhf_mesh.v1 import generation_pb2
    from rlhf_mesh.weights import prepare, push_requests

    return [generation_pb2.PushWeightsRequest.FromString(m) for m in push_requests(prepare(tensors, version).full)]


def greedy(model, prompt_ids, steps: int) -> list[int]:
    """`steps` greedy tokens of a transformers causal LM, one full forward per token."""
    import torch

    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def perturbed(policy: Path, k: int):
    """The causal LM in `policy` with seeded noise on every parameter: W_k, other weights for every k
    (a tied parameter is one parameter, so it stays tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    noise = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.05)
    return model


SERVED_PROMPTS = ["Hello there", [5, 6, 7, 8, 9]]
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides, as in test_generation_service


def serves(client, model, version: int, steps: int = 16) -> None:
    """The service generates exactly what `model` generates greedily, with its log-probabilities,
    at policy `version`: the check that a push reached every served parameter."""
    import torch

    assert client.model_info().policy_version == version
    for sample in client.generate(SERVED_PROMPTS, max_tokens=steps, temperature=0, ignore_eos=True):
        assert list(sample.completion_token_ids) == greedy(model, sample.prompt_token_ids, steps)
        assert (sample.policy_version_start, sample.policy_version_end) == (version, version)
        ids = [*sample.prompt_token_ids, *sample.completion_token_ids]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(sample.prompt_token_ids) - 1 : -1]
        expected = torch.log_softmax(logits, -1)[torch.arange(steps), list(sample.completion_token_ids)]
        assert torch.allclose(torch.tensor(list(sample.completion_logprobs)), expected, atol=LOGPROB_TOLERANCE)


def write_pki(folder: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> dict[str, Path]:
    """A fresh CA, a server certificate for `hosts` and a client certificate, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, key, issuer: x509.Certificate | None, issuer_key, ca: bool, usage=None) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() or ":" in h else x509.DNSName(h)
                     for h in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, cert: x509.Certificate, key) -> None:
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("rlhf-mesh test CA", ca_key, None, ca_key, ca=True)
    write("ca", ca, ca_key)
    for name, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, issue(name, key, ca, ca_key, ca=False, usage=usage), key)
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """The scalars of every step a W&B run logged, read back from its `.wandb` file: LevelDB-log
    framing (32 KiB blocks of records, each a 7-byte header: crc32c, length, type; a flush pads
    its block with zeros) of W&B's `Record` protobuf messages, after a 7-byte file header."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        if kind == 0:  # zeros: the writer padded the block out (a flush); records go on in the next one
            position += block - position % block
            continue
        if position + 7 + length > len(data):  # still being written
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(pending)
            pending = b""
    steps: dict[int, dict[str, float]] = {}
    for raw in records:
        record = wandb_internal_pb2.Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = int(items.pop("_step"))
            steps[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    return steps


def fresh_postgres() -> str:
    """The URL of the test PostgreSQL database (RLHF_MESH_TEST_POSTGRES_URL, which `.ci/run` sets),
    with a schema of this test worker's own (parallel workers share the database) emptied of the
    feedback store's tables; skips without one, except under CI where it fails."""
    import pytest
    import sqlalchemy

    url = os.environ.get("RLHF_MESH_TEST_POSTGRES_URL", "")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("RLHF_MESH_TEST_POSTGRES_URL is not set: CI must run the PostgreSQL tests")
        pytest.skip("no PostgreSQL: set RLHF_MESH_TEST_POSTGRES_URL=postgresql://USER:PASSWORD@HOST/DB")
    schema = f"tests_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def write_tokens(path: Path, **roles: list[str]) -> dict[str, str]:
    """A tokens file with one fresh token per name and its roles; returns name -> token."""
    import secrets

    import yaml

    tokens = {name: secrets.token_hex(16) for name in roles}
    path.write_text(yaml.safe_dump({"tokens": [{"name": name, "token": tokens[name], "roles": r}
                                               for name, r in roles.items()]}))
    return tokens


class RaterApi:
    """One identity on the rater page's HTTP API (a bearer token, or headers a proxy would set)."""

    def __init__(self, url: str, token: str | None = None, headers: dict | None = None, timeout_s: float = 30) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=timeout_s,
                                 headers={**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})

    def next(self, campaign: str):
        return self.http.get(f"/api/campaigns/{campaign}/next")

    def item(self, campaign: str) -> dict | None:
        reply = self.next(campaign)
        assert reply.status_code == 200, reply.text
        return reply.json()["item"]

    def judge(self, campaign: str, item_id: int, **judgement):
        return self.http.post(f"/api/campaigns/{campaign}/judgements", json={"item_id": item_id, **judgement})

    def skip(self, campaign: str, item_id: int):
        return self.http.post(f"/api/campaigns/{campaign}/skip", json={"item_id": item_id})

    def undo(self, campaign: str):
        return self.http.post(f"/api/campaigns/{campaign}/undo", json={})


def rendered_overlay(overlay: str) -> str:
    """`kubectl kustomize deploy/k8s/overlays/OVERLAY` (the test is skipped without kubectl)."""
    import shutil
    import subprocess

    import pytest

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    return subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, check=True, timeout=120).stdout


def cli_args(container: dict) -> list[str]:
    """The `rlhf-mesh` arguments of a manifest's container: its args, or those torchrun hands to `-m rlhf_mesh`."""
    args = container["args"]
    if container.get("command") == ["torchrun"]:
        module = args.index("-m")
        assert args[module + 1] == "rlhf_mesh"
        return args[module + 2:]
    assert "command" not in container  # the image's entry point, rlhf-mesh
    return args
