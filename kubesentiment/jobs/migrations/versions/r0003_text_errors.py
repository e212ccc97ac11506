"""A text of a job can fail alone: `error` says why (over MAX_TEXT_TOKENS, say), and the rest
of its job goes on. A text with an error is done, like a scored one, and never claimed.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("job_texts") as table:  # SQLite alters by copying the table
        table.add_column(sa.Column("error", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("job_texts") as table:
        table.drop_column("error")
