"""Audit: the hash-chained access decision log (gateway/access/audit.py).

Revision ID: 0004_audit
Revises: 0001_core
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_audit"
down_revision = "0001_core"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("device_kind", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("credential_type", sa.String(16), nullable=True),
        sa.Column("credential_ref", sa.String(64), nullable=True),
        sa.Column("resident_id", sa.String(64), nullable=True),
        sa.Column("visitor_pass_id", sa.String(64), nullable=True),
        sa.Column("granted", sa.Boolean, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("floors", sa.Text, nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_index("ix_audit_log_resident_id", "audit_log", ["resident_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_resident_id", table_name="audit_log")
    op.drop_index("ix_audit_log_ts", table_name="audit_log")
    op.drop_table("audit_log")
