"""Issue 11, money edges: days are the site's days, and a settlement is one snapshot.

An Asia/Shanghai breakfast at 07:30 is 23:30 UTC the evening before: it belongs to the
local day in the settlement and the reconciliation, from the ledger the API uses (which
knows the site's zone) and from `scgw canteen` (which reads it from the site file). On
PostgreSQL the settlement and its cross-check read one snapshot, so postings landing on the
same day in between cannot make them disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from device_drivers.vocabulary import Reason
from gateway.app.cli_canteen import app as canteen_cli
from gateway.canteen import reports
from gateway.canteen.ledger import BatchPayment, Ledger
from gateway.store.db import make_engine, upgrade

SHANGHAI = ZoneInfo("Asia/Shanghai")
BREAKFAST = datetime(2026, 3, 2, 7, 30, tzinfo=SHANGHAI).timestamp()  # 2026-03-01 23:30 UTC


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_a_shanghai_breakfast_is_settled_on_its_local_day(
    engine: Engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(engine, clock=lambda: BREAKFAST, timezone="Asia/Shanghai")
    ledger.topup("r-1", 1000, "topup-key-1")
    assert ledger.pay("canteen-1", "t-1", 1200, "r-1", BREAKFAST).approved is False
    assert ledger.pay("canteen-1", "t-2", 800, "r-1", BREAKFAST).approved
    ledger.apply_batch("canteen-1", "b-1", [BatchPayment("o-1", 900, Reason.UNKNOWN_CARD,
                                                         BREAKFAST - 60)])
    # The ledger the API is given counts in the site's zone unless told otherwise.
    assert [r.sales_cents for r in ledger.settle(date(2026, 3, 2))] == [800]
    assert ledger.settle(date(2026, 3, 1)) == []
    assert [r.txn_id for r in ledger.reconcile(date(2026, 3, 2))] == ["o-1"]
    # `scgw canteen` takes the zone from the site file; --tz only overrides it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "site.yaml").write_text(
        f"site: {{id: s, timezone: Asia/Shanghai}}\ndatabase: {{url: '{database_url}'}}\n")
    runner = CliRunner()
    local = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-02"])
    assert local.exit_code == 0, local.output
    assert "2026-03-02,canteen-1,1,800," in local.output and "Asia/Shanghai" in local.output
    utc = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-02", "--tz", "UTC"])
    assert utc.exit_code == 0 and "2026-03-02,TOTAL,0,0," in utc.output
    shortfalls = runner.invoke(canteen_cli, ["reconcile", "--date", "2026-03-02"])
    assert shortfalls.exit_code == 0 and ",o-1," in shortfalls.output


def test_settlement_and_its_cross_check_read_one_snapshot(engine: Engine) -> None:
    ledger = Ledger(engine, clock=lambda: BREAKFAST, timezone="Asia/Shanghai")
    ledger.topup("r-1", 10_000, "topup-key-1")
    ledger.pay("canteen-1", "t-1", 800, "r-1", BREAKFAST)
    day = date(2026, 3, 2)
    with reports.snapshot(engine) as conn:
        rows = reports.settle(conn, day, SHANGHAI)
        # Meanwhile another till posts on the same day (PostgreSQL lets it commit).
        if engine.dialect.name == "postgresql":
            ledger.pay("canteen-2", "t-2", 500, "r-1", BREAKFAST)
        revenue = reports.revenue_on(conn, day, SHANGHAI)
    assert sum(r.net_cents for r in rows) == revenue == 800
    rows, revenue = ledger.settle_checked(day)
    expected = 1300 if engine.dialect.name == "postgresql" else 800
    assert sum(r.net_cents for r in rows) == revenue == expected
