"""Alerts: the lifecycle of the rules engine's alerts and the engine's saved state.

Revision ID: 0007_alerts
Revises: 0006_telemetry

`alerts` holds one row per alert (deterministic id from rule, device and start), updated from
firing to resolved and acknowledged by an engineer; `rules_state` the engine's snapshot and
the spool record number it covers, so a restart resumes pending timers and firing alerts
instead of forgetting them or firing them again.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_alerts"
down_revision = "0006_telemetry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("alert_id", sa.String(32), nullable=False),
        sa.Column("rule_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(128), nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("fired_at", sa.Float, nullable=False),
        sa.Column("resolved_at", sa.Float, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("acked_at", sa.Float, nullable=True),
        sa.Column("acked_by", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("alert_id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_state_fired", "alerts", ["state", "fired_at"])
    op.create_index("ix_alerts_device_fired", "alerts", ["device_id", "fired_at"])
    op.create_index("ix_alerts_fired", "alerts", ["fired_at"])
    op.create_table(
        "rules_state",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("recno", sa.BigInteger, nullable=False),
        sa.Column("rules_digest", sa.String(64), nullable=False),
        sa.Column("snapshot", sa.LargeBinary, nullable=False),
        sa.Column("saved_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_rules_state"),
    )


def downgrade() -> None:
    op.drop_table("rules_state")
    op.drop_index("ix_alerts_fired", table_name="alerts")
    op.drop_index("ix_alerts_device_fired", table_name="alerts")
    op.drop_index("ix_alerts_state_fired", table_name="alerts")
    op.drop_table("alerts")
