"""Mutual TLS, bearer tokens with roles, rotation without restart and stream limits, on a real RewardService."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import threading

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_mesh.clients import TlsConfig
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import AsyncRewardClient, RewardClient, to_sample
from rlhf_mesh.security import TokenAuth, required_role
from rlhf_mesh.v1 import common_pb2, reward_pb2

from support import PYTHON, ChildServer, free_port, wait_for, write_pki, write_tokens

PAIR = ("What is 2 + 2?", "4, thank you.")


@pytest.fixture(scope="module")
def secured(tiny_models, tmp_path_factory):
    """A RewardService with mutual TLS, tokens, a plaintext health port and max_stream_s=3."""
    tmp = tmp_path_factory.mktemp("secured")
    pki = write_pki(tmp / "pki")
    tokens_file = tmp / "tokens.yaml"
    tokens = write_tokens(tokens_file, scorer=["score"], operator=["admin"], watcher=["monitor"])
    health_port = free_port()
    server = ChildServer(
        [PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"tiny={tiny_models['reward']}",
         "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
         "--tls-client-ca", str(pki["ca.pem"]), "--tokens-file", str(tokens_file),
         "--health-port", str(health_port), "--max-stream-s", "3"],
        tmp / "server.log",
    )
    wait_until_serving(f"localhost:{health_port}", timeout_s=300, alive=server.alive)
    tls = TlsConfig(root_cert=pki["ca.pem"], client_cert=pki["client.pem"], client_key=pki["client.key"])
    yield {"server": server, "tls": tls, "tokens": tokens, "tokens_file": tokens_file, "pki": pki, "tmp": tmp,
           "model": tiny_models["reward"]}
    assert server.stop() == 0


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_every_rpc_names_its_role():
    """Fail closed is the fallback, not the design: each rpc in protos/ states the role it needs."""
    from rlhf_mesh.v1 import feedback_pb2, generation_pb2, learner_pb2

    for module in (feedback_pb2, generation_pb2, learner_pb2, reward_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                role = method.GetOptions().Extensions[common_pb2.required_role]
                assert role != common_pb2.ROLE_UNSPECIFIED, method.full_name
                assert required_role(f"/{service.full_name}/{method.name}") == role
    assert required_role("/rlhf_mesh.v1.GenerationService/PushWeights") == common_pb2.ROLE_ADMIN
    assert required_role("/no.such.Service/Method") == common_pb2.ROLE_ADMIN


def test_mutual_tls_refuses_plaintext_and_unknown_clients(secured):
    address = secured["server"].address
    with RewardClient(address, timeout_s=10, token=secured["tokens"]["scorer"]) as plaintext:
        assert _code(lambda: plaintext.scores([PAIR]))[0] == grpc.StatusCode.UNAVAILABLE
    server_only = TlsConfig(root_cert=secured["pki"]["ca.pem"])
    with RewardClient(address, timeout_s=10, tls=server_only, token=secured["tokens"]["scorer"]) as no_cert:
        assert _code(lambda: no_cert.scores([PAIR]))[0] == grpc.StatusCode.UNAVAILABLE
    stranger = write_pki(secured["tmp"] / "stranger")  # a client certificate from another CA
    other = TlsConfig(root_cert=secured["pki"]["ca.pem"], client_cert=stranger["client.pem"],
                      client_key=stranger["client.key"])
    with RewardClient(address, timeout_s=10, tls=other, token=secured["tokens"]["scorer"]) as wrong_ca:
        assert _code(lambda: wrong_ca.scores([PAIR]))[0] == grpc.StatusCode.UNAVAILABLE


def test_tokens_and_roles(secured):
    address, tls, tokens = secured["server"].address, secured["tls"], secured["tokens"]
    with RewardClient(address, timeout_s=30, tls=tls) as anonymous:
        code, message = _code(lambda: anonymous.scores([PAIR]))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in message
        # Health needs no token, on the TLS port as on the plaintext one.
        reply = health_pb2_grpc.HealthStub(anonymous.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The scheme is case-insensitive (RFC 9110): "bearer", as some clients write it, works.
        request = reward_pb2.ScoreRequest(samples=[to_sample(PAIR)])
        lower = anonymous.stub.Score(request, timeout=30, metadata=(("authorization", f"bearer {tokens['scorer']}"),))
        assert len(lower.results) == 1
    with RewardClient(address, timeout_s=30, tls=tls, token=secrets.token_hex(16)) as forged:
        assert _code(lambda: forged.scores([PAIR])) == (grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    with RewardClient(address, timeout_s=30, tls=tls, token=tokens["watcher"]) as watcher:
        code, message = _code(lambda: watcher.scores([PAIR]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'score'" in message and "'watcher'" in message
    with RewardClient(address, timeout_s=30, tls=tls, token=tokens["scorer"]) as scorer:
        scores = scorer.scores([PAIR])
        assert len(scores) == 1
        code, message = _code(lambda: scorer.reload_model("tiny", str(secured["model"])))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'admin'" in message
    with RewardClient(address, timeout_s=300, tls=tls, token=tokens["operator"]) as operator:
        assert operator.scores([PAIR]) == scores  # admin may call every RPC
        assert operator.reload_model("tiny", str(secured["model"])).name == "tiny"

    async def score_async() -> list[float]:
        async with AsyncRewardClient(address, timeout_s=30, tls=tls, token=tokens["scorer"]) as client:
            return await client.scores([PAIR])

    assert asyncio.run(score_async()) == scores
    log = secured["server"].log()
    assert all(token not in log for token in tokens.values())


def test_stream_limit_ends_a_stream_that_runs_too_long(secured):
    held = threading.Event()

    def requests():
        yield reward_pb2.ScoreStreamRequest(sample=to_sample(PAIR))
        held.wait(60)  # the caller holds the stream open past max_stream_s=3, up to the end of the test

    with RewardClient(secured["server"].address, timeout_s=30, tls=secured["tls"],
                      token=secured["tokens"]["scorer"]) as client:
        replies = client.stub.ScoreStream(requests(), timeout=30)
        first = next(replies)
        assert first.result.score != 0.0
        try:
            with pytest.raises(grpc.RpcError) as err:
                list(replies)
        finally:
            held.set()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "max_stream_s=3" in err.value.details()  # the server's limit, not the call's own deadline


def test_rotated_tokens_and_certificates_apply_without_restart(secured):
    address, tls, server = secured["server"].address, secured["tls"], secured["server"]
    old = secured["tokens"]
    new = write_tokens(secured["tokens_file"], scorer=["score"], operator=["admin"], watcher=["monitor"])
    wait_for(lambda: _accepted(address, tls, new["scorer"]), what="the new token is accepted")  # checked once a second
    with RewardClient(address, timeout_s=30, tls=tls, token=new["scorer"]) as client:
        assert len(client.scores([PAIR])) == 1
    with RewardClient(address, timeout_s=30, tls=tls, token=old["scorer"]) as client:
        assert _code(lambda: client.scores([PAIR]))[0] == grpc.StatusCode.UNAUTHENTICATED
    secured["tokens"].update(new)

    # A broken token file keeps the last good tokens.
    failed_reloads = server.log().count("reloading failed")
    secured["tokens_file"].write_text("tokens: [{name: x}")
    wait_for(lambda: _accepted(address, tls, new["scorer"]) and server.log().count("reloading failed") > failed_reloads,
             what="a call after the broken file was read")  # files are checked when calls come
    with RewardClient(address, timeout_s=30, tls=tls, token=new["scorer"]) as client:
        assert len(client.scores([PAIR])) == 1
    secured["tokens_file"].write_text(yaml.safe_dump({"tokens": [
        {"name": name, "token": token, "roles": [role]}
        for (name, token), role in zip(new.items(), ("score", "admin", "monitor"), strict=True)
    ]}))

    # New CA, server and client certificates copied over the served files: new connections use them.
    rotated = write_pki(secured["tmp"] / "rotated")
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copyfile(rotated[name], secured["pki"][name])
    fresh = TlsConfig(root_cert=rotated["ca.pem"], client_cert=rotated["client.pem"], client_key=rotated["client.key"])
    wait_for(lambda: _accepted(address, fresh, new["scorer"]), what="the new certificates are served")
    with RewardClient(address, timeout_s=30, tls=fresh, token=new["scorer"]) as client:
        assert len(client.scores([PAIR])) == 1
    stale = TlsConfig(root_cert=secured["tmp"] / "stale-ca.pem", client_cert=rotated["client.pem"],
                      client_key=rotated["client.key"])
    (secured["tmp"] / "stale-ca.pem").write_bytes(write_pki(secured["tmp"] / "other")["ca.pem"].read_bytes())
    with RewardClient(address, timeout_s=10, tls=stale, token=new["scorer"]) as client:
        assert _code(lambda: client.scores([PAIR]))[0] == grpc.StatusCode.UNAVAILABLE
    secured["tls"] = fresh
    assert server.alive()


def _accepted(address: str, tls: TlsConfig, token: str) -> bool:
    """Whether a Score call with these credentials goes through (refused: False)."""
    with RewardClient(address, timeout_s=10, tls=tls, token=token) as client:
        try:
            return len(client.scores([PAIR])) == 1
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE), err.details()
            return False


def test_token_file_is_validated_without_echoingwrite_tokens(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": [{"name": "a", "token": "short-secret", "roles": ["root"]}]}))
    with pytest.raises(ValueError) as err:
        TokenAuth(path)
    assert "tokens.0.token" in str(err.value) and "tokens.0.roles" in str(err.value)
    assert "short-secret" not in str(err.value)
    # A token that no header or metadata could carry is refused when the file loads.
    path.write_text(yaml.safe_dump({"tokens": [{"name": "a", "token": "geheim-schlüssel-4711", "roles": ["score"]}]}))
    with pytest.raises(ValueError) as err:
        TokenAuth(path)
    assert "tokens.0.token" in str(err.value) and "ASCII" in str(err.value) and "schlüssel" not in str(err.value)


def test_the_bearer_scheme_in_any_case_and_odd_tokens_are_checked_without_errors(tmp_path):
    """What the HTTP ports hand over from a header: any scheme case; any characters at all."""
    token = write_tokens(tmp_path / "tokens.yaml", scorer=["score"])["scorer"]
    auth = TokenAuth(tmp_path / "tokens.yaml")

    def check(value: str) -> grpc.StatusCode | None:
        refused = auth.check("/rlhf_mesh.v1.RewardService/Score", [("authorization", value)])
        if refused is not None:
            assert token not in refused[1]
        return None if refused is None else refused[0]

    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        assert check(f"{scheme} {token}") is None
    assert check(f"  Bearer   {token} ") is None
    for value in (token, f"Basic {token}", f"Bearer{token}", "Bearer ", f"Bearer {token}\r",
                  "Bearer \ud800", f"Bearer {token[:-1]}\udcff", "Bearer schlüssel-geheim-4711", "Bearer \x00" * 3):
        assert check(value) == grpc.StatusCode.UNAUTHENTICATED, repr(value)
    assert auth.holder("\ud800" * 16) is None and auth.holder(token).name == "scorer"


def test_cli_calls_a_secured_service(secured, tmp_path):
    tls = secured["tls"]
    token_file = tmp_path / "token"
    token_file.write_text(secured["tokens"]["scorer"] + "\n")
    command = [PYTHON, "-m", "rlhf_mesh", "score", "--addr", secured["server"].address, "--prompt", PAIR[0],
               "--response", PAIR[1], "--tls-ca", str(tls.root_cert), "--tls-cert", str(tls.client_cert),
               "--tls-key", str(tls.client_key)]
    scored = subprocess.run([*command, "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
    assert scored.returncode == 0, scored.stderr
    with RewardClient(secured["server"].address, timeout_s=30, tls=tls, token=secured["tokens"]["scorer"]) as client:
        assert json.loads(scored.stdout)["score"] == client.scores([PAIR])[0]
    env = {**os.environ, "RLHF_MESH_TOKEN": secured["tokens"]["scorer"]}
    assert subprocess.run(command, capture_output=True, text=True, timeout=60, env=env).returncode == 0
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "RLHF_MESH_TOKEN"})
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: UNAUTHENTICATED: missing bearer token")
