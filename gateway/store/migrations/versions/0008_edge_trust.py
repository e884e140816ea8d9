"""Edge trust: durable single-use tokens, gateway presence, terminals' offline windows,
audit sequence numbers and actors (issue 11).

Revision ID: 0008_edge_trust
Revises: 0007_alerts

- `spent_tokens`: every QR/BLE token ever presented, by key (never the token); the first
  writer wins, so a token opens once across readers, processes and restarts
  (gateway/access/spent.py).
- `gateway_uptime`: each gateway process's connected stretches and the highest audit
  sequence number it handed out (gateway/access/presence.py).
- `terminal_offline_periods`: when a canteen terminal was seen offline (its status and last
  will); offline sales outside these windows are refused (gateway/canteen/offline_windows.py).
- `audit_log`: `actor` (staff actions), `gw_instance` + `gw_seq` (unique together) so a
  missing decision shows as a gap in `scgw audit verify`.
- `canteen_payments`: an index on (terminal_id, request_ts) for the offline limits.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_edge_trust"
down_revision = "0007_alerts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spent_tokens",
        sa.Column("token_key", sa.String(64), nullable=False),
        sa.Column("token_ts", sa.Float, nullable=False),
        sa.Column("spent_at", sa.Float, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("use_ref", sa.String(200), nullable=False),
        sa.Column("gw_instance", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("token_key", name="pk_spent_tokens"),
    )
    op.create_index("ix_spent_tokens_token_ts", "spent_tokens", ["token_ts"])
    op.create_table(
        "gateway_uptime",
        sa.Column("instance_id", sa.String(32), nullable=False),
        sa.Column("segment", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("alive_at", sa.Float, nullable=False),
        sa.Column("seq_assigned", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "segment", name="pk_gateway_uptime"),
    )
    op.create_index("ix_gateway_uptime_alive_at", "gateway_uptime", ["alive_at"])
    op.create_table(
        "terminal_offline_periods",
        sa.Column("period_id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("seen_by", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("period_id", name="pk_terminal_offline_periods"),
    )
    op.create_index("ix_terminal_offline_periods_device", "terminal_offline_periods",
                    ["device_id", "started_at"])
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("actor", sa.String(64), nullable=True))
        batch.add_column(sa.Column("gw_instance", sa.String(32), nullable=True))
        batch.add_column(sa.Column("gw_seq", sa.BigInteger, nullable=True))
    op.create_index("ux_audit_log_gw_seq", "audit_log", ["gw_instance", "gw_seq"], unique=True)
    op.create_index("ix_canteen_payments_terminal_ts", "canteen_payments",
                    ["terminal_id", "request_ts"])


def downgrade() -> None:
    op.drop_index("ix_canteen_payments_terminal_ts", table_name="canteen_payments")
    op.drop_index("ux_audit_log_gw_seq", table_name="audit_log")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("gw_seq")
        batch.drop_column("gw_instance")
        batch.drop_column("actor")
    op.drop_index("ix_terminal_offline_periods_device", table_name="terminal_offline_periods")
    op.drop_table("terminal_offline_periods")
    op.drop_index("ix_gateway_uptime_alive_at", table_name="gateway_uptime")
    op.drop_table("gateway_uptime")
    op.drop_index("ix_spent_tokens_token_ts", table_name="spent_tokens")
    op.drop_table("spent_tokens")
