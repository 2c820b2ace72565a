"""advertised and approved subnet routes and exit nodes (issue 17)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "routes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("node_id", sa.Integer, sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prefix", sa.String(64), nullable=False),
        sa.Column("advertised", sa.Boolean, nullable=False),
        sa.Column("approved", sa.Boolean, nullable=False),
        sa.UniqueConstraint("node_id", "prefix", name="uq_routes_node_prefix"),
    )


def downgrade() -> None:
    op.drop_table("routes")
