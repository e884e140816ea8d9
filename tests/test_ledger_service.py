"""The canteen ledger against real SQLite and PostgreSQL: exactly once, never negative."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from device_drivers.offline_sales import OfflineLimits
from device_drivers.vocabulary import Reason
from gateway.app.cli_canteen import app as canteen_cli
from gateway.canteen import reports
from gateway.canteen.ledger import (
    BatchPayment,
    IdempotencyConflict,
    InvalidRequest,
    Ledger,
    RefundRefused,
    UnknownPayment,
)
from gateway.canteen.tables import canteen_entries, canteen_journal
from gateway.store.db import make_engine, upgrade
from gateway.store.metadata import metadata

NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOON)


@pytest.fixture
def ledger(engine: Engine, clock: Clock) -> Ledger:
    return Ledger(engine, OfflineLimits(per_card_cents=1000, per_terminal_cents=2500), clock)


def payment_journals(engine: Engine, terminal: str, txn: str) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(
            select(canteen_journal.c.amount_cents).where(
                canteen_journal.c.kind == "payment", canteen_journal.c.terminal_id == terminal,
                canteen_journal.c.txn_id == txn,
            )
        ).scalars())


def test_payment_debits_once_and_a_retry_gets_the_first_result(ledger: Ledger) -> None:
    ledger.topup("r-1", 2000, "topup-key-1")
    first = ledger.pay("pos-1", "t-1", 1500, "r-1", NOON)
    assert first.to_wire() == {
        "txn_id": "t-1", "approved": True, "balance_cents": 500, "reason": None,
    }
    ledger.topup("r-1", 5000, "topup-key-2")
    assert ledger.pay("pos-1", "t-1", 1500, "r-1", NOON) == first
    # The retry is answered from the store even if the credential no longer resolves.
    assert ledger.pay("pos-1", "t-1", 1500, Reason.REPLAYED_TOKEN, NOON) == first
    assert payment_journals(ledger.engine, "pos-1", "t-1") == [1500]
    assert ledger.balance("r-1") == 5500
    # The same txn_id on another terminal is another payment.
    assert ledger.pay("pos-2", "t-1", 1500, "r-1", NOON).balance_cents == 4000
    assert ledger.audit() == []


def test_same_txn_id_with_another_amount_is_amount_mismatch(ledger: Ledger) -> None:
    ledger.topup("r-1", 2000, "topup-key-1")
    ledger.pay("pos-1", "t-1", 500, "r-1", NOON)
    mismatch = ledger.pay("pos-1", "t-1", 600, "r-1", NOON)
    assert (mismatch.approved, mismatch.reason) == (False, Reason.AMOUNT_MISMATCH)
    assert ledger.pay("pos-1", "t-1", 500, "r-1", NOON).approved
    assert payment_journals(ledger.engine, "pos-1", "t-1") == [500]
    assert ledger.balance("r-1") == 1500


def test_refusals_carry_contract_reasons_and_stay_refused(ledger: Ledger) -> None:
    ledger.topup("r-1", 300, "topup-key-1")
    poor = ledger.pay("pos-1", "t-1", 500, "r-1", NOON)
    assert poor.to_wire() == {
        "txn_id": "t-1", "approved": False, "balance_cents": 300,
        "reason": "insufficient_funds",
    }
    revoked = ledger.pay("pos-1", "t-2", 100, Reason.REVOKED, NOON)
    assert (revoked.approved, revoked.reason, revoked.balance_cents) == (
        False, Reason.REVOKED, None)
    no_purse = ledger.pay("pos-1", "t-3", 100, "r-without-purse", NOON)
    assert (no_purse.reason, no_purse.balance_cents) == (Reason.INSUFFICIENT_FUNDS, 0)
    # A refusal is a result too: topping up does not turn the retry into a debit.
    ledger.topup("r-1", 1000, "topup-key-2")
    assert ledger.pay("pos-1", "t-1", 500, "r-1", NOON) == poor
    assert ledger.balance("r-1") == 1300
    for txn in ("t-1", "t-2", "t-3"):
        assert payment_journals(ledger.engine, "pos-1", txn) == []


def test_malformed_payments_are_answered_and_not_stored(ledger: Ledger) -> None:
    ledger.topup("r-1", 2000, "topup-key-1")
    for txn_id, amount in [("t-1", 0), ("t-1", -5), ("t-1", 10**9), ("t-1", True), ("", 100),
                           ("x" * 65, 100), ("bad id", 100)]:
        result = ledger.pay("pos-1", txn_id, amount, "r-1", NOON)
        assert (result.approved, result.reason) == (False, Reason.MALFORMED_REQUEST)
        assert ledger.lookup("pos-1", txn_id) is None
    assert ledger.pay("pos-1", "t-1", 100, "r-1", float("nan")).reason is Reason.MALFORMED_REQUEST
    assert ledger.balance("r-1") == 2000


def test_fifty_concurrent_payments_against_ten_meals_approve_exactly_ten(
    database_url: str, engine: Engine
) -> None:
    Ledger(engine).topup("r-1", 10 * 700, "topup-key-1")
    # NullPool: every thread works on its own connection, as separate gateway workers would.
    separate = make_engine(database_url, poolclass=NullPool)
    ledger = Ledger(separate)
    start = threading.Barrier(50)

    def pay(i: int) -> bool:
        start.wait()
        return ledger.pay("pos-1", f"t-{i}", 700, "r-1", NOON).approved

    try:
        with ThreadPoolExecutor(50) as pool:
            approved = list(pool.map(pay, range(50)))
    finally:
        separate.dispose()
    assert approved.count(True) == 10
    check = Ledger(engine)
    assert check.balance("r-1") == 0
    assert check.audit() == []
    with engine.connect() as conn:
        journals = conn.execute(
            select(func.count()).select_from(canteen_journal)
            .where(canteen_journal.c.kind == "payment")
        ).scalar_one()
    assert journals == 10


def test_one_txn_id_sent_a_hundred_times_makes_one_entry(
    database_url: str, engine: Engine
) -> None:
    Ledger(engine).topup("r-1", 5000, "topup-key-1")
    separate = make_engine(database_url, poolclass=NullPool)
    ledger = Ledger(separate)
    start = threading.Barrier(20)

    def concurrent(_: int) -> object:
        start.wait()
        return ledger.pay("pos-1", "t-same", 1200, "r-1", NOON)

    try:
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(concurrent, range(20)))
        results += [ledger.pay("pos-1", "t-same", 1200, "r-1", NOON) for _ in range(40)]
        with ThreadPoolExecutor(8) as pool:
            results += list(pool.map(
                lambda _: ledger.pay("pos-1", "t-same", 1200, "r-1", NOON), range(40)))
    finally:
        separate.dispose()
    assert len(results) == 100
    assert all(r == results[0] for r in results)
    assert results[0].approved and results[0].balance_cents == 3800  # type: ignore[attr-defined]
    assert payment_journals(engine, "pos-1", "t-same") == [1200]
    with engine.connect() as conn:
        entries = conn.execute(
            select(func.count()).select_from(canteen_entries)
            .where(canteen_entries.c.account_id == "r-1")
        ).scalar_one()
    assert entries == 2  # the top-up and the one payment


REWRITES = [
    "UPDATE canteen_entries SET amount_cents = amount_cents * 2",
    "DELETE FROM canteen_entries",
    "UPDATE canteen_journal SET amount_cents = 1",
    "DELETE FROM canteen_journal",
    "UPDATE canteen_payments SET status = 'refused'",
    "DELETE FROM canteen_payments",
    "UPDATE canteen_accounts SET balance_cents = -1 WHERE account_id = 'r-1'",
]


def test_the_database_refuses_to_rewrite_history(ledger: Ledger) -> None:
    ledger.topup("r-1", 1000, "topup-key-1")
    ledger.pay("pos-1", "t-1", 400, "r-1", NOON)
    for statement in REWRITES:
        with pytest.raises(DBAPIError), ledger.engine.begin() as conn:
            conn.execute(text(statement))
    if ledger.engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError), ledger.engine.begin() as conn:
            conn.execute(text("TRUNCATE canteen_entries CASCADE"))
    assert ledger.balance("r-1") == 600
    assert len(ledger.history("r-1")) == 2
    assert ledger.audit() == []


def test_offline_batch_applies_in_order_and_reports_what_it_could_not_cover(
    ledger: Ledger, clock: Clock
) -> None:
    ledger.topup("r-1", 1000, "topup-key-1")
    batch = [
        BatchPayment("o-1", 600, "r-1", NOON - 600),
        BatchPayment("o-2", 700, "r-1", NOON - 500),  # r-1 at 1300 > 1000: over the card limit
        BatchPayment("o-1", 600, "r-1", NOON - 600),  # duplicate in the upload
        BatchPayment("o-3", 800, Reason.UNKNOWN_CARD, NOON - 400),
        BatchPayment("o-4", 900, "r-2", NOON - 300),  # no purse at all
        BatchPayment("o-5", 300, "r-1", NOON - 200),  # the terminal at 2600 > 2500
    ]
    results = ledger.apply_batch("pos-1", "b-1", batch)
    assert [r.to_wire() for r in results] == [
        {"txn_id": "o-1", "approved": True, "balance_cents": 400, "reason": None},
        {"txn_id": "o-2", "approved": False, "balance_cents": 400,
         "reason": "offline_limit", "shortfall_cents": 700},
        {"txn_id": "o-3", "approved": False, "balance_cents": None, "reason": "unknown_card",
         "shortfall_cents": 800},
        {"txn_id": "o-4", "approved": False, "balance_cents": 0,
         "reason": "insufficient_funds", "shortfall_cents": 900},
        {"txn_id": "o-5", "approved": False, "balance_cents": 400,
         "reason": "offline_limit", "shortfall_cents": 300},
    ]
    # Beyond a limit nothing is debited: the sale goes to staff review, with whose it was.
    assert payment_journals(ledger.engine, "pos-1", "o-2") == []
    assert ledger.balance("r-1") == 400
    # Uploading the same batch again changes nothing and answers the same.
    assert ledger.apply_batch("pos-1", "b-1", batch) == results
    report = ledger.reconcile(date(2026, 3, 2))
    assert [(r.txn_id, r.account_id, r.covered_cents, r.shortfall_cents, r.reason,
             r.over_limit) for r in report] == [
        ("o-2", "r-1", 0, 700, "offline_limit", "card"),
        ("o-3", None, 0, 800, "unknown_card", None),
        ("o-4", "r-2", 0, 900, "insufficient_funds", None),
        ("o-5", "r-1", 0, 300, "offline_limit", "terminal"),
    ]
    assert ledger.reconcile(date(2026, 3, 1)) == []
    assert ledger.audit() == []


def test_refused_online_but_served_offline_lands_in_reconciliation(ledger: Ledger) -> None:
    ledger.topup("r-1", 100, "topup-key-1")
    online = ledger.pay("pos-1", "t-1", 500, "r-1", NOON)
    assert online.reason is Reason.INSUFFICIENT_FUNDS
    # The terminal never saw that answer, served the meal offline and uploads it.
    assert ledger.apply_batch("pos-1", "b-1", [BatchPayment("t-1", 500, "r-1", NOON)]) == [
        online]
    assert [(r.txn_id, r.shortfall_cents) for r in ledger.reconcile(date(2026, 3, 2))] == [
        ("t-1", 500)]
    assert ledger.balance("r-1") == 100


def test_topup_is_idempotent_by_key(database_url: str, ledger: Ledger) -> None:
    first = ledger.topup("r-1", 2500, "topup-key-1")
    again = ledger.topup("r-1", 2500, "topup-key-1")
    assert (again.journal_id, again.balance_cents, again.replayed) == (
        first.journal_id, 2500, True)
    with pytest.raises(IdempotencyConflict):
        ledger.topup("r-1", 9999, "topup-key-1")
    with pytest.raises(IdempotencyConflict):
        ledger.topup("r-2", 2500, "topup-key-1")
    separate = make_engine(database_url, poolclass=NullPool)
    concurrent = Ledger(separate)
    try:
        with ThreadPoolExecutor(10) as pool:
            receipts = list(pool.map(
                lambda _: concurrent.topup("r-3", 700, "topup-key-race"), range(10)))
    finally:
        separate.dispose()
    assert len({r.journal_id for r in receipts}) == 1
    assert [r.replayed for r in receipts].count(False) == 1
    assert ledger.balance("r-1") == 2500 and ledger.balance("r-3") == 700
    for bad in [("r-1", 0, "topup-key-x"), ("r-1", 100, "short"), ("@cash", 100, "topup-key-y"),
                ("bad id", 100, "topup-key-z")]:
        with pytest.raises(InvalidRequest):
            ledger.topup(*bad)
    assert ledger.audit() == []


def test_refunds_never_exceed_what_the_payment_took(ledger: Ledger) -> None:
    ledger.topup("r-1", 1000, "topup-key-1")
    ledger.topup("r-2", 1000, "topup-key-2")
    ledger.pay("pos-1", "t-1", 800, "r-1", NOON)
    receipt = ledger.refund("r-1", "pos-1", "t-1", 300, "refund-key-1")
    assert receipt.balance_cents == 500
    assert ledger.refund("r-1", "pos-1", "t-1", 300, "refund-key-1").replayed
    with pytest.raises(RefundRefused, match="500 remain refundable"):
        ledger.refund("r-1", "pos-1", "t-1", 501, "refund-key-2")
    with pytest.raises(UnknownPayment):
        ledger.refund("r-2", "pos-1", "t-1", 100, "refund-key-3")
    with pytest.raises(UnknownPayment):
        ledger.refund("r-1", "pos-1", "t-404", 100, "refund-key-4")
    ledger.refund("r-1", "pos-1", "t-1", 500, "refund-key-5")
    assert ledger.balance("r-1") == 1000
    history = ledger.history("r-1")
    assert [(h.kind, h.amount_cents, h.balance_cents) for h in history] == [
        ("refund", 500, 1000), ("refund", 300, 500), ("payment", -800, 200),
        ("topup", 1000, 1000),
    ]
    assert ledger.audit() == []


def test_settlement_per_terminal_equals_the_ledger(
    database_url: str, ledger: Ledger, clock: Clock, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger.topup("r-1", 5000, "topup-key-1")
    ledger.pay("pos-1", "t-1", 1200, "r-1", NOON)
    ledger.pay("pos-2", "t-1", 800, "r-1", NOON)
    ledger.refund("r-1", "pos-1", "t-1", 200, "refund-key-1")
    ledger.apply_batch("pos-2", "b-1", [BatchPayment("o-1", 900, Reason.REVOKED, NOON)])
    clock.now = NOON + 86400  # next day: not in the 2026-03-02 settlement
    ledger.pay("pos-1", "t-2", 100, "r-1", NOON)
    rows = ledger.settle(date(2026, 3, 2))
    assert [(r.terminal_id, r.payments, r.sales_cents, r.refunds_cents, r.net_cents,
             r.shortfall_cents) for r in rows] == [
        ("pos-1", 1, 1200, 200, 1000, 0), ("pos-2", 1, 800, 0, 800, 900),
    ]
    with ledger.engine.connect() as conn:
        assert reports.revenue_on(conn, date(2026, 3, 2)) == 1800
    # 12:00 UTC is 20:00 in Shanghai, the same day; on Kiritimati (UTC+14) the next one.
    assert ledger.settle(date(2026, 3, 2), ZoneInfo("Asia/Shanghai")) == rows
    assert ledger.settle(date(2026, 3, 3), ZoneInfo("Pacific/Kiritimati")) == rows

    # The CLI counts the day in the site file's zone: Kiritimati's 3 March holds UTC noon
    # of 2 March. A UTC default would have handed over an empty settlement for the 3rd.
    site = tmp_path / "site.yaml"
    site.write_text("site: {id: s, timezone: Pacific/Kiritimati}\n"
                    f"database: {{url: '{database_url}'}}\n")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-03", "--config", str(site)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("date,terminal_id,payments,sales_cents")
    assert lines[-1] == "2026-03-03,TOTAL,2,2000,1,200,1800,1,900"
    assert "(site s, Pacific/Kiritimati)" in result.stderr
    result = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-02"])  # ./site.yaml
    assert result.exit_code == 0 and result.stdout.splitlines()[-1].startswith(
        "2026-03-02,TOTAL,0,0,"), result.output
    result = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-02", "--tz", "UTC"])
    assert result.stdout.splitlines()[-1] == "2026-03-02,TOTAL,2,2000,1,200,1800,1,900"
    result = runner.invoke(canteen_cli, ["reconcile", "--date", "2026-03-03", "-c", str(site)])
    assert result.exit_code == 0, result.output
    assert ",pos-2,o-1,,900,0,900,revoked," in result.stdout
    result = runner.invoke(canteen_cli, ["settle", "--date", "2 March", "-c", str(site)])
    assert result.exit_code == 2 and "is not a date" in result.output
    # Without a site file every setting must be given: never a default database or zone.
    site.unlink()
    result = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-02",
                                         "--database-url", database_url])
    assert result.exit_code == 2
    assert "site.yaml: no such site file; give --config FILE, or --tz" in result.stderr
    result = runner.invoke(canteen_cli, ["reconcile", "--date", "2026-03-02"])
    assert result.exit_code == 2 and "or --database-url and --tz" in result.stderr
    result = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-02",
                                         "--database-url", database_url, "--tz", "UTC"])
    assert result.exit_code == 0 and "(UTC)" in result.stderr, result.output
    result = runner.invoke(canteen_cli, ["settle", "--date", "2026-03-02",
                                         "--database-url", database_url, "--tz", "Mars/Olympus"])
    assert result.exit_code == 2 and "unknown time zone" in result.output


def test_migration_creates_exactly_the_ledger_tables(engine: Engine) -> None:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    ours = [d for d in diffs if "canteen_" in repr(d)]
    assert ours == []
