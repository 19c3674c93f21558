"""Durable feedback storage on SQLAlchemy: SQLite for one machine, PostgreSQL when shared.

The schema is owned by the Alembic migrations in `migrations/`, applied at start. A write
is committed (SQLite: WAL with synchronous=FULL) before `submit` returns; a resubmission
with the same feedback_id returns the stored row instead of writing a second one.
"""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Text, create_engine, event, func, select
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
    kind: Mapped[str] = mapped_column(String(16), index=True)  # rating | choice | correction
    judgement: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), index=True)


class RatingItemRow(Base):
    """A prompt with responses waiting for a rater (the rater page's queue)."""

    __tablename__ = "rating_items"

    item_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list[str]] = mapped_column(JSON)
    model_id: Mapped[str] = mapped_column(String(512))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    feedback_id: Mapped[str | None] = mapped_column(String(128), index=True)  # set once judged
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Stored:
    """The outcome of a submit."""

    row: FeedbackRow
    already_stored: bool


class ConflictingResubmission(ValueError):
    """A feedback_id that was stored with different content."""


def _content(row: FeedbackRow) -> tuple:
    return (row.rater_id, row.prompt, list(row.responses), row.model_id, row.policy_version, row.kind,
            json.dumps(row.judgement, sort_keys=True))


def upgrade(url: str) -> None:
    """Bring the database at `url` to the newest schema (Alembic `upgrade head`)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


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
        self.engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_durable)

    def close(self) -> None:
        self.engine.dispose()

    def submit(self, row: FeedbackRow, item_id: int | None = None) -> Stored:
        """Store `row` (feedback_id assigned when empty); durable on return. With `item_id`, the
        rating item it judges leaves the queue in the same transaction."""
        row.feedback_id = row.feedback_id or uuid.uuid4().hex
        row.created_at = datetime.datetime.now(datetime.UTC)
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(row)
            if item_id is not None:
                session.get(RatingItemRow, item_id).feedback_id = row.feedback_id
            try:
                session.commit()
                return Stored(row, already_stored=False)
            except IntegrityError as err:
                session.rollback()
                conflict = err
        existing = self.get(row.feedback_id)
        if existing is None:  # the conflict was not on feedback_id
            raise conflict
        if _content(existing) != _content(row):
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


    def add_items(self, items: list[RatingItemRow]) -> int:
        """Queue items for raters; returns how many are pending now."""
        now = datetime.datetime.now(datetime.UTC)
        with Session(self.engine) as session:
            for item in items:
                item.created_at = now
            session.add_all(items)
            session.commit()
        return self.pending()

    def pending(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(RatingItemRow)
                                  .where(RatingItemRow.feedback_id.is_(None)))

    def next_item(self) -> RatingItemRow | None:
        """The oldest item nobody has judged yet."""
        with Session(self.engine, expire_on_commit=False) as session:
            return session.scalars(select(RatingItemRow).where(RatingItemRow.feedback_id.is_(None))
                                   .order_by(RatingItemRow.item_id).limit(1)).first()

    def item(self, item_id: int) -> RatingItemRow | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(RatingItemRow, item_id)


def _sqlite_durable(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
