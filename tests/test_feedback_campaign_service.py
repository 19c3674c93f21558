"""Campaigns through the real server: gRPC to create and follow them, the rater page's HTTP API
to judge, on SQLite and PostgreSQL; identities from the tokens file or a trusted proxy header."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid

import grpc
import httpx
import krippendorff
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_mesh.clients.feedback import FeedbackClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.v1 import feedback_pb2

from support import PYTHON, ROOT, ChildServer, RaterApi, free_port, fresh_postgres, write_pki, write_tokens

ROLES = {"boss": ["admin"], "ann": ["rate"], "bob": ["rate"], "cat": ["rate"], "eve": ["feedback"]}
CHOICE, TIE, BOTH_BAD, RATING, CORRECTION = (
    feedback_pb2.JUDGEMENT_KIND_CHOICE, feedback_pb2.JUDGEMENT_KIND_TIE, feedback_pb2.JUDGEMENT_KIND_BOTH_BAD,
    feedback_pb2.JUDGEMENT_KIND_RATING, feedback_pb2.JUDGEMENT_KIND_CORRECTION)
SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy", "Cache-Control")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("campaigns")
    database = f"sqlite:///{folder / 'feedback.db'}" if request.param == "sqlite" else fresh_postgres()
    tokens = write_tokens(folder / "tokens.yaml", **ROLES)
    port = free_port()
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", database, "--rater-port", str(port),
                         "--tokens-file", str(folder / "tokens.yaml")], folder / "feedback.log")
    wait_until_serving(child.address, timeout_s=60, alive=child.alive)
    child.url, child.tokens, child.folder = f"http://127.0.0.1:{port}", tokens, folder
    yield child
    child.stop()


def _admin(server) -> FeedbackClient:
    return FeedbackClient(server.address, token=server.tokens["boss"])


def _campaign(server, *kinds, k: int, items: int) -> str:
    name = f"c-{uuid.uuid4().hex[:8]}"
    with _admin(server) as client:
        created = client.create_campaign(feedback_pb2.Campaign(campaign_id=name, judgements=kinds,
                                                               judgements_per_item=k, guidelines="# Be *fair*"))
        assert (created.title, created.rating_scale, list(created.judgements)) == (name, 5, list(kinds))
        client.add_rating_items([feedback_pb2.RatingItem(prompt=f"P{i} {name}", responses=[f"A{i}", f"B{i}"])
                                 for i in range(items)], campaign_id=name)
    return name


def test_three_raters_judge_every_item_and_the_export_keeps_what_two_of_three_back(server, tmp_path):
    name = _campaign(server, CHOICE, TIE, BOTH_BAD, k=3, items=4)
    verdicts = {  # per rater, per item in order
        "ann": [{"choice": 0}, {"choice": 0}, {"tie": True}, {"choice": 1}],
        "bob": [{"choice": 0}, {"choice": 0}, {"tie": True}, {"choice": 0}],
        "cat": [{"choice": 0}, {"choice": 1}, {"both_bad": True}, {"tie": True}],
    }
    pages = {r: RaterApi(server.url, server.tokens[r]) for r in verdicts}
    seen = {r: [] for r in verdicts}
    for step in range(4):
        for rater, page in pages.items():  # the three take turns: each holds one of the item's three places
            item = page.item(name)
            seen[rater].append(item["prompt_html"])
            reply = page.judge(name, item["item_id"], **verdicts[rater][step])
            assert reply.status_code == 200, reply.text
    assert all(len(set(s)) == 4 and s == seen["ann"] for s in seen.values())
    assert all(page.item(name) is None for page in pages.values())

    with _admin(server) as client:
        [progress] = [c.progress for c in client.campaigns() if c.campaign_id == name]
        assert (progress.items, progress.closed_items, progress.judgements, progress.skips) == (4, 4, 12, 0)
        [stats] = client.campaign_stats(name)
        assert [(r.rater_id, r.judgements) for r in stats.raters] == [("ann", 4), ("bob", 4), ("cat", 4)]
        assert [(p.rater_a, p.rater_b, p.units, p.agreed) for p in stats.pairs] == [
            ("ann", "bob", 4, 3), ("ann", "cat", 4, 1), ("bob", "cat", 4, 1)]
        assert stats.percent_agreement == pytest.approx(5 / 12)
        codes = {"response 1": 0, "response 2": 1, "tie": 2, "both bad": 3}
        table = [[codes[v] for v in row] for row in (
            ["response 1", "response 1", "tie", "response 2"], ["response 1", "response 1", "tie", "response 1"],
            ["response 1", "response 2", "both bad", "tie"])]
        assert stats.alpha_choice == pytest.approx(krippendorff.alpha(reliability_data=table,
                                                                      level_of_measurement="nominal"))
        everything, summary = client.export_preferences(campaign_id=name)
        backed, backed_summary = client.export_preferences(campaign_id=name, min_raters_backing=2)
    # Item 1: A≻B by all three; item 2: A≻B by two, B≻A by one; item 3 ties; item 4 one each way.
    assert sorted((p.chosen, p.rejected, p.raters_backing, p.raters) for p in everything) == [
        ("A0", "B0", 3, 3), ("A1", "B1", 2, 3), ("A3", "B3", 1, 3), ("B1", "A1", 1, 3), ("B3", "A3", 1, 3)]
    assert (summary.pairs, summary.used_feedback, summary.skipped_feedback) == (5, 8, 4)
    assert sorted((p.chosen, p.raters_backing) for p in backed) == [("A0", 3), ("A1", 2)]
    assert (backed_summary.used_feedback, backed_summary.skipped_feedback) == (5, 7)

    out = tmp_path / "pairs.jsonl"
    token_file = tmp_path / "admin.token"
    token_file.write_text(server.tokens["boss"])
    done = subprocess.run([PYTHON, "-m", "rlhf_mesh", "feedback", "export", "--addr", server.address, "--output",
                           str(out), "--campaign", name, "--min-agreement", "0.6", "--token-file", str(token_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["chosen"], r["raters_backing"], r["raters"]) for r in rows) == [("A0", 3, 3), ("A1", 2, 3)]


def test_skip_and_undo_through_the_api(server):
    name = _campaign(server, CHOICE, RATING, k=2, items=2)
    ann, bob = RaterApi(server.url, server.tokens["ann"]), RaterApi(server.url, server.tokens["bob"])
    first = ann.item(name)
    assert ann.skip(name, first["item_id"]).json()["progress"]["my_skips"] == 1
    second = ann.item(name)
    assert second["item_id"] != first["item_id"]
    assert ann.judge(name, second["item_id"], scores=[5, 2]).status_code == 200
    assert ann.undo(name).json()["item_id"] == second["item_id"]
    assert ann.item(name)["item_id"] == second["item_id"]  # back to judge again
    assert ann.judge(name, second["item_id"], choice=1).status_code == 200
    assert ann.item(name) is None  # ann skipped the first item and judged the second
    for item_id in (first["item_id"], second["item_id"]):
        assert bob.item(name)["item_id"] == item_id
        assert bob.judge(name, item_id, choice=0).status_code == 200
    reply = ann.undo(name)
    assert reply.status_code == 409 and "closed" in reply.json()["error"]["message"]  # both judged it: nothing undone
    with _admin(server) as client:
        stored = [f for f in client.list(page_size=1000) if f.campaign_id == name]
    assert sorted((f.rater_id, f.item_id, f.WhichOneof("judgement")) for f in stored) == [
        ("ann", second["item_id"], "choice"), ("bob", first["item_id"], "choice"),
        ("bob", second["item_id"], "choice")]


def test_bad_requests_get_their_status_and_store_nothing(server):
    name = _campaign(server, CHOICE, k=2, items=1)
    ann = RaterApi(server.url, server.tokens["ann"])
    item_id = ann.item(name)["item_id"]
    bob = RaterApi(server.url, server.tokens["bob"])
    nobody = RaterApi(server.url)
    cases = [
        (nobody.next(name), 401, "log in"),
        (nobody.judge(name, item_id, choice=0), 401, "log in"),
        (RaterApi(server.url, "not-a-token-at-all").next(name), 401, "invalid token"),
        (RaterApi(server.url, server.tokens["eve"]).next(name), 403, "lacks the role 'rate'"),
        (ann.http.get(f"/api/campaigns/{name}/stats"), 403, "'admin'"),
        (ann.next("no-such-campaign"), 404, "no campaign"),
        (bob.judge(name, item_id, choice=0), 409, "not assigned to you"),
        (ann.judge(name, item_id, choice=2), 400, "not a response index"),
        (ann.judge(name, item_id, scores=[1, 2]), 400, "does not ask for rating"),
        (ann.judge(name, item_id, choice=0, tie=True), 400, "exactly one"),
        (ann.judge(name, 10**9), 404, "no item"),
        (ann.http.post(f"/api/campaigns/{name}/judgements", json=[1]), 400, "the body: Input should be an object"),
        (ann.http.post(f"/api/campaigns/{name}/judgements", content=b'{"item_id": 1, "choice": 0}'), 415, "json"),
    ]
    for reply, status, message in cases:
        assert (reply.status_code, message in reply.json()["error"]["message"]) == (status, True), reply.text
    assert RaterApi(server.url, server.tokens["boss"]).http.get(f"/api/campaigns/{name}/stats").status_code == 200
    with _admin(server) as client:
        assert [f for f in client.list(page_size=1000) if f.campaign_id == name] == []


def test_wrong_types_are_refused_naming_the_field_and_nothing_is_stored(server):
    """No coercion: a tie of 0, a choice of 0.9 or "1", string scores; and no 500 for numbers
    no database holds, deep nesting or bytes that are not UTF-8."""
    name = _campaign(server, CHOICE, TIE, BOTH_BAD, RATING, CORRECTION, k=1, items=1)
    ann = RaterApi(server.url, server.tokens["ann"])
    item_id = ann.item(name)["item_id"]
    judgements = f"/api/campaigns/{name}/judgements"

    def post(raw: bytes, path: str = judgements) -> httpx.Response:
        return ann.http.post(path, content=raw, headers={"Content-Type": "application/json"})

    cases = [({"tie": value}, "tie") for value in (0, 1, "no", [], None, {})] + [
        ({"both_bad": 0}, "both_bad"),
        *(({"choice": value}, "choice") for value in (0.9, 1.0, True, "1", [0], -1)),
        ({"scores": [True, True]}, "scores[0]"), ({"scores": ["3", "4.5"]}, "scores[0]"),
        ({"scores": [3, 4.5]}, "scores[1]"), ({"scores": "34"}, "scores"), ({"scores": [6, 1]}, "scores[0]"),
        ({"scores": [1, 0]}, "scores[1]"),
        ({"correction": ["a"]}, "correction"), ({"correction": "a"}, "correction"),
        ({"correction": {"response_index": 0, "corrected_response": ["a"]}}, "correction.corrected_response"),
        ({"correction": {"response_index": "0", "corrected_response": "a"}}, "correction.response_index"),
        ({"correction": {"response_index": 0}}, "correction.corrected_response"),
        ({"choice": 2**64}, "choice"), ({"correction": {"response_index": 2, "corrected_response": "a"}},
                                        "correction.response_index"),
        ({"choice": 0, "why": "because"}, "why"),
    ]
    for judgement, field in cases:
        reply = ann.judge(name, item_id, **judgement)
        error = reply.json()["error"]
        assert (reply.status_code, error["param"], error["code"]) == (400, field, 400), (judgement, reply.text)
        assert error["message"].startswith(field), error
    for item in (2**63, "1", True, 1.0, None, -1, 0):
        reply = ann.judge(name, item, choice=0)
        assert (reply.status_code, reply.json()["error"]["param"]) == (400, "item_id"), (item, reply.text)
        assert (post(json.dumps({"item_id": item}).encode(), f"/api/campaigns/{name}/skip").json()["error"]["param"]
                == "item_id")
    for raw in (b'{"item_id": %d, "choice": %s}' % (item_id, b"1" * 5000), b'{"item_id": 1, "choice": 1e400}',
                b"[" * 100_000 + b"]" * 100_000,
                b'{"item_id": 1, "tie": true, "x": "\ud800"}', b"{", b""):
        reply = post(raw)
        assert reply.status_code == 400 and reply.json()["error"]["message"], (raw[:60], reply.text)
    reply = post(b'{"item_id": %d, "tie": "\xff"}' % item_id)  # a byte that is not UTF-8
    assert reply.status_code == 400 and "the body: Invalid JSON" in reply.json()["error"]["message"]
    with _admin(server) as client:
        assert [f for f in client.list(page_size=1000) if f.campaign_id == name] == []
    assert ann.judge(name, item_id, tie=False, choice=1).status_code == 200  # false is no tie
    with _admin(server) as client:
        [stored] = [f for f in client.list(page_size=1000) if f.campaign_id == name]
    assert stored.choice.chosen_index == 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([2**63, -(2**63) - 1, 10**400]) | st.floats()
    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
JUDGEMENT_FIELDS = ["choice", "scores", "correction", "tie", "both_bad", "item_id", "response_index",
                    "corrected_response", "x"]


def test_random_bodies_get_a_clear_refusal_never_a_500(server):
    """Random JSON where a judgement goes: 400, 404 or 409 in the error shape, and whatever is
    stored was answered 200."""
    name = _campaign(server, CHOICE, TIE, BOTH_BAD, RATING, CORRECTION, k=1, items=1)
    ann = RaterApi(server.url, server.tokens["ann"])
    item_id = ann.item(name)["item_id"]
    stored = []

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fields=st.dictionaries(st.sampled_from(JUDGEMENT_FIELDS), JSON, max_size=3), real=st.booleans(),
           path=st.sampled_from(["judgements", "skip"]))
    def call(fields, real, path) -> None:
        body = ({"item_id": item_id} if real else {}) | fields
        reply = ann.http.post(f"/api/campaigns/{name}/{path}", content=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})
        if reply.status_code == 200:
            stored.append(body)
            return
        error = reply.json()["error"]
        assert reply.status_code in (400, 404, 409) and error["code"] == reply.status_code and error["message"], (
            body, reply.text)

    call()
    with _admin(server) as client:
        rows = [f for f in client.list(page_size=1000) if f.campaign_id == name]
    assert len(rows) <= 1 and (not rows or stored)  # k = 1; a stored judgement was answered 200


def test_the_scheme_is_any_case_and_a_refused_token_is_never_echoed(server):
    token = server.tokens["ann"]
    for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
        reply = httpx.get(f"{server.url}/api/me", headers={"Authorization": f"{scheme} {token}"})
        assert (reply.status_code, reply.json()["rater_id"]) == (200, "ann"), scheme
    for presented in (b"Bearer " + token.encode()[:-1] + b"\xff", "Bearer ann\u00e9-is-not-a-token".encode(),
                      b"Bearer " + token.encode() + b" and more", b"Bearer " + token[::-1].encode()):
        reply = httpx.get(f"{server.url}/api/me", headers={"Authorization": presented})
        assert reply.status_code == 401 and reply.json()["error"]["message"] == "invalid token", presented
        assert presented.removeprefix(b"Bearer ")[:16] not in reply.content
    assert token not in (server.folder / "feedback.log").read_text()


def test_every_reply_carries_the_security_headers(server):
    ann = RaterApi(server.url, server.tokens["ann"])
    name = _campaign(server, CHOICE, k=1, items=1)
    item_id = RaterApi(server.url, server.tokens["bob"]).item(name)["item_id"]
    oversized = b'{"item_id": 1, "x": "%s"}' % (b"a" * (64 << 10) * 18)  # past max_text_bytes * (max_responses + 2)
    replies = {
        200: ann.http.get("/"), 401: httpx.get(f"{server.url}/api/me"),
        404: ann.http.get("/no-such-page"), 405: ann.http.put("/api/me"),
        413: ann.http.post(f"/api/campaigns/{name}/judgements", content=oversized,
                           headers={"Content-Type": "application/json"}),
        400: ann.judge(name, item_id, choice="1"), 409: ann.judge(name, item_id, choice=0),
    }
    for status, reply in replies.items():
        assert reply.status_code == status, (status, reply.text)
        assert all(header in reply.headers for header in SECURITY_HEADERS), (status, reply.headers)
    # A request line aiohttp's parser refuses, before any route.
    port = int(server.url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"GET /api/me HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer x\r\r\n\r\n")
        raw = b""
        while chunk := connection.recv(65536):
            raw += chunk
    head = raw.partition(b"\r\n\r\n")[0].decode().lower()
    assert " 400 " in head.partition("\r\n")[0] and all(h.lower() + ":" in head for h in SECURITY_HEADERS), head


def test_campaign_rpcs_refuse_bad_input_with_the_right_code(server):
    name = _campaign(server, CHOICE, k=1, items=1)
    with _admin(server) as client:
        for campaign, code, message in [
            (feedback_pb2.Campaign(campaign_id="Not Valid!"), grpc.StatusCode.INVALID_ARGUMENT, "campaign_id"),
            (feedback_pb2.Campaign(campaign_id="x", judgements=[99]), grpc.StatusCode.INVALID_ARGUMENT, "judgements"),
            (feedback_pb2.Campaign(campaign_id="x", rating_scale=1), grpc.StatusCode.INVALID_ARGUMENT, "rating_scale"),
            (feedback_pb2.Campaign(campaign_id=name), grpc.StatusCode.ALREADY_EXISTS, "exists"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                client.create_campaign(campaign)
            assert err.value.code() == code and message in err.value.details()
        for call in (lambda: client.add_rating_items([feedback_pb2.RatingItem(prompt="p", responses=["a", "b"])],
                                                     campaign_id="nope"),
                     lambda: client.campaign_stats("nope"),
                     lambda: client.export_preferences(campaign_id="nope")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            client.export_preferences(min_agreement=1.5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with FeedbackClient(server.address, token=server.tokens["ann"]) as rater, pytest.raises(grpc.RpcError) as err:
        rater.create_campaign(feedback_pb2.Campaign(campaign_id="by-a-rater"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_trusted_proxy_header_names_the_rater_when_configured(tmp_path):
    port = free_port()
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'f.db'}",
                         "--rater-port", str(port), "--rater-identity-header", "X-Forwarded-User"],
                        tmp_path / "feedback.log")
    try:
        wait_until_serving(child.address, timeout_s=60, alive=child.alive)
        with FeedbackClient(child.address) as client:
            client.add_rating_items([feedback_pb2.RatingItem(prompt="p", responses=["a", "b"])])
            url = f"http://127.0.0.1:{port}"
            assert RaterApi(url).next("default").status_code == 401
            for name in (b"dana\xff", "\u202eana".encode(), "da\u200bna".encode()):  # not UTF-8, bidi, invisible
                reply = RaterApi(url, headers={"X-Forwarded-User": name}).http.get("/api/me")
                assert (reply.status_code, reply.json()["error"]["param"]) == (400, "X-Forwarded-User"), name
            proxied = RaterApi(url, headers={"X-Forwarded-User": "dana@example.org"})
            assert proxied.http.get("/api/me").json()["rater_id"] == "dana@example.org"
            item = proxied.item("default")
            assert proxied.judge("default", item["item_id"], choice=1).status_code == 200
            assert proxied.item("default") is None  # the one item is closed
            assert [(f.rater_id, f.choice.chosen_index) for f in client.list()] == [("dana@example.org", 1)]
    finally:
        assert child.stop() == 0


def test_the_rater_page_serves_https_without_asking_browsers_for_a_client_certificate(tmp_path):
    pki = write_pki(tmp_path / "pki")
    tokens = write_tokens(tmp_path / "tokens.yaml", ann=["rate"])
    port, health = free_port(), free_port()
    child = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", f"sqlite:///{tmp_path / 'f.db'}",
                         "--rater-port", str(port), "--tokens-file", str(tmp_path / "tokens.yaml"),
                         "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
                         "--tls-client-ca", str(pki["ca.pem"]), "--health-port", str(health)],
                        tmp_path / "feedback.log")
    try:
        wait_until_serving(f"localhost:{health}", timeout_s=60, alive=child.alive)
        browser = httpx.Client(base_url=f"https://localhost:{port}", verify=str(pki["ca.pem"]), timeout=30)
        assert browser.get("/").status_code == 200  # gRPC wants client certificates; the page does not
        assert browser.get("/api/me", headers={"Authorization": f"Bearer {tokens['ann']}"}).json()["rater_id"] == "ann"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://localhost:{port}/", timeout=10)  # no plaintext on the TLS port
    finally:
        assert child.stop() == 0
