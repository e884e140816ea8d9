"""The rules consumer's side of the alert store: transitions and the engine's snapshot,
written by the telemetry worker through the DB-API (gateway.telemetry.local_db).

Alert ids are deterministic (rules.model.alert_id), so `record` is idempotent: after a
restart the worker replays the spool from its last saved snapshot, the engine emits the same
transitions again, and only those that change a row come back to be published. That is what
keeps a restart from re-firing (on MQTT, in InfluxDB) what was already announced. The API's
side (listing, acknowledging) is gateway.telemetry.alerts; both use the tables of
gateway.telemetry.tables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.telemetry.local_db import LocalDb
from rules.model import Transition


@dataclass(frozen=True, slots=True)
class SavedState:
    recno: int
    rules_digest: str
    snapshot: bytes


class AlertLog:
    def __init__(self, db: LocalDb) -> None:
        self.db = db

    def record(self, transitions: Sequence[Transition]) -> list[Transition]:
        """Apply transitions in one transaction; return those that changed a row (new)."""
        changed: list[Transition] = []
        sql = self.db.sql
        with self.db.transaction() as cursor:
            for t in transitions:
                if t.state == "firing":
                    cursor.execute(sql("SELECT 1 FROM alerts WHERE alert_id = ?"), (t.alert_id,))
                    if cursor.fetchone() is not None:
                        continue
                    cursor.execute(sql(
                        "INSERT INTO alerts (alert_id, rule_id, device_id, metric, severity, "
                        "state, value, started_at, fired_at, resolved_at, updated_at, message, "
                        "labels) VALUES (?, ?, ?, ?, ?, 'firing', ?, ?, ?, NULL, ?, ?, ?)"),
                        (t.alert_id, t.rule_id[:64], t.device_id[:64], t.metric, t.severity,
                         t.value, t.started_at, t.ts, t.ts, t.message,
                         json.dumps(dict(t.labels), sort_keys=True)))
                    changed.append(t)
                elif t.state == "resolved":
                    cursor.execute(sql(
                        "UPDATE alerts SET state = 'resolved', resolved_at = ?, updated_at = ? "
                        "WHERE alert_id = ? AND state = 'firing'"), (t.ts, t.ts, t.alert_id))
                    if cursor.rowcount:
                        changed.append(t)
        return changed

    def load_state(self, name: str = "rules") -> SavedState | None:
        rows = self.db.query("SELECT recno, rules_digest, snapshot FROM rules_state "
                             "WHERE name = ?", (name,))
        if not rows:
            return None
        recno, digest, snapshot = rows[0]
        return SavedState(int(recno), digest, bytes(snapshot))

    def save_state(self, recno: int, rules_digest: str, snapshot: bytes, now: float,
                   name: str = "rules") -> None:
        with self.db.transaction() as cursor:
            cursor.execute(self.db.sql(
                "INSERT INTO rules_state (name, recno, rules_digest, snapshot, saved_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "recno = excluded.recno, rules_digest = excluded.rules_digest, "
                "snapshot = excluded.snapshot, saved_at = excluded.saved_at"),
                (name, recno, rules_digest, snapshot, now))
