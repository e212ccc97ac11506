"""Jobs and their texts, as the store kept them before it was versioned (created only where
missing, so an existing SQLite file of that time is adopted as it is).

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
        if_not_exists=True,
    )
    op.create_table(
        "job_texts",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("label", sa.String(16)),
        sa.Column("score", sa.Float),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("job_texts")
    op.drop_table("jobs")
