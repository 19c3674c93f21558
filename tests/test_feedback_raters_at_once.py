"""20 raters judging one campaign at once through the rater page's HTTP API, 40 items each,
with skips, undos of skips and of judgements, and retried submits: the database ends with
exactly the judgements the raters were told were stored, none twice, and no item with more
than k."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter

import pytest
import sqlalchemy

from rlhf_mesh.clients.feedback import FeedbackClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.v1 import feedback_pb2

from support import PYTHON, ChildServer, RaterApi, free_port, fresh_postgres, write_tokens

pytestmark = pytest.mark.slow

RATERS = 20
ITEMS_PER_RATER = 40  # a fixed amount of work, whatever the machine's speed
K = 3
ITEMS = 3000


def _rate(url: str, token: str, seed: int, told: dict, statuses: Counter) -> None:
    """One rater: judge (a choice or a tie), sometimes skip (and undo the skip), undo, or submit twice."""
    rng = random.Random(seed)
    rater = RaterApi(url, token, timeout_s=60)
    for _ in range(ITEMS_PER_RATER):
        reply = rater.next("load")
        statuses[("next", reply.status_code)] += 1
        item = reply.json().get("item")
        if item is None:
            return
        roll = rng.random()
        if roll < 0.1:
            statuses[("skip", rater.skip("load", item["item_id"]).status_code)] += 1
            if roll < 0.05:  # undone at once: refused when another rater took the place meanwhile
                statuses[("undo", rater.undo("load").status_code, "of a skip")] += 1
            continue
        verdict = {"tie": True} if roll < 0.2 else {"choice": rng.randrange(2)}
        reply = rater.judge("load", item["item_id"], **verdict)
        statuses[("judge", reply.status_code)] += 1
        if reply.status_code == 200 and not reply.json()["already_stored"]:
            told[item["item_id"]] = verdict
        if roll > 0.95:  # a retried submit is stored once
            again = rater.judge("load", item["item_id"], **verdict)
            statuses[("retry", again.status_code, again.json().get("already_stored"))] += 1
        elif roll > 0.9:
            undone = rater.undo("load")
            statuses[("undo", undone.status_code)] += 1
            if undone.status_code == 200:
                del told[undone.json()["item_id"]]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_twenty_raters_at_once_lose_and_duplicate_nothing(backend, tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}" if backend == "sqlite" else fresh_postgres()
    names = {f"rater{i:02d}": ["rate"] for i in range(RATERS)} | {"boss": ["admin"]}
    tokens = write_tokens(tmp_path / "tokens.yaml", **names)
    port = free_port()
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", url, "--rater-port", str(port),
                          "--tokens-file", str(tmp_path / "tokens.yaml"), "--log-level", "WARNING"],
                         tmp_path / "feedback.log")
    try:
        wait_until_serving(server.address, timeout_s=60, alive=server.alive)
        with FeedbackClient(server.address, token=tokens["boss"]) as client:
            client.create_campaign(feedback_pb2.Campaign(
                campaign_id="load", judgements_per_item=K,
                judgements=[feedback_pb2.JUDGEMENT_KIND_CHOICE, feedback_pb2.JUDGEMENT_KIND_TIE]))
            for start in range(0, ITEMS, 500):
                client.add_rating_items([feedback_pb2.RatingItem(prompt=f"P{i}", responses=[f"a{i}", f"b{i}"])
                                         for i in range(start, start + 500)], campaign_id="load")
        told = {f"rater{i:02d}": {} for i in range(RATERS)}
        statuses: Counter = Counter()
        threads = [threading.Thread(target=_rate, args=(f"http://127.0.0.1:{port}", tokens[r], i, told[r], statuses))
                   for i, r in enumerate(told)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads)
    finally:
        assert server.stop() == 0

    print(f"{backend}: {sum(len(t) for t in told.values())} judgements told stored; {dict(statuses)}")
    refused = {key: n for key, n in statuses.items() if key[1] != 200 and key[:2] != ("undo", 409)}
    assert refused == {}  # an undo may find its item closed, or its place taken, by others (409); nothing else fails
    assert statuses[("judge", 200)] > 500, "too little work to show anything"
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as connection:
        stored = connection.execute(sqlalchemy.text(
            "SELECT rater_id, item_id, kind, judgement FROM feedback WHERE campaign_id = 'load'")).all()
        counts = dict(connection.execute(sqlalchemy.text(
            "SELECT item_id, judgements FROM rating_items WHERE campaign_id = 'load'")).all())
    engine.dispose()
    expected = {(rater, item, "tie", '{"both_bad": false}') if "tie" in v else
                (rater, item, "choice", f'{{"chosen_index": {v["choice"]}}}')
                for rater, items in told.items() for item, v in items.items()}
    assert len(stored) == len(expected)  # nothing lost, nothing twice
    assert {(r, i, k, json.dumps(j if isinstance(j, dict) else json.loads(j))) for r, i, k, j in stored} == expected
    per_item = Counter(item for _, item, _, _ in stored)
    assert max(per_item.values()) <= K and max(counts.values()) <= K
    assert all(counts[item] == n for item, n in per_item.items())  # the items' counters agree with the rows
