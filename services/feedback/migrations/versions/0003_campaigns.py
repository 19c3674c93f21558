"""Campaigns: each rating item belongs to one, raters hold assignments, feedback names its item.

The queue of 0002 becomes the campaign "default" (one rater per item, choices, 1-5 ratings
and corrections); items judged there become done assignments of the rater who judged them.

Revision ID: 0003
Revises: 0002
"""

import datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

DEFAULT = "default"


def upgrade() -> None:
    now = datetime.datetime.now(datetime.UTC)
    campaigns = op.create_table(
        "campaigns",
        sa.Column("campaign_id", sa.String(64), primary_key=True),
        sa.Column("title", sa.String(256), nullable=False),
        sa.Column("guidelines", sa.Text, nullable=False),
        sa.Column("judgements", sa.JSON, nullable=False),
        sa.Column("rating_scale", sa.Integer, nullable=False),
        sa.Column("judgements_per_item", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.bulk_insert(campaigns, [{
        "campaign_id": DEFAULT, "title": "Which response is better?", "guidelines": "",
        "judgements": ["choice", "rating", "correction"], "rating_scale": 5, "judgements_per_item": 1,
        "created_at": now, "updated_at": now,
    }])
    op.create_table(
        "assignments",
        sa.Column("assignment_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("campaign_id", sa.String(64), nullable=False),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("rating_items.item_id"), nullable=False),
        sa.Column("rater_id", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("feedback_id", sa.String(128), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("item_id", "rater_id", name="uq_assignments_item_rater"),
    )
    op.create_index("ix_assignments_campaign_id", "assignments", ["campaign_id"])
    op.create_index("ix_assignments_item_id", "assignments", ["item_id"])
    op.create_index("ix_assignments_rater_id", "assignments", ["rater_id"])
    with op.batch_alter_table("feedback") as table:
        table.add_column(sa.Column("campaign_id", sa.String(64), nullable=True))
        table.add_column(sa.Column("item_id", sa.Integer, nullable=True))
        table.create_index("ix_feedback_campaign_id", ["campaign_id"])
        table.create_index("ix_feedback_item_id", ["item_id"])
    with op.batch_alter_table("rating_items") as table:
        table.add_column(sa.Column("campaign_id", sa.String(64), nullable=False, server_default=DEFAULT))
        table.add_column(sa.Column("judgements", sa.Integer, nullable=False, server_default="0"))

    # The items judged in the old queue: done by their rater, closed (k = 1), and the feedback names them.
    op.execute(sa.text(
        "INSERT INTO assignments (campaign_id, item_id, rater_id, status, feedback_id, updated_at) "
        "SELECT :campaign, i.item_id, f.rater_id, 'done', f.feedback_id, f.created_at "
        "FROM rating_items i JOIN feedback f ON f.feedback_id = i.feedback_id").bindparams(campaign=DEFAULT))
    op.execute(sa.text("UPDATE rating_items SET judgements = 1 WHERE feedback_id IS NOT NULL"))
    op.execute(sa.text(
        "UPDATE feedback SET campaign_id = :campaign, item_id = "
        "(SELECT i.item_id FROM rating_items i WHERE i.feedback_id = feedback.feedback_id) "
        "WHERE feedback_id IN (SELECT feedback_id FROM rating_items WHERE feedback_id IS NOT NULL)"
    ).bindparams(campaign=DEFAULT))

    with op.batch_alter_table("rating_items") as table:
        table.drop_index("ix_rating_items_feedback_id")
        table.drop_column("feedback_id")
        table.alter_column("campaign_id", server_default=None)
        table.alter_column("judgements", server_default=None)
        table.create_index("ix_rating_items_campaign_id", ["campaign_id"])
        table.create_foreign_key("fk_rating_items_campaign", "campaigns", ["campaign_id"], ["campaign_id"])


def downgrade() -> None:
    raise NotImplementedError("0003 does not downgrade: restore the database from a backup")
