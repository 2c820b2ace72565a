"""audit export and retention (issue 18): an index on the audit records' time

`audit list --since T` and retention (coordinator/auditretention.py) select records by time; the chain's
new start after a retention cut lives in `meta` (key `audit_base`), so no other table changes.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_time", "audit", ["time"])


def downgrade() -> None:
    op.drop_index("ix_audit_time", table_name="audit")
