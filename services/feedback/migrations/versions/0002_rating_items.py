"""The rater page's queue.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "rating_items",
        sa.Column("item_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("responses", sa.JSON, nullable=False),
        sa.Column("model_id", sa.String(512), nullable=False),
        sa.Column("policy_version", sa.BigInteger, nullable=False),
        sa.Column("feedback_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_rating_items_feedback_id", "rating_items", ["feedback_id"])


def downgrade() -> None:
    op.drop_table("rating_items")
