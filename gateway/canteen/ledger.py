"""The ledger's transactional operations: pay, batch, top-up, refund.

Every operation is one database transaction that first locks the purses it touches (in
account-id order, then system accounts in a fixed order, so two transactions can never
wait on each other in a cycle), then re-reads what it decides on. On PostgreSQL the locks
are `SELECT ... FOR UPDATE` row locks; on SQLite the engine's `BEGIN IMMEDIATE` makes the
whole transaction the single writer. A result is returned only after its commit, so a
terminal that saw an answer will get the same answer on every retry, and a crash before the
commit leaves nothing behind for the retry to collide with.

Races that locks alone cannot order (two first attempts of one txn_id resolving to
different purses, or one idempotency key reused for two accounts) end in a unique-key
violation; the loser's transaction is retried and then finds the winner's row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, tzinfo
from typing import TypeVar

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import IntegrityError

from device_drivers.offline_sales import DEFAULT_LIMITS, OfflineExposure, OfflineLimits, OverLimit
from device_drivers.vocabulary import Reason
from gateway.canteen import policy, postings, reports
from gateway.canteen.policy import (
    PaymentRequest,
    PaymentResult,
    Status,
)
from gateway.canteen.postings import (
    IdempotencyConflict,
    InvalidRequest,
    LedgerError,
    Receipt,
    RefundRefused,
    StoredPayment,
    UnknownPayment,
)
from gateway.canteen.tables import (
    CASH_ACCOUNT,
    PURSE,
    REVENUE_ACCOUNT,
    SYSTEM,
    SYSTEM_ACCOUNTS,
    canteen_accounts,
    canteen_journal,
    canteen_payments,
    canteen_shortfalls,
)

__all__ = [
    "BatchPayment",
    "IdempotencyConflict",
    "InvalidRequest",
    "Ledger",
    "LedgerError",
    "Receipt",
    "RefundRefused",
    "StoredPayment",
    "UnknownPayment",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_ATTEMPTS = 5

@dataclass(frozen=True, slots=True)
class BatchPayment:
    """One sale a terminal made while offline, credential already resolved."""

    txn_id: str
    amount_cents: int
    resolution: policy.Resolution
    ts: float
    token_key: str | None = None  # when the credential was a QR/BLE token


class Ledger:
    """Stored-value purses for the canteen, exactly once per (terminal, txn_id).

    Methods are blocking (SQLAlchemy Core); the asyncio shell calls them in a worker thread.
    """

    def __init__(
        self,
        engine: Engine,
        limits: OfflineLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self._clock = clock
        with engine.begin() as conn:
            for account_id in SYSTEM_ACCOUNTS:
                postings.insert_ignore(conn, canteen_accounts, {
                    "account_id": account_id, "kind": SYSTEM, "balance_cents": 0,
                    "created_at": clock(),
                })

    # -- transactions -------------------------------------------------------------------

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except IntegrityError:
                if attempt == _ATTEMPTS:
                    raise
                log.info("ledger transaction lost a unique-key race; retrying (%d)", attempt)
        raise AssertionError("unreachable")

    # -- payments -----------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile the hot statements with a top-up and a payment that are rolled back, so
        the first real payment after a (re)start is as fast as the rest."""
        probe = PaymentRequest("warm-up", "warm-up", 1, "warm-up", 0.0,
                               token_key="warm-up")  # noqa: S106 - not a secret
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                postings.insert_ignore(conn, canteen_accounts, {
                    "account_id": "warm-up", "kind": PURSE, "balance_cents": 0,
                    "created_at": 0.0,
                })
                postings.lock_purses(conn, ["warm-up"])
                postings.post(conn, "topup", "warm-up", 1, CASH_ACCOUNT, 0.0)
                self._decide_one(conn, probe, {"warm-up": 1}, None)
                self._decide_one(conn, probe, {"warm-up": 0}, None)
                postings.load_payments(conn, "warm-up", ["warm-up"])
            finally:
                transaction.rollback()


    def lookup(self, terminal_id: str, txn_id: str) -> StoredPayment | None:
        """The stored first result, if this payment was decided already."""
        with self.engine.connect() as conn:
            return postings.load_payment(conn, terminal_id, txn_id)

    def lookup_many(self, terminal_id: str, txn_ids: Iterable[str]) -> dict[str, StoredPayment]:
        wanted = sorted(set(txn_ids))
        if not wanted:
            return {}
        with self.engine.connect() as conn:
            return postings.load_payments(conn, terminal_id, wanted)

    def pay(
        self,
        terminal_id: str,
        txn_id: str,
        amount_cents: int,
        resolution: policy.Resolution,
        ts: float,
        offline: bool = False,
        token_key: str | None = None,
    ) -> PaymentResult:
        """Debit once per (terminal, txn_id); every retry gets the first result.

        `token_key` identifies the single-use QR/BLE token the credential was (never the
        token itself): a second payment carrying the same key is refused as replayed_token.
        """
        request = PaymentRequest(terminal_id, txn_id, amount_cents, resolution, ts, offline,
                                 token_key=token_key)
        return self.pay_many([request])[0]

    def pay_many(
        self, requests: Sequence[PaymentRequest], over_limits: Sequence[OverLimit | None] = ()
    ) -> list[PaymentResult]:
        """Decide `requests` in order in one transaction (one fsync for all of them)."""
        if not requests:
            return []
        flags = list(over_limits) or [None] * len(requests)
        results: list[PaymentResult | None] = [None] * len(requests)
        valid: list[int] = []
        for i, req in enumerate(requests):
            problem = policy.validate_payment(req.terminal_id, req.txn_id, req.amount_cents, req.ts)
            if problem is None and req.batch_id is not None:
                problem = policy.validate_id(req.batch_id, "batch_id")
            if problem is None and req.token_key is not None and len(req.token_key) > 64:
                problem = "token_key must be at most 64 characters"
            if problem is None:
                valid.append(i)
            else:
                log.info("payment %r refused as malformed: %s", req.txn_id, problem)
                results[i] = PaymentResult(req.txn_id, False, None, Reason.MALFORMED_REQUEST)

        def work(conn: Connection) -> list[PaymentResult]:
            accounts = [requests[i].resolution for i in valid]
            purses = postings.lock_purses(conn, (a for a in accounts if not isinstance(a, Reason)))
            return [self._decide_one(conn, requests[i], purses, flags[i]) for i in valid]

        for i, result in zip(valid, self._transaction(work), strict=True):
            results[i] = result
        return [r for r in results if r is not None]

    def _decide_one(
        self, conn: Connection, req: PaymentRequest, purses: dict[str, int],
        over_limit: OverLimit | None,
    ) -> PaymentResult:
        existing = postings.load_payment(conn, req.terminal_id, req.txn_id)
        now = self._clock()
        if existing is not None:
            if (req.offline and not existing.offline and existing.status is Status.REFUSED
                    and existing.amount_cents == req.amount_cents):
                # Refused online, but the terminal timed out and served it offline: the
                # answer stays the first one, the unpaid meal goes to reconciliation.
                postings.insert_ignore(conn, canteen_shortfalls, {
                    "terminal_id": req.terminal_id, "txn_id": req.txn_id,
                    "account_id": existing.account_id, "amount_cents": req.amount_cents,
                    "covered_cents": 0, "shortfall_cents": req.amount_cents,
                    "reason": (existing.result.reason or Reason.INSUFFICIENT_FUNDS).value,
                    "over_limit": None if over_limit is None else over_limit.value,
                    "request_ts": req.ts, "posted_at": now,
                })
            return policy.retry_result(existing.result, existing.amount_cents, req.amount_cents)
        account_id: str | None = None
        balance: int | None = None
        token_key = None if isinstance(req.resolution, Reason) else req.token_key
        if token_key is not None and postings.token_used(conn, token_key):
            # The token paid already (maybe online, before an offline upload brought it
            # back under another txn_id): a single-use token never pays twice.
            log.info("payment %s/%s refused: its token paid already", req.terminal_id,
                     req.txn_id)
            token_key = None
            outcome = policy.refused_credential(Reason.REPLAYED_TOKEN, req.amount_cents,
                                               req.offline)
        elif isinstance(req.resolution, Reason):
            outcome = policy.refused_credential(req.resolution, req.amount_cents, req.offline)
        else:
            account_id = req.resolution
            balance = purses.get(account_id, 0)
            outcome = policy.decide(balance, req.amount_cents, req.offline)
        journal_id = None
        if outcome.debit_cents > 0 and account_id is not None:
            journal_id, balance = postings.post(
                conn, "payment", account_id, -outcome.debit_cents, REVENUE_ACCOUNT, now,
                terminal_id=req.terminal_id, txn_id=req.txn_id,
            )
            purses[account_id] = balance
        result = policy.result_of(req.txn_id, outcome, balance)
        postings.record_payment(conn, {
            "terminal_id": req.terminal_id, "txn_id": req.txn_id,
            "amount_cents": req.amount_cents, "account_id": account_id, "offline": req.offline,
            "request_ts": req.ts, "status": outcome.status.value,
            "reason": None if outcome.reason is None else outcome.reason.value,
            "debited_cents": outcome.debit_cents, "shortfall_cents": outcome.shortfall_cents,
            "balance_cents": balance, "journal_id": journal_id, "batch_id": req.batch_id,
            "posted_at": now, "token_key": token_key,
        })
        if outcome.shortfall_cents > 0:
            postings.record_shortfall(conn, {
                "terminal_id": req.terminal_id, "txn_id": req.txn_id, "account_id": account_id,
                "amount_cents": req.amount_cents, "covered_cents": outcome.debit_cents,
                "shortfall_cents": outcome.shortfall_cents,
                "reason": (outcome.reason or Reason.INSUFFICIENT_FUNDS).value,
                "over_limit": None if over_limit is None else over_limit.value,
                "request_ts": req.ts, "posted_at": now,
            })
            log.info("offline payment %s/%s not covered: shortfall %d cents (%s)",
                        req.terminal_id, req.txn_id, outcome.shortfall_cents, outcome.reason)
        return result

    def apply_batch(
        self, terminal_id: str, batch_id: str, payments: Sequence[BatchPayment]
    ) -> list[PaymentResult]:
        """Apply an offline terminal's sales in order; one result per distinct txn_id.

        Sales beyond the offline limits are applied all the same (they happened); the limit
        they broke is recorded with any shortfall so the report shows where risk came from.
        """
        seen: set[str] = set()
        unique = []
        for payment in payments:
            if payment.txn_id not in seen:
                seen.add(payment.txn_id)
                unique.append(payment)
        exposure = OfflineExposure()
        flags: list[OverLimit | None] = []
        requests = []
        for payment in unique:
            card_key = (f"refused:{payment.resolution}" if isinstance(payment.resolution, Reason)
                        else payment.resolution)
            flags.append(exposure.check(self.limits, card_key, payment.amount_cents))
            exposure = exposure.add(card_key, payment.amount_cents)
            requests.append(PaymentRequest(
                terminal_id, payment.txn_id, payment.amount_cents, payment.resolution,
                payment.ts, offline=True, batch_id=batch_id, token_key=payment.token_key,
            ))
        return self.pay_many(requests, flags)

    # -- staff operations ---------------------------------------------------------------

    def topup(self, account_id: str, amount_cents: int, idempotency_key: str) -> Receipt:
        """Credit a purse (opening it if new); the key makes a retried request harmless."""
        self._check_staff_request(account_id, amount_cents, idempotency_key,
                                  policy.MAX_TOPUP_CENTS)

        def work(conn: Connection) -> Receipt:
            postings.insert_ignore(conn, canteen_accounts, {
                "account_id": account_id, "kind": PURSE, "balance_cents": 0,
                "created_at": self._clock(),
            })
            if account_id not in postings.lock_purses(conn, [account_id]):
                raise InvalidRequest(f"account {account_id!r} is not a purse")
            replay = postings.replay(conn, idempotency_key, "topup", account_id, amount_cents)
            if replay is not None:
                return replay
            journal_id, balance = postings.post(
                conn, "topup", account_id, amount_cents, CASH_ACCOUNT, self._clock(),
                idempotency_key=idempotency_key,
            )
            return postings.remember(conn, self._clock(), idempotency_key, "topup",
                                     account_id, amount_cents, journal_id, balance)

        return self._transaction(work)

    def refund(
        self, account_id: str, terminal_id: str, txn_id: str, amount_cents: int,
        idempotency_key: str,
    ) -> Receipt:
        """Give (part of) a payment back to the purse it came from, never more than it took."""
        self._check_staff_request(account_id, amount_cents, idempotency_key,
                                  policy.MAX_AMOUNT_CENTS)

        def work(conn: Connection) -> Receipt:
            if account_id not in postings.lock_purses(conn, [account_id]):
                raise UnknownPayment(f"account {account_id!r} has no canteen purse")
            replay = postings.replay(conn, idempotency_key, "refund", account_id, amount_cents,
                                  terminal_id, txn_id)
            if replay is not None:
                return replay
            payment = postings.load_payment(conn, terminal_id, txn_id)
            if payment is None or payment.account_id != account_id:
                raise UnknownPayment(f"no payment {terminal_id}/{txn_id} from {account_id}")
            debited = conn.execute(
                select(canteen_payments.c.debited_cents).where(
                    canteen_payments.c.terminal_id == terminal_id,
                    canteen_payments.c.txn_id == txn_id,
                )
            ).scalar_one()
            refunded = conn.execute(
                select(func.coalesce(func.sum(canteen_journal.c.amount_cents), 0)).where(
                    canteen_journal.c.kind == "refund",
                    canteen_journal.c.terminal_id == terminal_id,
                    canteen_journal.c.txn_id == txn_id,
                )
            ).scalar_one()
            if refunded + amount_cents > debited:
                raise RefundRefused(
                    f"payment {terminal_id}/{txn_id} took {debited} cents and "
                    f"{refunded} were refunded already; {debited - refunded} remain refundable"
                )
            journal_id, balance = postings.post(
                conn, "refund", account_id, amount_cents, REVENUE_ACCOUNT, self._clock(),
                terminal_id=terminal_id, txn_id=txn_id, idempotency_key=idempotency_key,
            )
            return postings.remember(conn, self._clock(), idempotency_key, "refund",
                                     account_id, amount_cents, journal_id, balance,
                                     terminal_id, txn_id)

        return self._transaction(work)

    @staticmethod
    def _check_staff_request(account_id: str, amount_cents: int, key: str, limit: int) -> None:
        problem = policy.validate_account_id(account_id) or policy.validate_idempotency_key(key)
        if account_id.startswith("@"):
            problem = "system accounts cannot be credited by hand"
        if isinstance(amount_cents, bool) or not isinstance(amount_cents, int):
            problem = "amount_cents must be an integer number of cents"
        elif not 0 < amount_cents <= limit:
            problem = f"amount_cents must be between 1 and {limit}"
        if problem is not None:
            raise InvalidRequest(problem)

    # -- reading ------------------------------------------------------------------------

    def balance(self, account_id: str) -> int:
        with self.engine.connect() as conn:
            return reports.balance(conn, account_id)

    def history(self, account_id: str, limit: int = 50) -> list[reports.HistoryItem]:
        with self.engine.connect() as conn:
            return reports.history(conn, account_id, limit)

    def reconcile(self, day: date, tz: tzinfo = UTC) -> list[reports.ShortfallRow]:
        with self.engine.connect() as conn:
            return reports.reconcile(conn, day, tz)

    def settle(self, day: date, tz: tzinfo = UTC) -> list[reports.SettlementRow]:
        with self.engine.connect() as conn:
            return reports.settle(conn, day, tz)

    def audit(self) -> list[str]:
        with self.engine.connect() as conn:
            return reports.audit(conn)
