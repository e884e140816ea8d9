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

A payment made with a QR/BLE token records the token in the site's durable spent-token
record (gateway.access.spent) in the same transaction as the debit: a token spent at a
gate, at another till or in another gateway process never pays, and one that paid never
opens a gate afterwards. Offline sales are held to the offline limits across every batch of
one offline window (gateway.canteen.offline_windows): what lies beyond them is not debited
but recorded as a shortfall for staff, with whose meal it was.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, tzinfo
from typing import TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, func, or_, select, text
from sqlalchemy.exc import IntegrityError

from device_drivers.offline_sales import DEFAULT_LIMITS, OfflineExposure, OfflineLimits, OverLimit
from device_drivers.vocabulary import Reason
from gateway.access import spent
from gateway.access.spent import ClaimOutcome, TokenClaim
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
    # The offline window (start, end) the sale falls in: the limits apply to all the
    # terminal's offline sales in it. None: only to this batch (tools and tests).
    window: tuple[float, float] | None = None


# Offline sales that do not count against the limits: the ones that were never accepted.
_NOT_EXPOSED = (Reason.OFFLINE_LIMIT.value, Reason.OUTSIDE_OFFLINE_WINDOW.value,
                Reason.MALFORMED_REQUEST.value)


def token_ts(token_key: str) -> float:
    """The start of the time step named in a spent-token key ("kind:cred:step:nonce")."""
    parts = token_key.split(":")
    try:
        return float(int(parts[2]) * 30) if len(parts) == 4 else 0.0
    except ValueError:
        return 0.0


class Ledger:
    """Stored-value purses for the canteen, exactly once per (terminal, txn_id).

    Methods are blocking (SQLAlchemy Core); the asyncio shell calls them in a worker thread.
    """

    def __init__(
        self,
        engine: Engine,
        limits: OfflineLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        timezone: str | tzinfo = UTC,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self._clock = clock
        # The site's zone: the day a settlement or reconciliation counts when none is named.
        self.timezone = ZoneInfo(timezone) if isinstance(timezone, str) else timezone
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
        over_limit: OverLimit | None, believable: bool = True,
    ) -> PaymentResult:
        existing = postings.load_payment(conn, req.terminal_id, req.txn_id)
        now = self._clock()
        if existing is not None:
            if (req.offline and not existing.offline and existing.status is Status.REFUSED
                    and existing.amount_cents == req.amount_cents and believable):
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
        if token_key is not None and (
                postings.token_used(conn, token_key)
                or not self._claim_token(conn, req, token_key, now)):
            # The token paid already (maybe online, before an offline upload brought it
            # back under another txn_id), or opened a door: a single-use token is used once.
            log.info("payment %s/%s refused: its token was used already", req.terminal_id,
                     req.txn_id)
            token_key = None
            outcome = policy.refused_credential(Reason.REPLAYED_TOKEN, req.amount_cents,
                                               req.offline)
        elif isinstance(req.resolution, Reason):
            outcome = policy.refused_credential(req.resolution, req.amount_cents, req.offline)
        elif req.offline and over_limit is not None:
            account_id = req.resolution
            balance = purses.get(account_id, 0)
            outcome = policy.over_offline_limit(req.amount_cents)
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

    @staticmethod
    def _claim_token(conn: Connection, req: PaymentRequest, token_key: str,
                     now: float) -> bool:
        """Spend the token for this payment; False when something else spent it."""
        use = TokenClaim(token_key, token_ts(token_key), req.terminal_id,
                         f"{req.terminal_id}/{req.txn_id}", same_ref_is_ours=True)
        return spent.claim(conn, use, now) is ClaimOutcome.FRESH

    def apply_batch(
        self, terminal_id: str, batch_id: str, payments: Sequence[BatchPayment]
    ) -> list[PaymentResult]:
        """Apply an offline terminal's sales in order; one result per distinct txn_id.

        Sales beyond the offline limits are not debited: they are refused with
        `offline_limit` and recorded as shortfalls with the purse they belong to, for staff
        to review. The limits count every offline sale of the terminal in the same offline
        window (`BatchPayment.window`), including earlier batches; a sale whose ts is not
        believable (policy.offline_ts_problem) is refused as malformed, retry or not.
        """
        seen: set[str] = set()
        unique = []
        for payment in payments:
            if payment.txn_id not in seen:
                seen.add(payment.txn_id)
                unique.append(payment)
        now = self._clock()
        results: list[PaymentResult | None] = [None] * len(unique)
        todo: list[tuple[int, BatchPayment, PaymentRequest]] = []
        for i, payment in enumerate(unique):
            problem = (policy.validate_payment(terminal_id, payment.txn_id,
                                               payment.amount_cents, payment.ts)
                       or policy.validate_id(batch_id, "batch_id"))
            if problem is None and payment.token_key is not None and len(payment.token_key) > 64:
                problem = "token_key must be at most 64 characters"
            if problem is not None:
                log.info("offline payment %s/%s refused as malformed: %s", terminal_id,
                         payment.txn_id, problem)
                results[i] = PaymentResult(payment.txn_id, False, None,
                                           Reason.MALFORMED_REQUEST)
                continue
            todo.append((i, payment, PaymentRequest(
                terminal_id, payment.txn_id, payment.amount_cents, payment.resolution,
                payment.ts, offline=True, batch_id=batch_id, token_key=payment.token_key,
            )))

        def work(conn: Connection) -> list[PaymentResult]:
            self._lock_terminal(conn, terminal_id)
            stored = postings.load_payments(conn, terminal_id, [r.txn_id for _, _, r in todo])
            exposures: dict[tuple[float, float] | None, OfflineExposure] = {}
            decided: list[PaymentResult] = []
            purses = postings.lock_purses(conn, (
                r.resolution for _, _, r in todo if not isinstance(r.resolution, Reason)))
            for _, payment, req in todo:
                problem = policy.offline_ts_problem(req.ts, now)
                if req.txn_id in stored:
                    # Decided before: the stored answer, and no new record from a sale
                    # dated where no sale can be (it would poison the reports).
                    decided.append(self._decide_one(conn, req, purses, None,
                                                    believable=problem is None))
                    continue
                if problem is not None:
                    log.info("offline payment %s/%s refused as malformed: %s", terminal_id,
                             req.txn_id, problem)
                    decided.append(PaymentResult(req.txn_id, False, None,
                                                 Reason.MALFORMED_REQUEST))
                    continue
                window = payment.window
                if window not in exposures:
                    exposures[window] = (self._exposure(conn, terminal_id, window)
                                         if window is not None else OfflineExposure())
                card_key = (f"refused:{payment.resolution}"
                            if isinstance(payment.resolution, Reason) else payment.resolution)
                flag = exposures[window].check(self.limits, card_key, payment.amount_cents)
                if flag is None:
                    exposures[window] = exposures[window].add(card_key, payment.amount_cents)
                decided.append(self._decide_one(conn, req, purses, flag))
            return decided

        if todo:
            for (i, _, _), result in zip(todo, self._transaction(work), strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    @staticmethod
    def _lock_terminal(conn: Connection, terminal_id: str) -> None:
        """Two batches of one terminal (two gateways, a re-upload) count limits one at a
        time. SQLite: BEGIN IMMEDIATE already made this the only writer."""
        if conn.dialect.name == "postgresql":
            key = zlib.crc32(f"scgw-offline:{terminal_id}".encode())
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    @staticmethod
    def _exposure(conn: Connection, terminal_id: str,
                  window: tuple[float, float]) -> OfflineExposure:
        """The terminal's offline sales already accepted in `window`, by purse."""
        p = canteen_payments.c
        exposure = OfflineExposure()
        for account_id, txn_id, amount in conn.execute(
            select(p.account_id, p.txn_id, p.amount_cents).where(
                p.terminal_id == terminal_id, p.offline.is_(True),
                p.request_ts >= window[0], p.request_ts <= window[1],
                or_(p.reason.is_(None), p.reason.notin_(_NOT_EXPOSED)))
        ).all():
            exposure = exposure.add(account_id if account_id is not None else f"?{txn_id}",
                                    int(amount))
        return exposure

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

    def reconcile(self, day: date, tz: tzinfo | None = None) -> list[reports.ShortfallRow]:
        """Uncovered offline sales posted on `day`, counted in `tz` (default: the site's)."""
        with self.engine.connect() as conn:
            return reports.reconcile(conn, day, tz or self.timezone)

    def settle(self, day: date, tz: tzinfo | None = None) -> list[reports.SettlementRow]:
        """The day's settlement (default zone: the site's), read from one snapshot."""
        return self.settle_checked(day, tz)[0]

    def settle_checked(self, day: date,
                       tz: tzinfo | None = None) -> tuple[list[reports.SettlementRow], int]:
        """The settlement and the revenue account's net movement that day, both from one
        snapshot (REPEATABLE READ on PostgreSQL), so they agree even while postings land."""
        zone = tz or self.timezone
        with reports.snapshot(self.engine) as conn:
            return reports.settle(conn, day, zone), reports.revenue_on(conn, day, zone)

    def audit(self) -> list[str]:
        with self.engine.connect() as conn:
            return reports.audit(conn)
