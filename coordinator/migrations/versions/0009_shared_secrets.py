"""signing key and relay secret shared by replicas, encrypted at rest; replica heartbeats and node presence
(issue 16)

`shared_secrets`: one row per secret the replicas must agree on (coordinator/sharedsecrets.py), sealed
with the at-rest key (`--secrets-key-file` / `$COORDINATOR_SECRETS_KEY`), whose id is kept beside it so
that a wrong key is recognised as such. `replicas` and `node_presence` (coordinator/presence.py): which
replica is alive (heartbeat in the database's clock) and which node holds a map stream on which replica.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shared_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False, index=True),
    )
    op.create_table(
        "node_presence",
        sa.Column("node_id", sa.Integer(), sa.ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column(
            "replica_id", sa.String(32), sa.ForeignKey("replicas.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("since", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("node_presence")
    op.drop_table("replicas")
    op.drop_table("shared_secrets")
