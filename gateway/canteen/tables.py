"""The canteen ledger's tables (SQLAlchemy Core, on the shared metadata).

Money moves only by journal transactions whose entries sum to zero; entries, journal rows
and stored payment results are append-only (database triggers in migration 0003 refuse
UPDATE and DELETE on them, so a bug or a stray SQL session cannot rewrite history). The
cached `balance_cents` on an account is what the debit transaction locks and checks; the
CHECK constraint is the last line of defence against a negative purse.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
)

from gateway.store.metadata import metadata

PURSE = "purse"
SYSTEM = "system"

# System accounts cannot collide with resident ids: those never start with "@".
REVENUE_ACCOUNT = "@revenue"  # what the canteen has been paid
CASH_ACCOUNT = "@cash"  # money that came in from outside through top-ups
SYSTEM_ACCOUNTS = (CASH_ACCOUNT, REVENUE_ACCOUNT)  # also the order in which they are locked

# Tables that are only ever appended to.
IMMUTABLE_TABLES = ("canteen_journal", "canteen_entries", "canteen_payments")

canteen_accounts = Table(
    "canteen_accounts",
    metadata,
    Column("account_id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("balance_cents", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    CheckConstraint("kind IN ('purse', 'system')", name="kind"),
    # System accounts are the other side of every movement and may go negative.
    CheckConstraint("kind = 'system' OR balance_cents >= 0", name="balance_not_negative"),
)

canteen_journal = Table(
    "canteen_journal",
    metadata,
    Column("journal_id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("account_id", String(64), ForeignKey("canteen_accounts.account_id"), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("terminal_id", String(64), nullable=True),
    Column("txn_id", String(64), nullable=True),
    Column("idempotency_key", String(128), nullable=True),
    Column("posted_at", Float, nullable=False),
    CheckConstraint("kind IN ('payment', 'topup', 'refund')", name="kind"),
    CheckConstraint("amount_cents > 0", name="amount_positive"),
)
Index("ix_canteen_journal_posted_at", canteen_journal.c.posted_at)
Index("ix_canteen_journal_payment", canteen_journal.c.terminal_id, canteen_journal.c.txn_id)

canteen_entries = Table(
    "canteen_entries",
    metadata,
    Column("entry_id", Integer, primary_key=True, autoincrement=True),
    Column("journal_id", Integer, ForeignKey("canteen_journal.journal_id"), nullable=False),
    Column("account_id", String(64), ForeignKey("canteen_accounts.account_id"), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("balance_after_cents", BigInteger, nullable=False),
    CheckConstraint("amount_cents <> 0", name="amount_not_zero"),
)
Index("ix_canteen_entries_account_id", canteen_entries.c.account_id)
Index("ix_canteen_entries_journal_id", canteen_entries.c.journal_id)

canteen_payments = Table(
    "canteen_payments",
    metadata,
    Column("terminal_id", String(64), primary_key=True),
    Column("txn_id", String(64), primary_key=True),
    Column("amount_cents", BigInteger, nullable=False),
    Column("account_id", String(64), nullable=True),
    Column("offline", Boolean, nullable=False),
    Column("request_ts", Float, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(32), nullable=True),
    Column("debited_cents", BigInteger, nullable=False),
    Column("shortfall_cents", BigInteger, nullable=False),
    Column("balance_cents", BigInteger, nullable=True),
    Column("journal_id", Integer, ForeignKey("canteen_journal.journal_id"), nullable=True),
    Column("batch_id", String(64), nullable=True),
    Column("posted_at", Float, nullable=False),
    # For a payment whose QR/BLE token resolved to a purse: "kind:credential:step:nonce",
    # never the token itself (no tag). Unique, so one token pays at most once, however
    # late an offline upload brings it back.
    Column("token_key", String(64), nullable=True),
    CheckConstraint("status IN ('approved', 'refused', 'shortfall')", name="status"),
    CheckConstraint("debited_cents + shortfall_cents <= amount_cents", name="covered"),
)
Index("ix_canteen_payments_posted_at", canteen_payments.c.posted_at)
# A terminal's offline sales in one offline window: what the offline limits count.
Index("ix_canteen_payments_terminal_ts", canteen_payments.c.terminal_id,
      canteen_payments.c.request_ts)
Index("ix_canteen_payments_token_key", canteen_payments.c.token_key, unique=True)

canteen_shortfalls = Table(
    "canteen_shortfalls",
    metadata,
    Column("terminal_id", String(64), primary_key=True),
    Column("txn_id", String(64), primary_key=True),
    Column("account_id", String(64), nullable=True),
    Column("amount_cents", BigInteger, nullable=False),
    Column("covered_cents", BigInteger, nullable=False),
    Column("shortfall_cents", BigInteger, nullable=False),
    Column("reason", String(32), nullable=False),
    Column("over_limit", String(16), nullable=True),
    Column("request_ts", Float, nullable=False),
    Column("posted_at", Float, nullable=False),
    Column("resolved_at", Float, nullable=True),
    CheckConstraint("shortfall_cents > 0", name="shortfall_positive"),
)
Index("ix_canteen_shortfalls_posted_at", canteen_shortfalls.c.posted_at)

canteen_idempotency = Table(
    "canteen_idempotency",
    metadata,
    Column("idempotency_key", String(128), primary_key=True),
    Column("operation", String(16), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("terminal_id", String(64), nullable=True),
    Column("txn_id", String(64), nullable=True),
    Column("journal_id", Integer, ForeignKey("canteen_journal.journal_id"), nullable=False),
    Column("balance_cents", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)
