"""The telemetry tables: the local store (rollups, latest values, the spool cursor), the
alerts and the rules engine's snapshot.

One definition, SQLAlchemy's, for the migrations (0006, 0007, checked against it by the
tests) and for the gateway's reads (`/api/v1/energy/series`, the alerts routes). The
telemetry worker writes the same tables through the DB-API (gateway.telemetry.local_db),
naming these columns in its statements; tests/test_rollups.py and tests/test_alert_log.py
run those statements against the migrated schema of both databases.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from gateway.store.metadata import metadata
from gateway.telemetry.rollups import MAX_METRIC_LEN

telemetry_rollups = Table(
    "telemetry_rollups",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("metric", String(MAX_METRIC_LEN), primary_key=True),
    Column("minute", BigInteger, primary_key=True, autoincrement=False),  # epoch s, start
    Column("min", Float, nullable=False),
    Column("max", Float, nullable=False),
    Column("sum", Float, nullable=False),
    Column("count", Integer, nullable=False),
    Column("last", Float, nullable=False),
    Column("last_ts", Float, nullable=False),
    # prune() deletes by age across all series; without this it would scan the table.
    Index("ix_telemetry_rollups_minute", "minute"),
)

telemetry_latest = Table(
    "telemetry_latest",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("ts", Float, nullable=False),
    Column("metrics", Text, nullable=False),  # JSON object: metric -> value
    Column("seq", BigInteger, nullable=True),
)

telemetry_cursor = Table(
    "telemetry_cursor",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("recno", BigInteger, nullable=False),
)

alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", String(32), primary_key=True),
    Column("rule_id", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("metric", String(128), nullable=True),
    Column("severity", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("value", Float, nullable=True),
    Column("started_at", Float, nullable=False),
    Column("fired_at", Float, nullable=False),
    Column("resolved_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("message", Text, nullable=False),
    Column("labels", Text, nullable=False),
    Column("acked_at", Float, nullable=True),
    Column("acked_by", String(64), nullable=True),
    Index("ix_alerts_state_fired", "state", "fired_at"),
    Index("ix_alerts_device_fired", "device_id", "fired_at"),
    Index("ix_alerts_fired", "fired_at"),
)

rules_state = Table(
    "rules_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("recno", BigInteger, nullable=False),
    Column("rules_digest", String(64), nullable=False),
    Column("snapshot", LargeBinary, nullable=False),
    Column("saved_at", Float, nullable=False),
)
