"""Campaign logic on a real SQLite store: who gets which item, skip, undo, k judgements per item,
agreement numbers against published worked examples, and export pairs backed by raters."""

from __future__ import annotations

import datetime
import random
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select, update

from rlhf_mesh.services.feedback import agreement
from rlhf_mesh.services.feedback.campaigns import Campaigns, Conflict, Judged
from rlhf_mesh.services.feedback.preferences import backed_pairs
from rlhf_mesh.services.feedback.store import (
    AssignmentRow,
    CampaignRow,
    FeedbackRow,
    FeedbackStore,
    RatingItemRow,
    now,
)

from support import fresh_postgres

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: 4 observers, 12 units,
# values 1-5, missing data. Published: nominal 0.743, ordinal 0.815.
EXAMPLE_C = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}
# The same paper, example A: 2 observers, 10 units, binary. Published: nominal 0.095.
EXAMPLE_A = {"A": [0, 1, 0, 0, 0, 0, 0, 0, 1, 0], "B": [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]}


def _judged(table: dict[str, list], kind: str) -> list[Judged]:
    """Each column a campaign item: a choice of response v (nominal), or one response rated v (ordinal)."""
    rows = []
    for rater, values in table.items():
        for item, value in enumerate(values):
            if value is not None:
                judgement = {"chosen_index": value} if kind == "choice" else {"scores": [value]}
                rows.append(Judged(rater, item, kind, judgement))
    return rows


@pytest.mark.parametrize(("table", "expected"), [(EXAMPLE_C, 0.743), (EXAMPLE_A, 0.095)], ids=["C", "A"])
def test_alpha_of_choices_is_the_published_nominal_value(table, expected):
    stats = agreement.stats("c", _judged(table, "choice"), {})
    assert round(stats.alpha_choice, 3) == expected
    assert not stats.HasField("alpha_rating")


def test_alpha_of_ratings_is_the_published_ordinal_value():
    stats = agreement.stats("c", _judged(EXAMPLE_C, "rating"), {})
    assert round(stats.alpha_rating, 3) == 0.815
    assert not stats.HasField("alpha_choice")


def test_pairwise_agreement_and_counts_by_hand():
    judged = [
        Judged("ann", 1, "choice", {"chosen_index": 0}), Judged("bob", 1, "choice", {"chosen_index": 0}),
        Judged("ann", 2, "tie", {"both_bad": False}), Judged("bob", 2, "tie", {"both_bad": True}),
        Judged("ann", 3, "choice", {"chosen_index": 1}), Judged("cat", 3, "choice", {"chosen_index": 1}),
        Judged("bob", 3, "choice", {"chosen_index": 0}),
        Judged("cat", 4, "correction", {"response_index": 0, "corrected_response": "x"}),  # no value to compare
    ]
    stats = agreement.stats("c", judged, {"dan": 2})
    assert [(r.rater_id, r.judgements, r.skips) for r in stats.raters] == [
        ("ann", 3, 0), ("bob", 3, 0), ("cat", 2, 0), ("dan", 0, 2)]
    # item 1: ann=bob; item 2: tie vs both bad; item 3: ann=cat, bob differs.
    assert [(p.rater_a, p.rater_b, p.units, p.agreed) for p in stats.pairs] == [
        ("ann", "bob", 3, 1), ("ann", "cat", 1, 1), ("bob", "cat", 1, 0)]
    # Pairs of values within a unit: item 1 agrees (1 of 1), item 2 not (0 of 1), item 3 1 of 3.
    assert stats.percent_agreement == pytest.approx(2 / 5)


def test_alpha_is_unset_when_it_is_undefined():
    everyone_agrees = [Judged(r, 1, "choice", {"chosen_index": 0}) for r in ("ann", "bob")]
    alone = [Judged("ann", i, "choice", {"chosen_index": i % 2}) for i in range(3)]
    for judged in (everyone_agrees, alone, []):
        stats = agreement.stats("c", judged, {})
        assert not stats.HasField("alpha_choice") and not stats.HasField("alpha_rating")
    assert agreement.stats("c", everyone_agrees, {}).percent_agreement == 1.0


def _row(item: int, rater: str, kind: str, judgement: dict) -> FeedbackRow:
    return FeedbackRow(feedback_id=f"{item}-{rater}", rater_id=rater, prompt="P", responses=["a", "b", "c"],
                       model_id="m", policy_version=0, kind=kind, judgement=judgement, item_id=item)


def test_export_counts_the_raters_backing_each_pair_and_filters_by_agreement():
    rows = [_row(1, "ann", "choice", {"chosen_index": 0}), _row(1, "bob", "choice", {"chosen_index": 0}),
            _row(1, "cat", "choice", {"chosen_index": 1})]
    pairs, used = backed_pairs(rows)
    assert {(p.chosen, p.rejected, p.raters_backing, p.raters) for p in pairs} == {
        ("a", "b", 2, 3), ("a", "c", 2, 3), ("b", "a", 1, 3), ("b", "c", 1, 3)}
    assert used == 3
    kept, used = backed_pairs(rows, min_raters_backing=2)  # "at least 2 of 3 raters agree"
    assert {(p.chosen, p.rejected) for p in kept} == {("a", "b"), ("a", "c")} and used == 2
    kept, used = backed_pairs(rows, min_agreement=0.9)
    assert kept == [] and used == 0
    tie = [_row(2, "ann", "tie", {"both_bad": True}), _row(2, "bob", "choice", {"chosen_index": 2})]
    kept, used = backed_pairs(tie, min_agreement=0.5)  # bob's pairs have 1 of 2 raters
    assert {(p.chosen, p.raters_backing, p.raters) for p in kept} == {("c", 1, 2)} and used == 1


@pytest.fixture
def campaigns(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield Campaigns(store, lease_s=600)
    store.close()


def _campaign(campaigns: Campaigns, k: int, items: int, name: str = "c") -> None:
    campaigns.create(CampaignRow(campaign_id=name, title=name, guidelines="", judgements=["choice", "tie"],
                                 rating_scale=5, judgements_per_item=k))
    campaigns.add_items(name, [RatingItemRow(prompt=f"P{i}", responses=["a", "b"], model_id="m", policy_version=0)
                               for i in range(items)])


def _judge(campaigns: Campaigns, rater: str, item: RatingItemRow, choice: int = 0):
    return campaigns.judge(FeedbackRow(prompt=item.prompt, responses=item.responses, model_id="m", policy_version=0,
                                       kind="choice", judgement={"chosen_index": choice}, campaign_id="c",
                                       item_id=item.item_id), rater)


def test_each_rater_sees_each_item_once_until_it_has_k_judgements(campaigns):
    _campaign(campaigns, k=2, items=3)
    seen = {"ann": [], "bob": [], "cat": []}
    for rater in ("ann", "bob", "ann", "bob", "ann", "bob"):
        item = campaigns.next("c", rater)
        seen[rater].append(item.item_id)
        _judge(campaigns, rater, item)
    assert seen["ann"] == seen["bob"] == [1, 2, 3]
    assert campaigns.next("c", "ann") is None and campaigns.next("c", "cat") is None  # every item closed
    progress = campaigns.progress("c", "ann")
    assert (progress.items, progress.closed_items, progress.judgements, progress.mine) == (3, 3, 6, 3)


def test_a_held_item_keeps_its_place_a_skip_frees_it_and_undo_reopens(campaigns):
    _campaign(campaigns, k=1, items=2)
    first = campaigns.next("c", "ann")
    assert campaigns.next("c", "ann").item_id == first.item_id  # a reload shows the same item
    assert campaigns.next("c", "bob").item_id != first.item_id  # ann holds item 1's one place
    campaigns.skip("c", "ann", first.item_id)
    assert campaigns.next("c", "cat").item_id == first.item_id  # the skipped item goes on to others
    with pytest.raises(Conflict, match="is skipped"):
        campaigns.skip("c", "ann", first.item_id)
    assert campaigns.next("c", "ann") is None  # ann skipped 1; 2 and 1 are held by bob and cat
    with pytest.raises(Conflict, match="another rater took the place you skipped"):
        campaigns.undo("c", "ann")  # cat holds item 1's one place now
    campaigns.skip("c", "cat", first.item_id)
    assert campaigns.undo("c", "ann") == first.item_id  # a skip can be undone while its place is free
    assert campaigns.next("c", "ann").item_id == first.item_id
    assert campaigns.next("c", "dan") is None  # ann holds it again: one place, one holder


def test_undo_deletes_the_judgement_and_is_refused_once_the_item_closed(campaigns):
    _campaign(campaigns, k=2, items=1)
    item = campaigns.next("c", "ann")
    stored = _judge(campaigns, "ann", item, choice=0)
    again = _judge(campaigns, "ann", item, choice=0)
    assert again.already_stored and again.row.feedback_id == stored.row.feedback_id  # a double submit is stored once
    with pytest.raises(Conflict, match="differently"):
        _judge(campaigns, "ann", item, choice=1)
    assert campaigns.undo("c", "ann") == item.item_id
    assert campaigns.progress("c").judgements == 0
    assert campaigns.judged("c") == ([], {})
    _judge(campaigns, "ann", campaigns.next("c", "ann"), choice=1)
    _judge(campaigns, "bob", campaigns.next("c", "bob"), choice=1)
    with pytest.raises(Conflict, match="closed"):
        campaigns.undo("c", "ann")
    assert [j.judgement for j in campaigns.judged("c")[0]] == [{"chosen_index": 1}] * 2


def _expire(campaigns: Campaigns, rater: str) -> None:
    """End the rater's holds now, as if the lease had run out."""
    with campaigns.engine.begin() as connection:
        connection.execute(update(AssignmentRow).where(AssignmentRow.rater_id == rater, AssignmentRow.status == "open")
                           .values(expires_at=now() - datetime.timedelta(seconds=1)))


def _counts(campaigns: Campaigns) -> dict[int, int]:
    """Each item's judgements, by the rows stored and by its counter (which must agree)."""
    rows = Counter(j.item_id for j in campaigns.judged("c")[0])
    with campaigns.engine.connect() as connection:
        counters = dict(connection.execute(select(RatingItemRow.item_id, RatingItemRow.judgements)).all())
    assert {i: n for i, n in counters.items() if n} == dict(rows)
    return counters


def test_an_undone_skip_never_takes_a_place_that_others_filled(campaigns):
    _campaign(campaigns, k=2, items=2)
    item = campaigns.next("c", "ann")
    _judge(campaigns, "bob", campaigns.next("c", "bob"))  # item 1: bob judged it, ann holds the other place
    campaigns.skip("c", "ann", item.item_id)
    assert campaigns.next("c", "cat").item_id == item.item_id  # cat takes the place ann gave back
    with pytest.raises(Conflict, match="another rater took the place"):
        campaigns.undo("c", "ann")
    _judge(campaigns, "cat", item)
    with pytest.raises(Conflict, match="closed"):
        campaigns.undo("c", "ann")
    assert campaigns.next("c", "ann").item_id == 2
    assert _counts(campaigns)[item.item_id] == 2


def test_an_undone_judgement_takes_back_only_its_own_place(campaigns):
    _campaign(campaigns, k=2, items=2)
    item = campaigns.next("c", "ann")
    _judge(campaigns, "ann", item)
    assert campaigns.next("c", "bob").item_id == item.item_id  # the second place
    assert campaigns.undo("c", "ann") == item.item_id  # ann's judgement is now her hold again
    assert campaigns.next("c", "cat").item_id == 2  # both places of item 1 are held
    _judge(campaigns, "ann", item, choice=1)
    _judge(campaigns, "bob", item)
    assert _counts(campaigns)[item.item_id] == 2


def test_an_expired_hold_whose_place_was_taken_is_given_up(campaigns):
    _campaign(campaigns, k=1, items=2)
    item = campaigns.next("c", "ann")
    _expire(campaigns, "ann")
    assert campaigns.next("c", "bob").item_id == item.item_id  # the expired place went back
    with pytest.raises(Conflict, match="expired and other raters took its places"):
        _judge(campaigns, "ann", item)  # a judgement sent late, after bob took the place
    assert campaigns.next("c", "ann").item_id == 2  # not item 1 again: bob holds its place
    _judge(campaigns, "bob", item)
    _expire(campaigns, "ann")
    stored = _judge(campaigns, "ann", campaigns.item("c", 2))  # expired, but nobody took the place: stored
    assert not stored.already_stored
    assert _counts(campaigns) == {1: 1, 2: 1}
    assert campaigns.next("c", "cat") is None


def test_an_expired_hold_is_not_renewed_over_a_taken_place(campaigns):
    _campaign(campaigns, k=1, items=1)
    item = campaigns.next("c", "ann")
    _expire(campaigns, "ann")
    assert campaigns.next("c", "bob").item_id == item.item_id
    assert campaigns.next("c", "ann") is None  # ann's reload: her hold lapsed and bob has the place
    _judge(campaigns, "bob", item)
    assert _counts(campaigns) == {1: 1}


def test_threads_racing_for_items_never_overfill_or_repeat(campaigns):
    _campaign(campaigns, k=3, items=12)
    errors = []

    def work(rater: str) -> None:
        try:
            while (item := campaigns.next("c", rater)) is not None:
                _judge(campaigns, rater, item, choice=hash(rater) % 2)
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    judged, _ = campaigns.judged("c")
    per_item = {}
    for j in judged:
        per_item.setdefault(j.item_id, []).append(j.rater_id)
    assert sorted(per_item) == list(range(1, 13))
    assert all(len(raters) == 3 == len(set(raters)) for raters in per_item.values())
    progress = campaigns.progress("c")
    assert (progress.judgements, progress.closed_items) == (36, 12)


@pytest.mark.parametrize("k", [1, 2])
def test_raters_undoing_skips_at_once_never_pass_k(campaigns, k):
    """Raters who read a while, skip, and undo the skip while others take the place it gave back."""
    _campaign(campaigns, k=k, items=30)
    errors, undos = [], Counter()

    def work(rater: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while (item := campaigns.next("c", rater)) is not None:
                time.sleep(rng.uniform(0, 0.02))  # reading
                if rng.random() < 0.5:
                    _judge(campaigns, rater, item)
                    continue
                campaigns.skip("c", rater, item.item_id)
                time.sleep(0.01)  # another rater may take the place meanwhile
                try:
                    campaigns.undo("c", rater)
                    undos["reopened"] += 1
                except Conflict:
                    undos["refused"] += 1
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f"r{i}", i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert sum(undos.values()) > 0  # skips were undone (reopened, or refused where the place was taken)
    assert max(_counts(campaigns).values()) <= k, dict(undos)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("limit", [1, 2, 3, 500])
def test_export_reads_each_item_whole_across_pages_and_the_rest_in_storage_order(tmp_path, limit, backend):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}" if backend == "sqlite" else fresh_postgres())
    # Storage order interleaves items and feedback outside campaigns; item 7 has 5 judgements.
    plan = [None, 7, 3, None, 7, 3, 7, None, 9, 7, 7]
    for i, item in enumerate(plan):
        store.submit(FeedbackRow(feedback_id=f"f{i}", rater_id=f"r{i}", prompt="P", responses=["a", "b"],
                                 model_id="m", policy_version=0, kind="choice", judgement={"chosen_index": 0},
                                 campaign_id=None if item is None else "c", item_id=item))
    groups, after = [], None
    while True:
        page, after = store.units(after=after, limit=limit)
        groups += [[row.feedback_id for row in group] for group in page]
        if after is None:
            break
    store.close()
    assert groups == [["f0"], ["f3"], ["f7"], ["f2", "f5"], ["f1", "f4", "f6", "f9", "f10"], ["f8"]]
