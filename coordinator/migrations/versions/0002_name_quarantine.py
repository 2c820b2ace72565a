"""quarantine: removed or renamed nodes' names and addresses kept from new nodes for a while

Revision ID: 0002
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, index=True),
        sa.Column("ipv4", sa.String(45), nullable=True, index=True),
        sa.Column("node_id", sa.Integer, nullable=False),
        sa.Column("until", sa.Float, nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("quarantine")
