"""ephemeral pre-auth keys and nodes (issue 17)

Revision ID: 0004
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a NOT NULL column with ALTER TABLE alone in every version
    for table in ("preauth_keys", "nodes"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("ephemeral", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    for table in ("nodes", "preauth_keys"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("ephemeral")
