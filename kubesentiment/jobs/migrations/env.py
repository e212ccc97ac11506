"""Alembic's entry: always run by `store.migrate` on a connection it passes in."""

from __future__ import annotations

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
