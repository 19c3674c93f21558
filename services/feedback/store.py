"""Durable feedback storage on SQLAlchemy: SQLite for one machine, PostgreSQL when shared.

The schema (feedback, and the campaigns raters work through: campaigns, their items, and
each rater's assignment to an item) is owned by the Alembic migrations in `migrations/`,
applied at start. A write is committed (SQLite: WAL with synchronous=FULL) before `submit`
returns; a resubmission with the same feedback_id returns the stored row instead of
writing a second one.
"""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    case,
    cast,
    create_engine,
    event,
    literal,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

MIGRATIONS = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    pass


class FeedbackRow(Base):
    __tablename__ = "feedback"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # storage order
    feedback_id: Mapped[str] = mapped_column(String(128), unique=True)
    rater_id: Mapped[str] = mapped_column(String(256), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list[str]] = mapped_column(JSON)
    model_id: Mapped[str] = mapped_column(String(512))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # rating | choice | correction | tie
    judgement: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), index=True)
    campaign_id: Mapped[str | None] = mapped_column(String(64), index=True)  # set for a campaign item's judgement
    item_id: Mapped[int | None] = mapped_column(Integer, index=True)


class CampaignRow(Base):
    """A labelling campaign; its row is the lock that orders assignments (see campaigns.py)."""

    __tablename__ = "campaigns"

    campaign_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(256))
    guidelines: Mapped[str] = mapped_column(Text)  # markdown
    judgements: Mapped[list[str]] = mapped_column(JSON)  # choice | rating | correction | tie | both_bad
    rating_scale: Mapped[int] = mapped_column(Integer)
    judgements_per_item: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))  # last assignment change


class RatingItemRow(Base):
    """A prompt with responses for the raters of a campaign."""

    __tablename__ = "rating_items"

    item_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(String(64), ForeignKey("campaigns.campaign_id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list[str]] = mapped_column(JSON)
    model_id: Mapped[str] = mapped_column(String(512))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    judgements: Mapped[int] = mapped_column(Integer, default=0)  # stored judgements; closed at the campaign's k
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


class AssignmentRow(Base):
    """One rater's work on one item: open (held until expires_at), done (feedback_id) or skipped."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "rater_id", name="uq_assignments_item_rater"),)

    assignment_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(String(64), index=True)
    item_id: Mapped[int] = mapped_column(Integer, ForeignKey("rating_items.item_id"), index=True)
    rater_id: Mapped[str] = mapped_column(String(256), index=True)
    status: Mapped[str] = mapped_column(String(16))
    feedback_id: Mapped[str | None] = mapped_column(String(128))
    expires_at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Stored:
    """The outcome of a submit."""

    row: FeedbackRow
    already_stored: bool


class ConflictingResubmission(ValueError):
    """A feedback_id that was stored with different content."""


def content(row: FeedbackRow) -> tuple:
    """What a resubmission must repeat to be the same feedback."""
    return (row.rater_id, row.prompt, list(row.responses), row.model_id, row.policy_version, row.kind,
            json.dumps(row.judgement, sort_keys=True))


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` of the schema (Alembic `upgrade`), the newest by default."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)


def page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode()


def parse_page_token(token: str) -> int:
    """The last seq of the previous page; ValueError for a token this store did not make."""
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"page_token {token!r} is not one this server returned") from None


class FeedbackStore:
    """Feedback rows in a database given by a SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        self.url = url
        upgrade(url)
        sqlite = url.startswith("sqlite")
        # SQLite: writers queue on one lock; many raters at once can wait longer than its 5 s default.
        self.engine = create_engine(url, pool_pre_ping=True, connect_args={"timeout": 60} if sqlite else {})
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_durable)

    def close(self) -> None:
        self.engine.dispose()

    def submit(self, row: FeedbackRow) -> Stored:
        """Store `row` (feedback_id assigned when empty); durable on return."""
        row.feedback_id = row.feedback_id or uuid.uuid4().hex
        row.created_at = now()
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(row)
            try:
                session.commit()
                return Stored(row, already_stored=False)
            except IntegrityError as err:
                session.rollback()
                conflict = err
        existing = self.get(row.feedback_id)
        if existing is None:  # the conflict was not on feedback_id
            raise conflict
        if content(existing) != content(row):
            raise ConflictingResubmission(f"feedback_id {row.feedback_id!r} was stored with different content")
        return Stored(existing, already_stored=True)

    def get(self, feedback_id: str) -> FeedbackRow | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.scalars(select(FeedbackRow).where(FeedbackRow.feedback_id == feedback_id)).first()

    def list(self, *, rater_id: str = "", kind: str = "", created_after: datetime.datetime | None = None,
             after_seq: int = 0, limit: int | None = None) -> tuple[list[FeedbackRow], int | None]:
        """Rows oldest first after `after_seq`; with `limit`, also the seq to continue from (None at the end)."""
        query = select(FeedbackRow).where(FeedbackRow.seq > after_seq).order_by(FeedbackRow.seq)
        if rater_id:
            query = query.where(FeedbackRow.rater_id == rater_id)
        if kind:
            query = query.where(FeedbackRow.kind == kind)
        if created_after is not None:
            query = query.where(FeedbackRow.created_at >= created_after)
        if limit is not None:
            query = query.limit(limit + 1)
        with Session(self.engine, expire_on_commit=False) as session:
            rows = list(session.scalars(query))
        if limit is not None and len(rows) > limit:
            return rows[:limit], rows[limit - 1].seq
        return rows, None

    def units(self, *, campaign_id: str = "", created_after: datetime.datetime | None = None,
              after: tuple[int, int] | None = None, limit: int = 500,
              ) -> tuple[list[list[FeedbackRow]], tuple[int, int] | None]:
        """Feedback grouped by what was judged: every piece of feedback outside campaigns alone, in
        storage order, then all judgements of each campaign item together. Returns about `limit` rows in
        whole groups, and the key to go on from (None at the end)."""
        key = cast(case((FeedbackRow.item_id.is_(None), FeedbackRow.seq - literal(OUTSIDE, BigInteger)),
                        else_=FeedbackRow.item_id), BigInteger)

        def read(*where, limit: int | None) -> list:
            query = select(FeedbackRow, key).where(*where).order_by(key, FeedbackRow.seq).limit(limit)
            if campaign_id:
                query = query.where(FeedbackRow.campaign_id == campaign_id)
            if created_after is not None:
                query = query.where(FeedbackRow.created_at >= created_after)
            with Session(self.engine, expire_on_commit=False) as session:
                return list(session.execute(query))

        start = () if after is None else (or_(key > after[0], and_(key == after[0], FeedbackRow.seq > after[1])),)
        rows = read(*start, limit=limit + 1)
        more = len(rows) > limit
        groups: dict[int, list[FeedbackRow]] = {}
        for row, row_key in rows[:limit]:
            groups.setdefault(row_key, []).append(row)
        if not more:
            return list(groups.values()), None
        last_key = rows[limit - 1][1]
        if len(groups) > 1:  # the last group may go on in the next page: it is read whole there
            del groups[last_key]
        else:  # one item with more than `limit` judgements
            groups[last_key] += [r for r, _ in read(key == last_key, FeedbackRow.seq > rows[limit - 1][0].seq,
                                                   limit=None)]
        last = list(groups.values())[-1][-1]
        return list(groups.values()), (_key(last), last.seq)


OUTSIDE = 1 << 62  # feedback outside campaigns sorts before every item


def _key(row: FeedbackRow) -> int:
    return row.seq - OUTSIDE if row.item_id is None else row.item_id


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _sqlite_durable(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
