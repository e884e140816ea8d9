"""Payment decisions as pure functions: validation, outcome, offline risk limits.

The transactional service feeds these plain values read under a lock and writes what they
return; keeping the arithmetic here lets the property tests and the terminal simulator use
the very same rules the gateway applies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from device_drivers.vocabulary import Reason

# 10,000.00 per payment: far above any meal, low enough to catch a misplaced decimal point.
MAX_AMOUNT_CENTS = 1_000_000
MAX_TOPUP_CENTS = 10_000_000
TXN_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable ASCII, no spaces
ACCOUNT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
# An offline sale is refused as malformed when its ts lies further in the future than clock
# skew explains, or further back than any outage a terminal's queue could have survived.
# Every path an offline item takes checks it (a new sale, a retry of one refused online).
MAX_BATCH_FUTURE_S = 60.0
MAX_BATCH_AGE_S = 7 * 24 * 3600.0


class Status(StrEnum):
    APPROVED = "approved"
    REFUSED = "refused"
    # An offline sale the purse could not (fully) cover: what it could cover is debited, the
    # rest goes to the reconciliation report.
    SHORTFALL = "shortfall"


Resolution = str | Reason
"""What credential resolution yields: the purse's account id, or why it was refused."""


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """The answer a terminal gets (CONTRACT.md `payment/result`), stored on first decision.

    `shortfall_cents` extends the contract: non-zero only for an offline sale that the purse
    could not cover (then `approved` is false with `insufficient_funds`).
    """

    txn_id: str
    approved: bool
    balance_cents: int | None
    reason: Reason | None
    shortfall_cents: int = 0

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "txn_id": self.txn_id,
            "approved": self.approved,
            "balance_cents": self.balance_cents,
            "reason": None if self.reason is None else self.reason.value,
        }
        if self.shortfall_cents:
            wire["shortfall_cents"] = self.shortfall_cents
        return wire


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """A payment whose credential has already been resolved."""

    terminal_id: str
    txn_id: str
    amount_cents: int
    resolution: Resolution
    ts: float
    offline: bool = False
    batch_id: str | None = None
    # Set when the credential was a QR/BLE token: see `token_key` in mqtt_handler.
    token_key: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    reason: Reason | None
    debit_cents: int
    shortfall_cents: int


def validate_payment(terminal_id: str, txn_id: str, amount_cents: object, ts: object) -> str | None:
    """Why a payment request cannot be processed, or None when it can."""
    if not ACCOUNT_ID_PATTERN.fullmatch(terminal_id):
        return f"terminal id {terminal_id!r} is not a valid id"
    problem = validate_id(txn_id, "txn_id")
    if problem is not None:
        return problem
    if not isinstance(amount_cents, int) or isinstance(amount_cents, bool):
        return "amount_cents must be an integer number of cents"
    if not 0 < amount_cents <= MAX_AMOUNT_CENTS:
        return f"amount_cents must be between 1 and {MAX_AMOUNT_CENTS}"
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return "ts must be a finite number of Unix seconds"
    return None


def validate_id(value: object, name: str) -> str | None:
    """Why a terminal-chosen id (txn_id, batch_id) cannot be stored, or None when it can."""
    if not isinstance(value, str) or not TXN_ID_PATTERN.fullmatch(value):
        return f"{name} must be 1-64 printable ASCII characters without spaces"
    return None


def validate_account_id(account_id: str) -> str | None:
    if not ACCOUNT_ID_PATTERN.fullmatch(account_id):
        return f"account id {account_id!r} is not a valid id"
    return None


def validate_idempotency_key(key: str) -> str | None:
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        return "idempotency_key must be 8-128 characters of letters, digits and . _ : -"
    return None


def offline_ts_problem(ts: float, now: float) -> str | None:
    """Why an offline sale's ts is not believable, or None."""
    if not math.isfinite(ts):
        return "ts must be a finite number of Unix seconds"
    if ts > now + MAX_BATCH_FUTURE_S:
        return f"ts lies more than {MAX_BATCH_FUTURE_S:.0f} s in the future"
    if ts < now - MAX_BATCH_AGE_S:
        return f"ts is older than {MAX_BATCH_AGE_S / 86400:.0f} days"
    return None


def decide(balance_cents: int, amount_cents: int, offline: bool) -> Outcome:
    """Debit when covered; online refuse otherwise; offline take what is there, note the rest.

    An offline sale has already happened (the meal was served while the terminal could not
    reach the gateway), so refusing it would lose the debt; it is never dropped.
    """
    if balance_cents >= amount_cents:
        return Outcome(Status.APPROVED, None, amount_cents, 0)
    if not offline:
        return Outcome(Status.REFUSED, Reason.INSUFFICIENT_FUNDS, 0, 0)
    covered = max(balance_cents, 0)
    return Outcome(Status.SHORTFALL, Reason.INSUFFICIENT_FUNDS, covered, amount_cents - covered)


def refused_credential(reason: Reason, amount_cents: int, offline: bool) -> Outcome:
    """An unresolvable credential: online refused; offline the whole amount is a shortfall."""
    return Outcome(Status.REFUSED, reason, 0, amount_cents if offline else 0)


def over_offline_limit(amount_cents: int) -> Outcome:
    """An offline sale beyond the per-card or per-terminal limit: nothing is debited, the
    whole amount goes to staff review as a shortfall (the terminal should not have sold it;
    if it did, the meal was served and someone must look at it)."""
    return Outcome(Status.REFUSED, Reason.OFFLINE_LIMIT, 0, amount_cents)


def result_of(txn_id: str, outcome: Outcome, balance_cents: int | None) -> PaymentResult:
    return PaymentResult(
        txn_id=txn_id,
        approved=outcome.status is Status.APPROVED,
        balance_cents=balance_cents,
        reason=outcome.reason,
        shortfall_cents=outcome.shortfall_cents,
    )


def retry_result(stored: PaymentResult, stored_amount: int, amount_cents: int) -> PaymentResult:
    """A repeated txn_id gets the first result, unless it now claims another amount."""
    if stored_amount == amount_cents:
        return stored
    return PaymentResult(stored.txn_id, False, stored.balance_cents, Reason.AMOUNT_MISMATCH)


def as_resolution(value: str | Reason) -> Resolution:
    """Accept a resolver that returns refusal reasons as plain strings."""
    if isinstance(value, Reason):
        return value
    try:
        return Reason(value)
    except ValueError:
        return value


