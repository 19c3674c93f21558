"""The HTTP ports (the RewardService's JSON protocols, the FeedbackService's rater page) under
hostile use, over IPv4 and IPv6 alike.

- Both families: asyncio binds `::` as IPv6-only, so a port bound that way refuses 127.0.0.1
  (rlhf_mesh/http_site.py binds one dual-stack socket instead).
- Inputs that used to crash a handler (a plain-text 500, uncounted) are clean 4xx in vLLM's
  error shape and counted; every framework error (404, 405, 413) has that shape too.
- A gzip bomb is refused while it inflates and freed at once; a client that goes away cancels
  its queued samples; a large body is parsed off the event loop.
- Idle, half-sent and trickling connections are closed; a malformed header line or one over
  8190 bytes gets a 400 that quotes nothing, and the token in it is neither echoed nor logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import urllib.request
import zlib
from types import SimpleNamespace

import grpc
import psutil
import pytest

from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.services.reward import http
from rlhf_mesh.services.reward.scorers import ScoringError
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import reward_pb2

from http_checks import (
    FAMILIES,
    REPLY_TIMEOUT_S,
    check_no_token_leaks,
    check_slow_clients_are_cut_off,
    error_of,
    exchange,
    request,
)
from support import PYTHON, ChildServer, free_port, metric, scrape, wait_for, write_tokens


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_the_rater_page_answers_on_every_family(host, tmp_path):
    port = free_port()
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'fb.db'}",
                          "--rater-port", str(port)], tmp_path / "feedback.log")
    try:
        wait_until_serving(server.address, timeout_s=60, alive=server.alive)
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as reply:
            assert reply.status == 200 and b"<html" in reply.read().lower()
    finally:
        assert server.stop() == 0


# The live RewardService: tokens on, a model, functions and composites.

@pytest.fixture(scope="module")
def reward(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward-http")
    tokens = write_tokens(folder / "tokens.yaml", trainer=["score"])
    port = free_port()
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--model", f"rm={tiny_models['reward']}",
                         "--function", "math", "--function", "format", "--composite", "total=1*rm+1*math",
                         "--composite", "huge=-1000000*format", "--tokens-file", str(folder / "tokens.yaml"),
                         "--http-port", str(port)], folder / "server.log")
    wait_until_serving(child.address, timeout_s=300, alive=child.alive)
    child.http_port, child.token = port, tokens["trainer"]
    yield child
    assert child.stop() == 0


def _post(reward, path: str, body: dict | bytes, host: str = "127.0.0.1", **kwargs) -> tuple[int | None, dict, bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return exchange(host, reward.http_port, request(path, raw, token=reward.token, **kwargs))


def _requests_counted(reward) -> float:
    return metric(scrape(reward), "rlhf_mesh_reward_requests_total")


HOSTILE = [  # path, body, request options, status, a part of the message
    ("/classify", b'{"input": "a\\ud800"}', {}, 400, "input: not valid Unicode"),
    ("/get_reward", b'{"query": ["\\ud800"]}', {}, 400, "query[0]: not valid Unicode"),
    ("/get_reward", b'{"query": ["a"], "labels": ["\\udfff"]}', {}, 400, "labels[0]: not valid Unicode"),
    ("/v1/score", b'{"samples": [{"query": {"text": "x"}, "metadata": {"\\ud800": "x"}}]}', {}, 400, "surrogate"),
    ("/classify", json.dumps({"input": [[5, 2**32]]}).encode(), {}, 400, "token ids run from 0 to 4294967295"),
    ("/v1/score", json.dumps({"samples": [{"tokenIds": {"ids": [2**32]}}]}).encode(), {}, 400, "out of range"),
    ("/classify", b'{"input": [[1' + b"1" * 4400 + b"]]}", {}, 400, "4300 digits"),
    ("/classify", b'{"input": ' + b"[" * 1000 + b"]" * 1000 + b"}", {}, 400, "nested too deeply"),
    ("/get_reward", b'{"query": ["a"]}', {"content_type": "application/json; charset=foo"}, 400, "UTF-8"),
    ("/get_reward", b'{"query": ["a"]}', {"headers": b"Content-Encoding: gzip\r\n"}, 400, "Content-Encoding"),
    ("/get_reward", b'{"query": ["a"]}', {"content_type": "text/plain"}, 415, "application/json"),
    ("/classify", b'{"input": "x", "model": []}', {}, 400, "model: must be a string"),
    ("/classify", b'{"input": "x", "model": false}', {}, 400, "model: must be a string"),
    ("/v1/score", b'{"model": false, "samples": [{"tokenIds": {"ids": [5]}}]}', {}, 400, "model: must be a string"),
    ("/get_reward", json.dumps({"query": ["a"] * 1025}).encode(), {}, 400, "max_request_samples=1024"),
    ("/classify", b'{"input": "x"}', {"headers": b"Authorization: Bearer \xff\xfe\x80\r\n"}, 401, "token"),
]


@pytest.mark.parametrize(("path", "body", "options", "status", "message"), HOSTILE,
                         ids=[f"{i}-{row[3]}" for i, row in enumerate(HOSTILE)])
def test_hostile_inputs_are_clean_errors_and_counted(reward, path, body, options, status, message):
    before = _requests_counted(reward)
    token = None if b"Authorization" in options.get("headers", b"") else reward.token
    got, _, reply = exchange("127.0.0.1", reward.http_port, request(path, body, token=token, **options))
    assert got == status, reply
    assert message in error_of(status, reply)
    assert _requests_counted(reward) == before + 1


@pytest.mark.parametrize("host", FAMILIES)
def test_framework_errors_have_the_same_shape(reward, host):
    status, _, body = exchange(host, reward.http_port, b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert status == 404 and "/nope" in error_of(404, body)
    status, headers, body = exchange(host, reward.http_port, b"GET /classify HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 405 and headers["Allow"] == "POST" and "GET" in error_of(405, body)
    status, _, body = exchange(host, reward.http_port, request("/classify", b"{", token=reward.token).replace(
        b"Content-Length: 1", b"Content-Length: 70000000"))
    assert status == 413 and "max_message_bytes" in error_of(413, body)


def test_scores_a_function_skipped_are_null_and_zero_scores_are_printed(reward):
    status, _, body = _post(reward, "/math/get_reward", {"query": ["no reference here"]})
    assert status == 200 and json.loads(body)["rewards"] == [None]
    status, _, body = _post(reward, "/total/get_reward", {"query": ["no reference here"]})
    reply = json.loads(body)
    assert reply["extra_logs"]["math"] == [None] and reply["rewards"] == reply["extra_logs"]["rm"]
    status, _, body = _post(reward, "/classify", {"model": "math", "input": "no reference"})
    assert status == 200 and json.loads(body)["data"][0]["probs"] == [None]
    status, _, body = _post(reward, "/v1/score", {"model": "math", "samples": [
        {"text": {"prompt": "1+1?", "response": r"\boxed{3}"}, "reference": "2"}]})
    assert status == 200 and json.loads(body)["results"] == [
        {"score": 0.0, "truncated": False, "numTokens": 0, "modelVersion": "", "components": [], "skipped": False}]


def test_the_sigmoid_of_a_very_negative_score_is_zero(reward):
    body = {"model": "huge", "input": "<think>because</think> 4"}
    status, _, raw = _post(reward, "/classify", body | {"use_activation": False})
    assert status == 200 and json.loads(raw)["data"][0]["probs"] == [-1e6]
    status, _, raw = _post(reward, "/classify", body)
    assert status == 200, raw
    assert json.loads(raw)["data"][0]["probs"] == [0.0]


@pytest.mark.parametrize("host", FAMILIES)
def test_a_malformed_header_line_echoes_and_logs_no_token(reward, host):
    check_no_token_leaks(host, reward.http_port, reward.token, "/classify", reward.log_path)


def test_twenty_gzip_bombs_are_refused_and_freed(reward):
    """Each 1 MB body inflates to 1000 MiB: refused with 413 once 64 MiB have inflated, the
    server's memory back where it was (it was 5x after ten, kept until the cyclic GC ran)."""
    assert _post(reward, "/classify", {"input": "warm up"})[0] == 200
    process = psutil.Process(reward.process.pid)
    idle = process.memory_info().rss
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    bomb = deflate.compress(b'{"input": "') + b"".join(deflate.compress(b"a" * (1 << 20)) for _ in range(1000))
    bomb += deflate.compress(b'"}') + deflate.flush()
    assert len(bomb) < 1100 << 10

    def send(host: str) -> int | None:
        status, _, body = exchange(host, reward.http_port, request("/classify", bomb, token=reward.token,
                                                                   headers=b"Content-Encoding: gzip\r\n"))
        assert "once inflated" in error_of(status, body)
        return status

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(send, FAMILIES * 10)) == [413] * 20
    rss = process.memory_info().rss
    assert rss < 1.2 * idle, f"resident memory {idle >> 20} -> {rss >> 20} MiB"
    print(f"20 gzip bombs: resident memory {idle >> 20} -> {rss >> 20} MiB ({rss / idle:.2f}x)")


def test_a_client_that_goes_away_drops_its_queued_samples(reward):
    """Four 1000-sample requests abandoned once queued: their samples are dropped, not scored,
    and a one-sample call behind them is answered."""
    def scored() -> tuple[float, float]:
        text = scrape(reward)
        return (metric(text, "rlhf_mesh_reward_dropped_samples_total", model="rm"),
                metric(text, "rlhf_mesh_reward_samples_total", model="rm", status="ok"))

    dropped, ok = scored()
    body = json.dumps({"model": "rm", "input": [[5 + i % 50] * 100 for i in range(1000)]}).encode()
    sockets = []
    for host in FAMILIES * 2:
        sock = socket.create_connection((host, reward.http_port), timeout=REPLY_TIMEOUT_S)
        sock.sendall(request("/classify", body, token=reward.token))
        sockets.append(sock)
    wait_for(lambda: metric(scrape(reward), "rlhf_mesh_reward_queue_depth_samples", model="rm") > 0,
             what="samples queued")
    for sock in sockets:
        sock.close()
    wait_for(lambda: metric(scrape(reward), "rlhf_mesh_reward_queue_depth_samples", model="rm") == 0,
             what="an empty queue")
    now_dropped, now_ok = scored()
    assert now_dropped > dropped and now_ok - ok < 4000
    status, _, raw = _post(reward, "/classify", {"model": "rm", "input": [[5, 6, 7]], "use_activation": False})
    assert status == 200 and len(json.loads(raw)["data"]) == 1
    print(f"abandoned 4000 samples: {now_dropped - dropped:g} dropped, {now_ok - ok:g} scored")


# The rater page: the same site code.

@pytest.fixture(scope="module")
def rater_port(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rater-port")
    tokens = write_tokens(folder / "tokens.yaml", ann=["rate"])
    port = free_port()
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{folder / 'fb.db'}",
                         "--rater-port", str(port), "--tokens-file", str(folder / "tokens.yaml"),
                         "--http-header-timeout-s", "1", "--http-body-timeout-s", "1", "--http-idle-timeout-s", "2"],
                        folder / "feedback.log")
    wait_until_serving(child.address, timeout_s=60, alive=child.alive)
    child.http_port, child.token = port, tokens["ann"]
    yield child
    assert child.stop() == 0


@pytest.mark.parametrize("host", FAMILIES)
def test_the_rater_port_echoes_and_logs_no_token(rater_port, host):
    check_no_token_leaks(host, rater_port.http_port, rater_port.token, "/api/me", rater_port.log_path)


@pytest.mark.parametrize("host", FAMILIES)
def test_the_rater_port_closes_idle_and_slow_connections(rater_port, host):
    check_slow_clients_are_cut_off(host, rater_port.http_port, "/api/campaigns/c/skip", rater_port.token)


# The reward port's own logic, in this process over real sockets, with a stand-in dispatcher.

class StandInDispatcher:
    """Scores every sample 1.0, or raises `error`."""

    registry = SimpleNamespace(label=lambda name: name or "stand-in")

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.callers: list[str] = []

    async def score_request(self, name, samples, *, caller=""):
        self.callers.append(caller)
        if self.error is not None:
            raise self.error
        return name or "stand-in", [reward_pb2.ScoreResult(score=1.0) for _ in samples]


@contextlib.contextmanager
def served(dispatcher: StandInDispatcher, **settings):
    """A RewardHttp on a free port, its event loop in a thread of its own."""
    server = http.RewardHttp(dispatcher, RewardSettings(model=["stand-in"], **settings))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(server.start("", 0), loop).result(REPLY_TIMEOUT_S)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(REPLY_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@pytest.mark.parametrize("host", FAMILIES)
def test_a_429_says_when_to_retry(host):
    full = ScoringError(grpc.StatusCode.RESOURCE_EXHAUSTED, "reward queue is full", retry_after_s=2.2)
    for error, retry_after in [(full, "3"), (ScoringError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"), "1")]:
        with served(StandInDispatcher(error)) as port:
            status, headers, body = exchange(host, port, request("/get_reward", b'{"query": ["a"]}'))
            assert status == 429 and headers["Retry-After"] == retry_after and "full" in error_of(429, body)


@pytest.mark.parametrize("host", FAMILIES)
def test_the_reward_port_closes_idle_and_slow_connections(host):
    with served(StandInDispatcher(), http_header_timeout_s=1, http_body_timeout_s=1, http_idle_timeout_s=2) as port:
        check_slow_clients_are_cut_off(host, port, "/get_reward")
        status, _, _ = exchange(host, port, request("/get_reward", b'{"query": ["a"]}'))
        assert status == 200


def test_a_large_body_is_parsed_off_the_event_loop(monkeypatch):
    """While a large body's parse is held, a small request is answered: the parse runs in a thread."""
    parsing, release = threading.Event(), threading.Event()
    parse = http.parse_json

    def held(raw: bytes):
        if len(raw) > 1 << 20:
            parsing.set()
            release.wait(REPLY_TIMEOUT_S)
        return parse(raw)

    monkeypatch.setattr(http, "parse_json", held)
    large = json.dumps({"input": [[5] * 1000] * 1000}).encode()
    with served(StandInDispatcher()) as port, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(exchange, "127.0.0.1", port, request("/pooling", large))
        assert parsing.wait(REPLY_TIMEOUT_S)
        assert exchange("::1", port, request("/pooling", b'{"input": "small"}'))[0] == 200
        assert not pending.done()
        release.set()
        status, _, body = pending.result()
        assert status == 200 and len(json.loads(body)["data"]) == 1000


def test_the_reward_http_port_listens_where_the_grpc_host_says(tmp_path):
    """`--host 127.0.0.1` keeps the HTTP port on loopback IPv4 too, unless `--http-host` says otherwise."""
    port = free_port()
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "reward", "--function", "exact", "--host", "127.0.0.1",
                          "--http-port", str(port)], tmp_path / "reward.log")
    try:
        wait_until_serving(server.address, timeout_s=60, alive=server.alive)
        status, _, body = exchange("127.0.0.1", port, request("/get_reward", b"{}"))
        assert status == 400 and "query" in error_of(status, body)
        listening = {c.laddr.ip for c in psutil.Process(server.process.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}
    finally:
        assert server.stop() == 0
