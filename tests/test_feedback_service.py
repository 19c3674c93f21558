"""FeedbackService over gRPC, on SQLite and on a real PostgreSQL server.

PostgreSQL comes from RLHF_MESH_TEST_POSTGRES_URL (`.ci/run` installs and starts one on
loopback); without it the PostgreSQL cases skip, except under CI where they must run
(support.fresh_postgres).
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from rlhf_mesh.clients.feedback import FeedbackClient, feedback
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.v1 import feedback_pb2

from support import PYTHON, ChildServer, fresh_postgres


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'feedback.db'}"
    return fresh_postgres()


def _serve(database: str, log_path) -> ChildServer:
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", database,
                          "--max-text-bytes", "1000", "--rater-port", "0"], log_path)
    wait_until_serving(server.address, timeout_s=60, alive=server.alive)
    return server


@pytest.fixture(scope="module")
def feedback_server(database, tmp_path_factory):
    server = _serve(database, tmp_path_factory.mktemp("logs") / "feedback.log")
    yield server
    server.stop()


def _rater() -> str:
    return f"rater-{uuid.uuid4().hex[:8]}"


def test_each_kind_is_stored_and_listed_as_given(feedback_server):
    rater = _rater()
    items = [
        feedback("Say hi", ["hi", "hello"], rater_id=rater, choice=1, model_id="policy", policy_version=3),
        feedback("Say hi", ["hi", "yo", "hey"], rater_id=rater, scores=[2, 5, 3.5], scale=(1, 5)),
        feedback("Say hi", ["hii"], rater_id=rater, correction=(0, "Hi!")),
        feedback("Say hi", ["hi", "yo"], rater_id=rater, both_bad=True),
    ]
    with FeedbackClient(feedback_server.address) as client:
        replies = [client.submit(item) for item in items]
        listed = list(client.list(rater_id=rater))
    assert [r.already_stored for r in replies] == [False] * 4
    assert [f.feedback_id for f in listed] == [r.feedback_id for r in replies]
    for given, stored, reply in zip(items, listed, replies, strict=True):
        expected = feedback_pb2.Feedback()
        expected.CopyFrom(given)
        expected.feedback_id = reply.feedback_id
        expected.created_at.CopyFrom(reply.created_at)
        assert stored == expected


def test_resubmission_is_idempotent_and_a_conflicting_one_refused(feedback_server):
    rater, key = _rater(), uuid.uuid4().hex
    item = feedback("Q", ["a", "b"], rater_id=rater, choice=0, feedback_id=key)
    with FeedbackClient(feedback_server.address) as client:
        first, again = client.submit(item), client.submit(item)
        assert (first.feedback_id, first.already_stored) == (key, False)
        assert (again.feedback_id, again.already_stored, again.created_at) == (key, True, first.created_at)
        with pytest.raises(grpc.RpcError) as err:
            client.submit(feedback("Q", ["a", "b"], rater_id=rater, choice=1, feedback_id=key))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and key in err.value.details()
        assert [f.choice.chosen_index for f in client.list(rater_id=rater)] == [0]


def test_listing_filters_and_pages(feedback_server):
    rater, other = _rater(), _rater()
    with FeedbackClient(feedback_server.address) as client:
        ids = [client.submit(feedback(f"P{i}", ["a", "b"], rater_id=rater, choice=i % 2)).feedback_id
               for i in range(7)]
        client.submit(feedback("P", ["a"], rater_id=rater, scores=[1], scale=(0, 1)))
        client.submit(feedback("P", ["a", "b"], rater_id=other, choice=0))
        pages = []
        token = ""
        while True:
            page = client.stub.ListFeedback(feedback_pb2.ListFeedbackRequest(
                rater_id=rater, kind=feedback_pb2.FEEDBACK_KIND_CHOICE, page_size=3, page_token=token), timeout=10)
            pages.append([f.feedback_id for f in page.feedback])
            token = page.next_page_token
            if not token:
                break
        assert pages == [ids[0:3], ids[3:6], ids[6:7]]
        assert len(list(client.list(rater_id=rater))) == 8
        for request, message in (
            (feedback_pb2.ListFeedbackRequest(page_token="garbage!"), "page_token"),
            (feedback_pb2.ListFeedbackRequest(page_size=1001), "page_size 1001"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                client.stub.ListFeedback(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_export_turns_choices_ratings_and_corrections_into_pairs(feedback_server):
    rater = _rater()
    with FeedbackClient(feedback_server.address) as client:
        start = client.submit(feedback("C", ["x", "y", "z"], rater_id=rater, choice=2)).created_at
        client.submit(feedback("R", ["r1", "r2", "r3"], rater_id=rater, scores=[1, 4, 4.5], scale=(1, 5)))
        client.submit(feedback("T", ["t1", "t2"], rater_id=rater, scores=[3, 3], scale=(1, 5)))  # a tie
        client.submit(feedback("S", ["s1"], rater_id=rater, scores=[5], scale=(1, 5)))  # a single rating
        client.submit(feedback("K", ["wrong"], rater_id=rater, correction=(0, "right")))
        request = feedback_pb2.ExportPreferencesRequest(created_after=start, min_rating_margin=1.0)
        parts = list(client.stub.ExportPreferences(request, timeout=30))
    got = {(p.prompt, p.chosen, p.rejected) for part in parts for p in part.pairs}
    # choice: z beats x and y; ratings with margin > 1: r2 and r3 beat r1 (r3 - r2 = .5 is too close);
    # correction: right beats wrong; the tie and the single rating give nothing.
    assert got == {("C", "z", "x"), ("C", "z", "y"), ("R", "r2", "r1"), ("R", "r3", "r1"), ("K", "right", "wrong")}
    summary = parts[-1].summary
    assert (summary.pairs, summary.used_feedback, summary.skipped_feedback) == (5, 3, 2)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (feedback("P", ["a", "b"], rater_id="r", choice=2), "choice.chosen_index 2 is not a response index"),
        (feedback("P", ["a"], rater_id="r", choice=0), "a choice needs two or more responses"),
        (feedback("P", ["a", "b"], rater_id="r", scores=[1, 6], scale=(1, 5)), "rating.scores[1] = 6.0 is outside"),
        (feedback("P", ["a", "b"], rater_id="r", scores=[1], scale=(1, 5)), "rating has 1 scores for 2 responses"),
        (feedback("P", ["a", " "], rater_id="r", choice=0), "responses[1] is empty"),
        (feedback("", ["a", "b"], rater_id="r", choice=0), "prompt is empty"),
        (feedback("P", ["a", "b"], rater_id="", choice=0), "rater_id is empty"),
        (feedback("P", ["a", "x" * 1001], rater_id="r", choice=0), "responses[1] is longer than max_text_bytes=1000"),
        (feedback("P", ["a"], rater_id="r", correction=(1, "b")), "correction.response_index 1 is not"),
        (feedback_pb2.Feedback(rater_id="r", prompt="P", responses=["a"]), "no judgement"),
        (feedback("P", ["a"], rater_id="r", tie=True), "a tie needs two or more responses"),
        (feedback_pb2.Feedback(rater_id="r", prompt="P", responses=["a", "b"], choice=feedback_pb2.Choice(),
                               campaign_id="default", item_id=1), "campaign_id and item_id are set by the server"),
    ],
    ids=["choice-index", "choice-one", "rating-scale", "rating-count", "empty-response", "empty-prompt",
         "no-rater", "oversized", "correction-index", "no-judgement", "tie-one", "campaign-item"],
)
def test_bad_feedback_is_refused_and_nothing_is_written(feedback_server, item, message):
    item.rater_id = item.rater_id and _rater()
    with FeedbackClient(feedback_server.address) as client:
        before = len(list(client.list(page_size=1000)))
        with pytest.raises(grpc.RpcError) as err:
            client.submit(item)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        assert len(list(client.list(page_size=1000))) == before


def test_feedback_survives_a_kill_right_after_the_write(database, tmp_path):
    server = _serve(database, tmp_path / "first.log")
    rater = _rater()
    try:
        with FeedbackClient(server.address) as client:
            stored = client.submit(feedback("Durable?", ["yes", "no"], rater_id=rater, choice=0))
        server.kill()  # no drain, no clean shutdown
        server.process.wait(30)
    finally:
        server.stop()
    restarted = _serve(database, tmp_path / "second.log")
    try:
        with FeedbackClient(restarted.address) as client:
            assert [f.feedback_id for f in client.list(rater_id=rater)] == [stored.feedback_id]
    finally:
        restarted.stop()
