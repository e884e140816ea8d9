"""Read-only views of the ledger: balance, history, reconciliation, settlement, audit.

Days are calendar days in the site's time zone and bucket by posting time (when the
gateway wrote the movement), so a day's settlement never changes once the day is over,
even when an offline terminal uploads yesterday's sales this morning.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from sqlalchemy import Connection, Engine, func, select

from gateway.canteen.tables import (
    REVENUE_ACCOUNT,
    canteen_accounts,
    canteen_entries,
    canteen_journal,
    canteen_shortfalls,
)


@dataclass(frozen=True, slots=True)
class HistoryItem:
    journal_id: int
    kind: str  # payment | topup | refund
    amount_cents: int  # signed, as seen from the purse
    balance_cents: int  # after this movement
    terminal_id: str | None
    txn_id: str | None
    posted_at: float


@dataclass(frozen=True, slots=True)
class ShortfallRow:
    terminal_id: str
    txn_id: str
    account_id: str | None
    amount_cents: int
    covered_cents: int
    shortfall_cents: int
    reason: str
    over_limit: str | None
    request_ts: float
    posted_at: float


@dataclass(frozen=True, slots=True)
class SettlementRow:
    terminal_id: str
    payments: int
    sales_cents: int
    refunds: int
    refunds_cents: int
    shortfalls: int
    shortfall_cents: int

    @property
    def net_cents(self) -> int:
        return self.sales_cents - self.refunds_cents


@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A read transaction whose queries all see one snapshot of the ledger.

    PostgreSQL reads committed data per statement by default, so a settlement and its
    cross-check would see different postings on a day still receiving them (a false
    mismatch): REPEATABLE READ gives the whole transaction one snapshot. On SQLite every
    transaction is one snapshot already (the gateway's engine begins IMMEDIATE).
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def _iso(ts: float) -> str:
    """A timestamp for a report; one outside the calendar (never believable) as a number."""
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def day_bounds(day: date, tz: tzinfo = UTC) -> tuple[float, float]:
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    following = day + timedelta(days=1)
    end = datetime(following.year, following.month, following.day, tzinfo=tz)
    return start.timestamp(), end.timestamp()


def balance(conn: Connection, account_id: str) -> int:
    value = conn.execute(
        select(canteen_accounts.c.balance_cents).where(canteen_accounts.c.account_id == account_id)
    ).scalar_one_or_none()
    return 0 if value is None else int(value)


def history(conn: Connection, account_id: str, limit: int = 50) -> list[HistoryItem]:
    """Newest first."""
    j, e = canteen_journal.c, canteen_entries.c
    rows = conn.execute(
        select(e.journal_id, j.kind, e.amount_cents, e.balance_after_cents, j.terminal_id,
               j.txn_id, j.posted_at)
        .join_from(canteen_entries, canteen_journal, e.journal_id == j.journal_id)
        .where(e.account_id == account_id)
        .order_by(e.entry_id.desc())
        .limit(limit)
    ).all()
    return [HistoryItem(*row) for row in rows]


def reconcile(conn: Connection, day: date, tz: tzinfo = UTC) -> list[ShortfallRow]:
    """Offline sales posted on `day` that their purse could not cover."""
    start, end = day_bounds(day, tz)
    s = canteen_shortfalls.c
    rows = conn.execute(
        select(s.terminal_id, s.txn_id, s.account_id, s.amount_cents, s.covered_cents,
               s.shortfall_cents, s.reason, s.over_limit, s.request_ts, s.posted_at)
        .where(s.posted_at >= start, s.posted_at < end)
        .order_by(s.posted_at, s.terminal_id, s.txn_id)
    ).all()
    return [ShortfallRow(**row._mapping) for row in rows]


def settle(conn: Connection, day: date, tz: tzinfo = UTC) -> list[SettlementRow]:
    """Per terminal: what its sales took from purses, minus refunds, on `day`."""
    start, end = day_bounds(day, tz)
    j, s = canteen_journal.c, canteen_shortfalls.c
    moved: dict[tuple[str, str], tuple[int, int]] = {
        (terminal, kind): (count, total)
        for terminal, kind, count, total in conn.execute(
            select(j.terminal_id, j.kind, func.count(), func.sum(j.amount_cents))
            .where(j.posted_at >= start, j.posted_at < end, j.kind.in_(("payment", "refund")))
            .group_by(j.terminal_id, j.kind)
        ).all()
    }
    short: dict[str, tuple[int, int]] = {
        terminal: (count, total)
        for terminal, count, total in conn.execute(
            select(s.terminal_id, func.count(), func.sum(s.shortfall_cents))
            .where(s.posted_at >= start, s.posted_at < end)
            .group_by(s.terminal_id)
        ).all()
    }
    terminals = sorted({terminal for terminal, _ in moved} | set(short))
    return [
        SettlementRow(
            terminal_id=terminal,
            payments=moved.get((terminal, "payment"), (0, 0))[0],
            sales_cents=int(moved.get((terminal, "payment"), (0, 0))[1]),
            refunds=moved.get((terminal, "refund"), (0, 0))[0],
            refunds_cents=int(moved.get((terminal, "refund"), (0, 0))[1]),
            shortfalls=short.get(terminal, (0, 0))[0],
            shortfall_cents=int(short.get(terminal, (0, 0))[1]),
        )
        for terminal in terminals
    ]


def revenue_on(conn: Connection, day: date, tz: tzinfo = UTC) -> int:
    """The revenue account's net movement on `day`, straight from the entries."""
    start, end = day_bounds(day, tz)
    e, j = canteen_entries.c, canteen_journal.c
    total = conn.execute(
        select(func.coalesce(func.sum(e.amount_cents), 0))
        .join_from(canteen_entries, canteen_journal, e.journal_id == j.journal_id)
        .where(e.account_id == REVENUE_ACCOUNT, j.posted_at >= start, j.posted_at < end)
    ).scalar_one()
    return int(total)


SETTLEMENT_HEADER = ("date", "terminal_id", "payments", "sales_cents", "refunds",
                     "refunds_cents", "net_cents", "shortfalls", "shortfall_cents")


def settlement_csv(day: date, rows: Sequence[SettlementRow]) -> str:
    """The settlement as CSV with a final TOTAL row (what the canteen is owed that day)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SETTLEMENT_HEADER)
    for r in rows:
        writer.writerow((day.isoformat(), r.terminal_id, r.payments, r.sales_cents, r.refunds,
                         r.refunds_cents, r.net_cents, r.shortfalls, r.shortfall_cents))
    writer.writerow((day.isoformat(), "TOTAL", sum(r.payments for r in rows),
                     sum(r.sales_cents for r in rows), sum(r.refunds for r in rows),
                     sum(r.refunds_cents for r in rows), sum(r.net_cents for r in rows),
                     sum(r.shortfalls for r in rows), sum(r.shortfall_cents for r in rows)))
    return out.getvalue()


RECONCILE_HEADER = ("posted_at", "terminal_id", "txn_id", "account_id", "amount_cents",
                    "covered_cents", "shortfall_cents", "reason", "over_limit", "sale_ts")


def reconcile_csv(rows: Sequence[ShortfallRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RECONCILE_HEADER)
    for r in rows:
        writer.writerow((
            _iso(r.posted_at),
            r.terminal_id, r.txn_id, r.account_id or "", r.amount_cents, r.covered_cents,
            r.shortfall_cents, r.reason, r.over_limit or "",
            _iso(r.request_ts),
        ))
    return out.getvalue()


def audit(conn: Connection) -> list[str]:
    """Every way the stored ledger disagrees with itself; empty when it is sound."""
    e, a = canteen_entries.c, canteen_accounts.c
    problems = []
    for journal_id, total in conn.execute(
        select(e.journal_id, func.sum(e.amount_cents))
        .group_by(e.journal_id).having(func.sum(e.amount_cents) != 0)
    ).all():
        problems.append(f"journal {journal_id} does not balance: entries sum to {total}")
    sums = dict(conn.execute(
        select(e.account_id, func.sum(e.amount_cents)).group_by(e.account_id)
    ).all())
    for account_id, kind, cached in conn.execute(
        select(a.account_id, a.kind, a.balance_cents)
    ).all():
        derived = int(sums.get(account_id, 0))
        if cached != derived:
            problems.append(f"account {account_id}: cached {cached} != entries {derived}")
        if kind == "purse" and cached < 0:
            problems.append(f"purse {account_id} is negative: {cached}")
    return problems


def audit_engine(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return audit(conn)
