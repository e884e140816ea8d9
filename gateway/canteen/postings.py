"""The ledger's SQL primitives, used inside the service's transactions.

Statements on the payment path are built once at import: constructing a Core statement
per call cost more than the SQLite work itself (about 100 us each), which mattered for the
500 durable payments/s target.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from device_drivers.vocabulary import Reason
from gateway.canteen.policy import PaymentResult, Status
from gateway.canteen.tables import (
    PURSE,
    canteen_accounts,
    canteen_entries,
    canteen_idempotency,
    canteen_journal,
    canteen_payments,
    canteen_shortfalls,
)


class LedgerError(Exception):
    """A top-up or refund that cannot be done; the message is safe to show to staff."""


class InvalidRequest(LedgerError):
    pass


class IdempotencyConflict(LedgerError):
    """The key was already used for a different operation, account or amount."""


class UnknownPayment(LedgerError):
    pass


class RefundRefused(LedgerError):
    pass


_A, _J, _P = canteen_accounts.c, canteen_journal.c, canteen_payments.c
_LOCK_PURSES = (
    select(_A.account_id, _A.balance_cents)
    .where(_A.account_id.in_(bindparam("ids", expanding=True)), _A.kind == PURSE)
    .order_by(_A.account_id)
    .with_for_update()
)
_MOVE = (
    update(canteen_accounts)
    .where(_A.account_id == bindparam("b_account"))
    .values(balance_cents=_A.balance_cents + bindparam("b_delta"))
    .returning(_A.balance_cents)
)
_ADD_JOURNAL = insert(canteen_journal).returning(_J.journal_id)
_ADD_ENTRIES = insert(canteen_entries)
_ADD_PAYMENT = insert(canteen_payments)
_ADD_SHORTFALL = insert(canteen_shortfalls)
_PAYMENT = select(canteen_payments).where(
    _P.terminal_id == bindparam("b_terminal"), _P.txn_id == bindparam("b_txn")
)
_TOKEN_USED = select(_P.txn_id).where(_P.token_key == bindparam("b_token")).limit(1)
_PAYMENTS = select(canteen_payments).where(
    _P.terminal_id == bindparam("b_terminal"), _P.txn_id.in_(bindparam("b_txns", expanding=True))
)


@dataclass(frozen=True, slots=True)
class StoredPayment:
    """A payment decided earlier: what a retry of it is answered with."""

    terminal_id: str
    txn_id: str
    amount_cents: int
    account_id: str | None
    status: Status
    offline: bool
    result: PaymentResult


@dataclass(frozen=True, slots=True)
class Receipt:
    journal_id: int
    account_id: str
    amount_cents: int
    balance_cents: int
    replayed: bool  # True when the idempotency key had already done this


def insert_ignore(conn: Connection, table: Any, values: dict[str, Any]) -> None:
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(dialect_insert(table).values(**values).on_conflict_do_nothing())


def stored_payment(row: RowMapping) -> StoredPayment:
    reason = row["reason"]
    result = PaymentResult(
        txn_id=row["txn_id"],
        approved=row["status"] == Status.APPROVED.value,
        balance_cents=row["balance_cents"],
        reason=None if reason is None else Reason(reason),
        shortfall_cents=row["shortfall_cents"],
    )
    return StoredPayment(
        row["terminal_id"], row["txn_id"], row["amount_cents"], row["account_id"],
        Status(row["status"]), bool(row["offline"]), result,
    )


def lock_purses(conn: Connection, account_ids: Iterable[str]) -> dict[str, int]:
    wanted = sorted(set(account_ids))
    if not wanted:
        return {}
    rows = conn.execute(_LOCK_PURSES, {"ids": wanted}).all()
    return {account_id: balance for account_id, balance in rows}



def post(
    conn: Connection,
    kind: str,
    purse_id: str,
    purse_delta: int,
    system_id: str,
    now: float,
    terminal_id: str | None = None,
    txn_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[int, int]:
    """Move money between a purse and a system account; returns (journal id, balance)."""
    purse_balance = conn.execute(
        _MOVE, {"b_account": purse_id, "b_delta": purse_delta}
    ).scalar_one()
    system_balance = conn.execute(
        _MOVE, {"b_account": system_id, "b_delta": -purse_delta}
    ).scalar_one()
    journal_id = conn.execute(_ADD_JOURNAL, {
        "kind": kind, "account_id": purse_id, "amount_cents": abs(purse_delta),
        "terminal_id": terminal_id, "txn_id": txn_id, "idempotency_key": idempotency_key,
        "posted_at": now,
    }).scalar_one()
    conn.execute(_ADD_ENTRIES, [
        {"journal_id": journal_id, "account_id": purse_id, "amount_cents": purse_delta,
         "balance_after_cents": purse_balance},
        {"journal_id": journal_id, "account_id": system_id, "amount_cents": -purse_delta,
         "balance_after_cents": system_balance},
    ])
    return journal_id, int(purse_balance)


def load_payment(conn: Connection, terminal_id: str, txn_id: str) -> StoredPayment | None:
    row = conn.execute(
        _PAYMENT, {"b_terminal": terminal_id, "b_txn": txn_id}
    ).mappings().first()
    return None if row is None else stored_payment(row)



def replay(
    conn: Connection, key: str, operation: str, account_id: str, amount_cents: int,
    terminal_id: str | None = None, txn_id: str | None = None,
) -> Receipt | None:
    row = conn.execute(
        select(canteen_idempotency).where(canteen_idempotency.c.idempotency_key == key)
    ).mappings().first()
    if row is None:
        return None
    if (row["operation"], row["account_id"], row["amount_cents"], row["terminal_id"],
            row["txn_id"]) != (operation, account_id, amount_cents, terminal_id, txn_id):
        raise IdempotencyConflict(
            "this idempotency_key was already used for a different request"
        )
    return Receipt(row["journal_id"], account_id, amount_cents, row["balance_cents"], True)

def remember(
    conn: Connection, now: float, key: str, operation: str, account_id: str, amount_cents: int,
    journal_id: int, balance: int, terminal_id: str | None = None,
    txn_id: str | None = None,
) -> Receipt:
    conn.execute(insert(canteen_idempotency).values(
        idempotency_key=key, operation=operation, account_id=account_id,
        amount_cents=amount_cents, terminal_id=terminal_id, txn_id=txn_id,
        journal_id=journal_id, balance_cents=balance, created_at=now,
    ))
    return Receipt(journal_id, account_id, amount_cents, balance, False)



def load_payments(
    conn: Connection, terminal_id: str, txn_ids: list[str]
) -> dict[str, StoredPayment]:
    rows = conn.execute(
        _PAYMENTS, {"b_terminal": terminal_id, "b_txns": txn_ids}
    ).mappings().all()
    return {row["txn_id"]: stored_payment(row) for row in rows}


def token_used(conn: Connection, token_key: str) -> bool:
    """Whether a stored payment was made with this QR/BLE token already."""
    return conn.execute(_TOKEN_USED, {"b_token": token_key}).first() is not None


def record_payment(conn: Connection, values: dict[str, Any]) -> None:
    conn.execute(_ADD_PAYMENT, values)


def record_shortfall(conn: Connection, values: dict[str, Any]) -> None:
    conn.execute(_ADD_SHORTFALL, values)
