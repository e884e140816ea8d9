"""The rules consumer's writes (alert_log.py, DB-API) on both databases, read back through
the API's side (alerts.py, SQLAlchemy): one schema, two ways in, the same rows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.store.db import make_engine, upgrade
from gateway.telemetry.alert_log import AlertLog
from gateway.telemetry.alerts import AlertStore
from gateway.telemetry.local_db import LocalDb, LocalDbError
from rules.model import Transition

T0 = 1_763_800_000.0


def transition(state: str, ts: float, alert_id: str = "a-1") -> Transition:
    return Transition(alert_id, "r" * 70, "ahu-1", "power_w", state,  # type: ignore[arg-type]
                      "warning", 42.5, T0, ts, "too much power", {"building": "b1"})


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[AlertLog, AlertStore]]:
    upgrade(database_url)
    log, api = AlertLog(LocalDb(database_url)), AlertStore(make_engine(database_url))
    yield log, api
    log.db.close()
    api.engine.dispose()
    api.dispose()


def test_transitions_are_recorded_once_and_read_by_the_api(
        stores: tuple[AlertLog, AlertStore]) -> None:
    log, api = stores
    firing = transition("firing", T0 + 60)
    assert log.record([firing]) == [firing]
    assert log.record([firing]) == []  # a replay after a restart announces nothing again
    (shown,) = api.list_alerts()
    assert (shown.state, shown.value, shown.fired_at, shown.labels) == (
        "firing", 42.5, T0 + 60, {"building": "b1"})
    assert shown.rule_id == "r" * 64  # the column's width, not a refused batch
    assert api.ack("a-1", "engineer", T0 + 90) is not None
    resolved = transition("resolved", T0 + 120)
    assert log.record([resolved]) == [resolved]
    assert log.record([resolved]) == []
    after = api.get("a-1")
    assert after is not None
    assert (after.state, after.resolved_at, after.acked_by) == ("resolved", T0 + 120,
                                                                "engineer")


def test_the_engine_snapshot_is_saved_and_replaced(stores: tuple[AlertLog, AlertStore]) -> None:
    log, _ = stores
    assert log.load_state() is None
    log.save_state(10, "digest-1", b"\x00first", T0)
    log.save_state(25, "digest-2", b"\x00\xffsecond", T0 + 5)
    saved = log.load_state()
    assert saved is not None
    assert (saved.recno, saved.rules_digest, saved.snapshot) == (25, "digest-2",
                                                                 b"\x00\xffsecond")


def test_a_failed_transaction_leaves_nothing_and_the_next_one_works(
        stores: tuple[AlertLog, AlertStore]) -> None:
    log, api = stores
    with pytest.raises(LocalDbError), log.db.transaction() as cursor:
        cursor.execute(log.db.sql("INSERT INTO rules_state (name, recno, rules_digest, "
                                  "snapshot, saved_at) VALUES (?, ?, ?, ?, ?)"),
                       ("rules", 1, "d", b"s", T0))
        cursor.execute("SELECT no_such_column FROM rules_state")
    assert log.load_state() is None  # rolled back, and the connection came back
    assert log.record([transition("firing", T0 + 60, "a-2")])
    assert [a.alert_id for a in api.list_alerts()] == ["a-2"]
