"""Leases: a worker claims unscored texts for a while; texts whose lease ran out (their worker
died) are claimed again. A partial index finds the unscored texts of a job without walking
past the scored ones.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("job_texts") as table:  # SQLite alters by copying the table
        table.add_column(sa.Column("lease_owner", sa.String(64)))
        table.add_column(sa.Column("lease_until", sa.Float))
    unscored = sa.text("label IS NULL")
    op.create_index(
        "job_texts_unscored",
        "job_texts",
        ["job_id", "idx"],
        postgresql_where=unscored,
        sqlite_where=unscored,
    )
    op.create_index("jobs_by_state", "jobs", ["status", "created"])


def downgrade() -> None:
    op.drop_index("jobs_by_state", "jobs")
    op.drop_index("job_texts_unscored", "job_texts")
    with op.batch_alter_table("job_texts") as table:
        table.drop_column("lease_until")
        table.drop_column("lease_owner")
