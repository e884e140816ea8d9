"""The alerts in the store as the API sees them: the queries behind `GET /api/v1/alerts` and
`POST /api/v1/alerts/{id}/ack`.

Writers: the telemetry worker's rules consumer (transitions and the engine snapshot, see
gateway.telemetry.alert_log) and the API (acknowledgements, which touch only the `acked_*`
columns).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select, update

from gateway.store.db import read_engine
from gateway.telemetry.tables import alerts

log = logging.getLogger(__name__)

MAX_LIST = 1000


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
    """SQLAlchemy Core over `alerts` (SQLite or PostgreSQL), for the API."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = read_engine(engine)

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
