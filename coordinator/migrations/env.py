"""Alembic environment: migrations run on the connection the coordinator hands over at start."""

from __future__ import annotations

from alembic import context

from coordinator.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through coordinator.db.engine.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
