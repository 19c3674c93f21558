"""The container images and Kubernetes manifests, checked offline: every overlay renders with
`kubectl kustomize`, validates with `kubernetes-validate --strict` against Kubernetes 1.30,
and is wired together (selectors, probe ports, ConfigMaps, Secrets, commands, configs)."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest
import yaml

from rlhf_mesh.cli import SERVICE_MODULES

from support import PYTHON, ROOT, cli_args, rendered_overlay

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu-dev", "gpu"]
KUBERNETES_VERSION = "1.30.0"
# Created by the operator (deploy/README.md).
EXTERNAL_SECRETS = {"gpu": {"rlhf-mesh-feedback-db", "rlhf-mesh-tls", "rlhf-mesh-tokens", "rlhf-mesh-learner-token",
                            "rlhf-mesh-peer-token", "rlhf-mesh-environment-token"}}
WORKLOADS = ("Deployment", "StatefulSet", "Job")


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    out = rendered_overlay(request.param)
    path = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    path.write_text(out)
    return request.param, path, [d for d in yaml.safe_load_all(out) if d]


def _pods(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) pairs."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in WORKLOADS]


def _named(docs: list[dict], kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in docs if d["kind"] == kind}


def test_every_overlay_validates_strictly(rendered):
    _, path, _ = rendered
    result = subprocess.run([str(Path(PYTHON).parent / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
                             "--quiet", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_select_pods_that_exist_on_ports_they_expose(rendered):
    _, _, docs = rendered
    pods = _pods(docs)
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matching = [t for _, t in pods if selector.items() <= t["metadata"]["labels"].items()]
        assert matching, f"Service {service['metadata']['name']} selects no pods"
        port_names = {p["name"] for t in matching for c in t["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port['targetPort']}"


def test_containers_are_probed_limited_and_unprivileged(rendered):
    _, _, docs = rendered
    for workload, template in _pods(docs):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for container in spec["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert ":" in container["image"] and not container["image"].endswith(":latest"), where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert not container["securityContext"].get("privileged"), where
            assert {"requests", "limits"} <= set(container["resources"]), where
            assert "livenessProbe" in container, where
            ports = {p["containerPort"] for p in container["ports"]} | {p["name"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                check = container.get(probe, {})
                port = (check.get("grpc") or check.get("tcpSocket") or {}).get("port")
                assert port is None or port in ports, f"{where} {probe} port {port} is not a container port"


def test_rlhf_mesh_pods_drain_gracefully(rendered):
    _, _, docs = rendered
    for workload, template in _pods(docs):
        for container in template["spec"]["containers"]:
            if container["image"].startswith("rlhf-mesh:") and workload["kind"] != "Job":
                assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
                # preStop + drain_notice_s + drain_grace_s
                assert template["spec"]["terminationGracePeriodSeconds"] > 5 + 1 + 30
                assert container["readinessProbe"]["grpc"]["service"].startswith("rlhf_mesh.v1.")


def test_every_configmap_and_secret_used_is_defined(rendered):
    overlay, _, docs = rendered
    config_maps, secrets = _named(docs, "ConfigMap"), _named(docs, "Secret") | EXTERNAL_SECRETS.get(overlay, set())
    for workload, template in _pods(docs):
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, workload["metadata"]["name"]
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, workload["metadata"]["name"]
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in _named(docs, "PersistentVolumeClaim")
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["name"] in secrets, f"{workload['metadata']['name']}: {ref}"


def test_secured_overlay_turns_on_mutual_tls_and_tokens_for_every_service(rendered):
    overlay, _, docs = rendered
    if overlay != "gpu":
        pytest.skip("cpu-dev runs without TLS and tokens")
    for _, template in _pods(docs):
        container = template["spec"]["containers"][0]
        assert container["image"].startswith("rlhf-mesh:")
        service = cli_args(container)[1]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        settings = importlib.import_module(SERVICE_MODULES[service]).Settings
        prefix = settings.model_config["env_prefix"]
        for key in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file"):
            value = env[f"{prefix}{key.upper()}"]
            assert key in settings.model_fields and Path(value).parent.as_posix() in mounts, (service, key)
        health = int(env[f"{prefix}HEALTH_PORT"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:  # kubelet cannot speak TLS: every probe uses the plaintext health port
                assert container[probe]["grpc"]["port"] == health, (service, probe)
        # The services that call others: a token and a CA for them, and the name their certificate carries.
        caller = {"learner": "SERVICES_", "environment": "SERVICES_", "generation": "CATCH_UP_"}.get(service)
        if caller:
            for key in ("TOKEN_FILE", "TLS_CA"):
                assert f"{caller}{key}".lower() in settings.model_fields, (service, key)
                assert Path(env[f"{prefix}{caller}{key}"]).parent.as_posix() in mounts, (service, key)
            assert env[f"{prefix}{caller}TLS_SERVER_NAME"]
            assert f"{caller}tls_server_name".lower() in settings.model_fields


def test_commands_are_cli_commands_and_configs_validate_with_their_settings(rendered):
    _, _, docs = rendered
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rlhf-mesh-config"))
    for _, template in _pods(docs):
        for container in template["spec"]["containers"]:
            if not container["image"].startswith("rlhf-mesh:"):
                continue
            command, service, flag, path = cli_args(container)
            assert (command, flag) == ("serve", "--config") and service in SERVICE_MODULES
            mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
            assert volume["configMap"]["name"] == config["metadata"]["name"]
            values = yaml.safe_load(config["data"][Path(path).name])
            settings = importlib.import_module(SERVICE_MODULES[service]).Settings
            env_required = {"feedback": {"db": "postgresql://u:p@h/db"}}.get(service, {})
            if service == "learner":  # its prompt file lives on the models volume, not here
                values = {**values, "prompts": "/models/prompts.jsonl"}
            settings.model_validate({**values, **env_required})


def test_images_install_exactly_the_tested_lock():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "deploy" / "docker" / name).read_text()
        assert "COPY requirements/lock.txt requirements/lock.txt" in text
        assert "--no-deps -r requirements/" in text
        assert 'ENTRYPOINT ["rlhf-mesh"]' in text and "USER 10001" in text
        assert ":latest" not in text
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --no-deps -r requirements/lock.txt" in makefile


def test_a_learner_under_torchrun_is_an_indexed_job_whose_nodes_meet_at_its_first_pod(rendered):
    """torchrun's --nnodes pods, node i on pod i, rank 0 reachable by its stable DNS name
    (headless Service, published before it is ready) on a port the pod exposes, and a run
    folder that every pod can mount."""
    overlay, _, docs = rendered
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "learner")
    template = job["spec"]["template"]
    container = next(c for c in template["spec"]["containers"] if c["name"] == "learner")
    if container.get("command") != ["torchrun"]:
        assert overlay == "cpu-dev" and job["spec"].get("completions", 1) == 1
        return
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"][:container["args"].index("-m")])
    nodes = int(flags["nnodes"])
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes > 1
    rank_env = flags["node-rank"].removeprefix("$(").removesuffix(")")
    rank_source = next(e for e in container["env"] if e["name"] == rank_env)["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank_source == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    subdomain = template["spec"]["subdomain"]
    assert flags["master-addr"] == f"{job['metadata']['name']}-0.{subdomain}"  # the pod of index 0
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == subdomain)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert int(flags["master-port"]) in {p["containerPort"] for p in container["ports"]}
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus is None or int(gpus) == int(flags["nproc-per-node"])  # one rank per GPU
    claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
              if "persistentVolumeClaim" in v and not v["persistentVolumeClaim"].get("readOnly")}
    for claim in (d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] in claims):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]
