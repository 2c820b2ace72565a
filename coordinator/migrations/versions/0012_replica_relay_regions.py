"""a relay region per replica; a node's relay home in the database (issue 16)

`replicas.relay`: the relay map entry of the replica's embedded relay (JSON), so every replica serves
every replica's region (coordinator/replicarelays.py). `nodes.relay_home`: the region a node made its
home, so every replica (and a restarted one) publishes the same home.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("relay_home", sa.Integer, nullable=True, server_default="1"))
    with op.batch_alter_table("replicas") as batch:
        batch.add_column(sa.Column("relay", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("relay")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("relay_home")
