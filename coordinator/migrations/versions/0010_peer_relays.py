"""nodes that serve relay ports for other nodes (issue 14)

`coordinator nodes relay NAME on|off` sets `nodes.peer_relay`; the coordinator offers such a node as a
relay to pairs it is closer to than their region relay (coordinator/peerrelays.py).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("peer_relay", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("peer_relay")
