"""Telemetry: the local store behind /api/v1/energy/series (gateway/telemetry/rollups.py).

Revision ID: 0006_telemetry
Revises: 0005_merge_heads

1-minute rollups per device and metric (kept `telemetry.local_retention_days`, pruned by
`minute`, hence its index), the latest values per device, and the spool record number each
consumer has applied: stored in the same transaction as the rollups it produced, so a replay
of the spool after a crash never counts a reading twice.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_telemetry"
down_revision = "0005_merge_heads"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry_rollups",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("minute", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("min", sa.Float, nullable=False),
        sa.Column("max", sa.Float, nullable=False),
        sa.Column("sum", sa.Float, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("last", sa.Float, nullable=False),
        sa.Column("last_ts", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("device_id", "metric", "minute", name="pk_telemetry_rollups"),
    )
    op.create_index("ix_telemetry_rollups_minute", "telemetry_rollups", ["minute"])
    op.create_table(
        "telemetry_latest",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("device_id", name="pk_telemetry_latest"),
    )
    op.create_table(
        "telemetry_cursor",
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("recno", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("consumer", name="pk_telemetry_cursor"),
    )


def downgrade() -> None:
    op.drop_table("telemetry_cursor")
    op.drop_table("telemetry_latest")
    op.drop_index("ix_telemetry_rollups_minute", table_name="telemetry_rollups")
    op.drop_table("telemetry_rollups")
