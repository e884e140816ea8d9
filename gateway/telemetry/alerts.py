"""The alert lifecycle in the store: one row per alert, the engine's saved state, and the
queries behind `GET /api/v1/alerts` and `POST /api/v1/alerts/{id}/ack`.

Writers: the telemetry worker's rules consumer (transitions and the engine snapshot) and the
API (acknowledgements, which touch only the `acked_*` columns). Alert ids are deterministic
(rules.model.alert_id), so `record` is idempotent: after a restart the worker replays the
spool from its last saved snapshot, the engine emits the same transitions again, and only
those that change a row come back to be published. That is what keeps a restart from
re-firing (on MQTT, in InfluxDB) what was already announced.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    LargeBinary,
    String,
    Table,
    Text,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from gateway.store.db import read_engine
from gateway.store.metadata import metadata
from rules.model import Transition

log = logging.getLogger(__name__)

MAX_LIST = 1000

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


@dataclass(frozen=True, slots=True)
class SavedState:
    recno: int
    rules_digest: str
    snapshot: bytes


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert as the API lists it: the MQTT alert object plus its lifecycle columns."""

    alert_id: str
    rule_id: str
    device_id: str
    metric: str | None
    state: str
    severity: str
    value: float | None
    started_at: float
    ts: float
    message: str
    labels: dict[str, str]
    fired_at: float
    resolved_at: float | None
    acked_at: float | None
    acked_by: str | None


def _record(row: Any) -> AlertRecord:
    try:
        labels = json.loads(row.labels)
    except ValueError:
        labels = {}
    return AlertRecord(row.alert_id, row.rule_id, row.device_id, row.metric, row.state,
                       row.severity, row.value, row.started_at, row.updated_at, row.message,
                       labels if isinstance(labels, dict) else {}, row.fired_at,
                       row.resolved_at, row.acked_at, row.acked_by)


class AlertStore:
    """SQLAlchemy Core over `alerts` and `rules_state` (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = read_engine(engine)

    # ---- the worker's side ----------------------------------------------------------------

    def record(self, transitions: Sequence[Transition]) -> list[Transition]:
        """Apply transitions in one transaction; return those that changed a row (new)."""
        changed: list[Transition] = []
        with self.engine.begin() as conn:
            for t in transitions:
                if t.state == "firing":
                    exists = conn.execute(select(alerts.c.alert_id).where(
                        alerts.c.alert_id == t.alert_id)).first()
                    if exists is not None:
                        continue
                    conn.execute(alerts.insert().values(
                        alert_id=t.alert_id, rule_id=t.rule_id[:64], device_id=t.device_id[:64],
                        metric=t.metric, severity=t.severity, state="firing", value=t.value,
                        started_at=t.started_at, fired_at=t.ts, resolved_at=None,
                        updated_at=t.ts, message=t.message,
                        labels=json.dumps(dict(t.labels), sort_keys=True)))
                    changed.append(t)
                elif t.state == "resolved":
                    result = conn.execute(update(alerts).where(
                        alerts.c.alert_id == t.alert_id, alerts.c.state == "firing").values(
                        state="resolved", resolved_at=t.ts, updated_at=t.ts))
                    if result.rowcount:
                        changed.append(t)
        return changed

    def load_state(self, name: str = "rules") -> SavedState | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(rules_state).where(rules_state.c.name == name)).first()
        if row is None:
            return None
        return SavedState(row.recno, row.rules_digest, bytes(row.snapshot))

    def save_state(self, recno: int, rules_digest: str, snapshot: bytes, now: float,
                   name: str = "rules") -> None:
        values = {"recno": recno, "rules_digest": rules_digest, "snapshot": snapshot,
                  "saved_at": now}
        with self.engine.begin() as conn:
            done = conn.execute(update(rules_state).where(rules_state.c.name == name)
                                .values(**values)).rowcount
            if not done:
                try:
                    conn.execute(rules_state.insert().values(name=name, **values))
                except IntegrityError:  # pragma: no cover - one writer per name
                    raise

    # ---- the API's side -------------------------------------------------------------------

    def list_alerts(self, *, state: str | None = None, device_id: str | None = None,
                    since: float | None = None, limit: int = 200) -> list[AlertRecord]:
        """Newest first. `since` keeps alerts active at or after it (fired or resolved then,
        or still firing)."""
        query = select(alerts).order_by(alerts.c.fired_at.desc(), alerts.c.alert_id)
        if state is not None:
            query = query.where(alerts.c.state == state)
        if device_id is not None:
            query = query.where(alerts.c.device_id == device_id)
        if since is not None:
            query = query.where(alerts.c.updated_at >= since)
        with self._read.connect() as conn:
            rows = conn.execute(query.limit(max(1, min(limit, MAX_LIST)))).all()
        return [_record(row) for row in rows]

    def get(self, alert_id: str) -> AlertRecord | None:
        with self._read.connect() as conn:
            row = conn.execute(select(alerts).where(alerts.c.alert_id == alert_id)).first()
        return None if row is None else _record(row)

    def ack(self, alert_id: str, user: str, now: float) -> AlertRecord | None:
        """Acknowledge (first acknowledgement wins; repeating it is harmless); None: unknown."""
        with self.engine.begin() as conn:
            conn.execute(update(alerts).where(alerts.c.alert_id == alert_id,
                                              alerts.c.acked_at.is_(None))
                         .values(acked_at=now, acked_by=user[:64]))
            row = conn.execute(select(alerts).where(alerts.c.alert_id == alert_id)).first()
        return None if row is None else _record(row)

    def dispose(self) -> None:
        if self._read is not self.engine:
            self._read.dispose()
