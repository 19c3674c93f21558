"""Campaigns: which item each rater judges next, and their judgements, skips and undos.

Every rater gets the campaign's items in the order they were added, each item once, until
it has `judgements_per_item` (k) judgements. Taking an item holds one of its k places for
`lease_s`; a rater who walks away gives it back when the hold expires. A skip gives the
place back at once (the item goes on to others); an undo reopens the rater's last judged
or skipped item while it has fewer than k judgements.

An item never has more than k judgements and live holds together: every path that gives a
rater a place (next, a judgement sent after its hold expired, the undo of a skip) first
checks that one is free (`_free`).

Every change runs in one transaction that starts by updating the campaign's row: that
write is the lock (a row lock in PostgreSQL, the database's write lock in SQLite), so two
raters working at once see each other's holds, and no place is given twice. Each change reads
the clock once it holds the lock, so a hold that expired while it waited counts as expired.
"""

from __future__ import annotations

import datetime
import re
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf_mesh.services.feedback.store import (
    AssignmentRow,
    CampaignRow,
    FeedbackRow,
    FeedbackStore,
    RatingItemRow,
    Stored,
    content,
    now,
)

DEFAULT = "default"  # the campaign of items added without one (migration 0003)
JUDGEMENTS = ("choice", "rating", "correction", "tie", "both_bad")
CAMPAIGN_ID = re.compile(r"[a-z0-9_-]{1,64}")


class CampaignError(ValueError):
    """A campaign request that cannot be carried out, with why."""


class NotFound(CampaignError):
    pass


class Conflict(CampaignError):
    """The request does not fit what the store holds (a closed item, one the rater does not hold)."""


@dataclass(frozen=True)
class Progress:
    items: int
    closed_items: int
    judgements: int
    skips: int
    mine: int = 0  # the asking rater's judgements
    my_skips: int = 0


@dataclass(frozen=True)
class Judged:
    """One rater's stored judgement of an item, for agreement."""

    rater_id: str
    item_id: int
    kind: str
    judgement: dict


class Campaigns:
    def __init__(self, store: FeedbackStore, lease_s: float) -> None:
        self.engine = store.engine
        self.lease = datetime.timedelta(seconds=lease_s)

    def create(self, campaign: CampaignRow) -> CampaignRow:
        if not CAMPAIGN_ID.fullmatch(campaign.campaign_id):
            raise CampaignError(f"campaign_id {campaign.campaign_id!r} is not 1 to 64 of a-z, 0-9, '-' and '_'")
        campaign.created_at = campaign.updated_at = now()
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(campaign)
            try:
                session.commit()
            except IntegrityError:
                raise Conflict(f"campaign {campaign.campaign_id!r} exists") from None
        return campaign

    def get(self, campaign_id: str) -> CampaignRow:
        with Session(self.engine, expire_on_commit=False) as session:
            campaign = session.get(CampaignRow, campaign_id)
        if campaign is None:
            raise NotFound(f"no campaign {campaign_id!r}")
        return campaign

    def list(self) -> list[CampaignRow]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(CampaignRow).order_by(CampaignRow.created_at, CampaignRow.campaign_id)))

    def add_items(self, campaign_id: str, items: list[RatingItemRow]) -> int:
        """Add items at the end of the campaign; returns how many of its items are still open."""
        stamp = now()
        with Session(self.engine) as session:
            campaign = _lock(session, campaign_id)
            for item in items:
                item.campaign_id, item.created_at, item.judgements = campaign_id, stamp, 0
            session.add_all(items)
            session.commit()
            return session.scalar(select(func.count()).select_from(RatingItemRow).where(
                RatingItemRow.campaign_id == campaign_id,
                RatingItemRow.judgements < campaign.judgements_per_item))

    def next(self, campaign_id: str, rater_id: str) -> RatingItemRow | None:
        """The item the rater holds, or the next one they may judge (now held); None when none is left."""
        with Session(self.engine, expire_on_commit=False) as session:
            campaign = _lock(session, campaign_id)
            stamp = now()
            k = campaign.judgements_per_item
            held = session.scalars(select(AssignmentRow).where(
                AssignmentRow.campaign_id == campaign_id, AssignmentRow.rater_id == rater_id,
                AssignmentRow.status == "open").order_by(AssignmentRow.updated_at.desc())).first()
            if held is not None:
                item = session.get(RatingItemRow, held.item_id)
                if _free(session, item, k, rater_id, stamp):
                    held.expires_at = stamp + self.lease
                    session.commit()
                    return item
                session.delete(held)  # its hold expired and others took its place meanwhile
            holds = (select(func.count()).select_from(AssignmentRow).where(
                AssignmentRow.item_id == RatingItemRow.item_id, AssignmentRow.status == "open",
                AssignmentRow.expires_at > stamp).scalar_subquery())
            seen = select(AssignmentRow.assignment_id).where(AssignmentRow.item_id == RatingItemRow.item_id,
                                                             AssignmentRow.rater_id == rater_id)
            item = session.scalars(select(RatingItemRow).where(
                RatingItemRow.campaign_id == campaign_id, RatingItemRow.judgements < k, ~seen.exists(),
                RatingItemRow.judgements + holds < k).order_by(RatingItemRow.item_id).limit(1)).first()
            if item is not None:
                session.add(AssignmentRow(campaign_id=campaign_id, item_id=item.item_id, rater_id=rater_id,
                                          status="open", expires_at=stamp + self.lease, updated_at=stamp))
            session.commit()
            return item

    def item(self, campaign_id: str, item_id: int) -> RatingItemRow:
        with Session(self.engine, expire_on_commit=False) as session:
            item = session.get(RatingItemRow, item_id)
        if item is None or item.campaign_id != campaign_id:
            raise NotFound(f"no item {item_id} in campaign {campaign_id!r}")
        return item

    def judge(self, row: FeedbackRow, rater_id: str) -> Stored:
        """Store the rater's judgement of the item they hold (`row.campaign_id`, `row.item_id`); a
        resubmission of the same judgement returns the stored one."""
        row.rater_id = rater_id
        with Session(self.engine, expire_on_commit=False) as session:
            k = _lock(session, row.campaign_id).judgements_per_item
            stamp = now()
            assignment = self._assignment(session, row.campaign_id, row.item_id, rater_id)
            if assignment.status == "done":
                stored = session.scalars(select(FeedbackRow).where(
                    FeedbackRow.feedback_id == assignment.feedback_id)).one()
                if content(stored) != content(row):
                    raise Conflict(f"you judged item {row.item_id} differently before (undo it first)")
                return Stored(stored, already_stored=True)
            if assignment.status != "open":
                raise Conflict(f"you skipped item {row.item_id}")
            if not _free(session, session.get(RatingItemRow, row.item_id), k, rater_id, stamp):
                raise Conflict(f"your hold on item {row.item_id} expired and other raters took its places: "
                               "ask for your next item")
            row.feedback_id = row.feedback_id or uuid.uuid4().hex
            row.created_at = stamp
            session.add(row)
            assignment.status, assignment.feedback_id, assignment.expires_at = "done", row.feedback_id, None
            assignment.updated_at = stamp
            session.execute(update(RatingItemRow).where(RatingItemRow.item_id == row.item_id)
                            .values(judgements=RatingItemRow.judgements + 1))
            session.commit()
            return Stored(row, already_stored=False)

    def skip(self, campaign_id: str, rater_id: str, item_id: int) -> None:
        with Session(self.engine) as session:
            _lock(session, campaign_id)
            assignment = self._assignment(session, campaign_id, item_id, rater_id)
            if assignment.status != "open":
                raise Conflict(f"item {item_id} is {assignment.status}, not open")
            assignment.status, assignment.expires_at, assignment.updated_at = "skipped", None, now()
            session.commit()

    def undo(self, campaign_id: str, rater_id: str) -> int:
        """Reopen the rater's last judged or skipped item (its judgement deleted); returns its id."""
        with Session(self.engine) as session:
            campaign = _lock(session, campaign_id)
            stamp = now()
            last = session.scalars(select(AssignmentRow).where(
                AssignmentRow.campaign_id == campaign_id, AssignmentRow.rater_id == rater_id,
                AssignmentRow.status.in_(("done", "skipped")))
                .order_by(AssignmentRow.updated_at.desc(), AssignmentRow.assignment_id.desc()).limit(1)).first()
            if last is None:
                raise Conflict("nothing to undo")
            k = campaign.judgements_per_item
            item = session.get(RatingItemRow, last.item_id)
            if item.judgements >= k:
                raise Conflict(f"item {item.item_id} is closed: it has all its judgements")
            # An undone judgement turns into a hold on its own place; an undone skip needs a free one.
            if last.status == "skipped" and not _free(session, item, k, rater_id, stamp):
                raise Conflict(f"another rater took the place you skipped on item {item.item_id}: "
                               "it cannot be reopened now")
            if last.status == "done":
                session.execute(delete(FeedbackRow).where(FeedbackRow.feedback_id == last.feedback_id))
                item.judgements -= 1
            # The item the rater held instead goes back to the others.
            session.execute(delete(AssignmentRow).where(
                AssignmentRow.campaign_id == campaign_id, AssignmentRow.rater_id == rater_id,
                AssignmentRow.status == "open"))
            last.status, last.feedback_id, last.expires_at, last.updated_at = "open", None, stamp + self.lease, stamp
            session.commit()
            return item.item_id

    def progress(self, campaign_id: str, rater_id: str = "") -> Progress:
        campaign = self.get(campaign_id)
        with Session(self.engine) as session:
            items, closed, judgements = session.execute(select(
                func.count(), func.count().filter(RatingItemRow.judgements >= campaign.judgements_per_item),
                func.coalesce(func.sum(RatingItemRow.judgements), 0),
            ).where(RatingItemRow.campaign_id == campaign_id)).one()
            skips = session.scalar(select(func.count()).select_from(AssignmentRow).where(
                AssignmentRow.campaign_id == campaign_id, AssignmentRow.status == "skipped"))
            mine = dict(session.execute(
                select(AssignmentRow.status, func.count()).where(
                    AssignmentRow.campaign_id == campaign_id, AssignmentRow.rater_id == rater_id)
                .group_by(AssignmentRow.status)).all()) if rater_id else {}
        return Progress(items, closed, judgements, skips, mine.get("done", 0),
                        mine.get("skipped", 0))

    def judged(self, campaign_id: str) -> tuple[list[Judged], dict[str, int]]:
        """Every stored judgement of the campaign, and the skips per rater."""
        with Session(self.engine) as session:
            rows = session.execute(select(FeedbackRow.rater_id, FeedbackRow.item_id, FeedbackRow.kind,
                                          FeedbackRow.judgement).where(FeedbackRow.campaign_id == campaign_id)
                                   .order_by(FeedbackRow.seq)).all()
            skips = dict(session.execute(select(AssignmentRow.rater_id, func.count()).where(
                AssignmentRow.campaign_id == campaign_id, AssignmentRow.status == "skipped")
                .group_by(AssignmentRow.rater_id)).all())
        return [Judged(*row) for row in rows], skips

    @staticmethod
    def _assignment(session: Session, campaign_id: str, item_id: int, rater_id: str) -> AssignmentRow:
        assignment = session.scalars(select(AssignmentRow).where(
            AssignmentRow.campaign_id == campaign_id, AssignmentRow.item_id == item_id,
            AssignmentRow.rater_id == rater_id)).first()
        if assignment is None:
            raise Conflict(f"item {item_id} is not assigned to you: ask for your next item first")
        return assignment


def _free(session: Session, item: RatingItemRow, k: int, rater_id: str, stamp: datetime.datetime) -> bool:
    """Whether the item has a place for `rater_id`: its judgements and the live holds of others leave one."""
    held = session.scalar(select(func.count()).select_from(AssignmentRow).where(
        AssignmentRow.item_id == item.item_id, AssignmentRow.rater_id != rater_id, AssignmentRow.status == "open",
        AssignmentRow.expires_at > stamp))
    return item.judgements + held < k


def _lock(session: Session, campaign_id: str) -> CampaignRow:
    """Start the campaign's critical section (see the module's docstring) and return its row."""
    touched = session.execute(update(CampaignRow).where(CampaignRow.campaign_id == campaign_id)
                              .values(updated_at=now()))
    if touched.rowcount == 0:
        raise NotFound(f"no campaign {campaign_id!r}")
    return session.get(CampaignRow, campaign_id)
