"""A feedback database of the schema before campaigns (Alembic 0002), with data in it, upgrades
in place when the new server starts: nothing is lost, judged items stay judged, the old
queue becomes the campaign "default"."""

from __future__ import annotations

import datetime

import pytest
import sqlalchemy

from rlhf_mesh.clients.feedback import FeedbackClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.services.feedback.store import upgrade

from support import PYTHON, ChildServer, RaterApi, free_port, fresh_postgres, write_tokens

OLD_ROWS = {
    "feedback": [
        {"seq": 1, "feedback_id": "item-1-ann", "rater_id": "ann", "prompt": "P1", "responses": '["a1", "b1"]',
         "model_id": "m", "policy_version": 3, "kind": "choice", "judgement": '{"chosen_index": 1}'},
        {"seq": 2, "feedback_id": "api-7", "rater_id": "pipeline", "prompt": "Q", "responses": '["x", "y"]',
         "model_id": "m", "policy_version": 3, "kind": "rating",
         "judgement": '{"scores": [1.0, 4.0], "scale_min": 1.0, "scale_max": 5.0}'},
    ],
    "rating_items": [
        {"item_id": 1, "prompt": "P1", "responses": '["a1", "b1"]', "model_id": "m", "policy_version": 3,
         "feedback_id": "item-1-ann"},
        {"item_id": 2, "prompt": "P2", "responses": '["a2", "b2"]', "model_id": "m", "policy_version": 3,
         "feedback_id": None},
    ],
}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_of_the_previous_schema_upgrades_in_place(backend, tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}" if backend == "sqlite" else fresh_postgres()
    driver_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    upgrade(driver_url, "0002")
    engine = sqlalchemy.create_engine(driver_url)
    stamp = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
    with engine.begin() as connection:
        for table, rows in OLD_ROWS.items():
            for row in rows:
                columns = {**row, "created_at": stamp}
                connection.execute(sqlalchemy.text(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"),
                    columns)
        if backend == "postgresql":  # rows inserted with explicit ids: move the sequences past them
            for table, key in (("feedback", "seq"), ("rating_items", "item_id")):
                connection.execute(sqlalchemy.text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), (SELECT max({key}) FROM {table}))"))

    tokens = write_tokens(tmp_path / "tokens.yaml", ann=["rate"], bob=["rate"], boss=["admin"])
    port = free_port()
    server = ChildServer([PYTHON, "-m", "rlhf_mesh", "serve", "feedback", "--db", url, "--rater-port", str(port),
                          "--tokens-file", str(tmp_path / "tokens.yaml")], tmp_path / "feedback.log")
    try:
        wait_until_serving(server.address, timeout_s=60, alive=server.alive)
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar() == "0003"
        with FeedbackClient(server.address, token=tokens["boss"]) as client:
            old = list(client.list())
            assert [(f.feedback_id, f.rater_id, f.campaign_id, f.item_id) for f in old] == [
                ("item-1-ann", "ann", "default", 1), ("api-7", "pipeline", "", 0)]
            assert old[0].choice.chosen_index == 1 and list(old[1].rating.scores) == [1.0, 4.0]
            [default] = client.campaigns()
            assert (default.campaign_id, default.judgements_per_item) == ("default", 1)
            assert (default.progress.items, default.progress.closed_items, default.progress.judgements) == (2, 1, 1)

            # The judged item stays closed: raters get the one left, and the first to ask holds it.
            ann, bob = (RaterApi(f"http://127.0.0.1:{port}", tokens[r]) for r in ("ann", "bob"))
            assert ann.item("default")["item_id"] == 2
            assert bob.item("default") is None
            judged = ann.judge("default", 2, choice=0)
            assert judged.status_code == 200, judged.text
            assert judged.json()["progress"]["closed_items"] == 2

            pairs, summary = client.export_preferences()
            assert sorted((p.prompt, p.chosen, p.rejected) for p in pairs) == [
                ("P1", "b1", "a1"), ("P2", "a2", "b2"), ("Q", "y", "x")]
            assert (summary.used_feedback, summary.skipped_feedback) == (3, 0)
    finally:
        assert server.stop() == 0
        engine.dispose()
