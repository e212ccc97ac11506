"""Keys are tenants: a job records the name of the API key that created it (`owner`; NULL with
auth off), the bytes of text it stores (`bytes`, for the per-key and service-wide quotas) and
when it last had a turn of the job loops (`last_turn`, so that the loops take turns between
keys instead of draining the oldest job first).

Jobs stored before this revision get their size in characters, near enough for a quota that
counts them until they expire.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as table:  # SQLite alters by copying the table
        table.add_column(sa.Column("owner", sa.String(64)))
        table.add_column(sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"))
        table.add_column(sa.Column("last_turn", sa.Float))
    jobs = sa.table("jobs", sa.column("id"), sa.column("bytes"))
    job_texts = sa.table("job_texts", sa.column("job_id"), sa.column("text"))
    stored = (
        sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(job_texts.c.text)), 0))
        .where(job_texts.c.job_id == jobs.c.id)
        .scalar_subquery()
    )
    op.execute(jobs.update().values(bytes=stored))
    op.create_index("jobs_by_owner", "jobs", ["owner", "status"])


def downgrade() -> None:
    op.drop_index("jobs_by_owner", "jobs")
    with op.batch_alter_table("jobs") as table:
        table.drop_column("last_turn")
        table.drop_column("bytes")
        table.drop_column("owner")
