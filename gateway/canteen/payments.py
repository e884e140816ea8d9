"""Glue between CONTRACT.md payment messages and the ledger.

Parsing and encoding are pure. `PaymentHandler` is blocking (the ledger writes to the
database), so the MQTT shell runs it in a worker thread and publishes what it returns.

A retried request is answered from the stored result *before* its credential is resolved
again: resolving consumes a single-use QR/BLE token, so a retry carrying the same token
would otherwise be refused as `replayed_token` although the first attempt was approved.
Requests for the same (terminal, txn_id) are also serialised here, so a retry that overtakes
its original waits for it instead of racing it to the database. A retry whose first attempt
resolved its credential but failed to commit (database down, a crash of the write) reuses
that first resolution, remembered here for a while, instead of spending the token again.

Every payment made with a QR/BLE token carries the token's key (credential id, time step,
nonce, kind; never the token) into the ledger, which spends it in the site's durable
spent-token record in the same transaction as the debit: a token used at a gate, at another
till, in another gateway process or before a restart is refused as `replayed_token`.

An offline upload is believed only for sales inside a window in which the gateway saw the
terminal offline (gateway.canteen.offline_windows); a sale outside every window is refused
with `outside_offline_window` before its credential is even resolved, and recorded for staff.
Each credential is resolved as of the sale's own time, so a token must have been valid then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from device_drivers.mqtt_protocol import (
    MAX_ID_LEN,
    Malformed,
    encode,
    load_object,
    read_credential,
    read_id,
    read_ts,
)
from device_drivers.tokens import parse_ble_hex, parse_qr
from device_drivers.vocabulary import Credential, Reason
from gateway.canteen import policy
from gateway.canteen.ledger import BatchPayment, Ledger
from gateway.canteen.offline_windows import Window, covering
from gateway.canteen.policy import MAX_BATCH_AGE_S as MAX_BATCH_AGE_S
from gateway.canteen.policy import MAX_BATCH_FUTURE_S as MAX_BATCH_FUTURE_S
from gateway.canteen.policy import PaymentResult

log = logging.getLogger(__name__)

REQUEST_CHANNEL = "payment/request"
RESULT_CHANNEL = "payment/result"
BATCH_CHANNEL = "payment/batch"
BATCH_RESULT_CHANNEL = "payment/batch_result"
MAX_BATCH_PAYMENTS = 1000
# How long, and for how many payments, a resolution is kept for a retry whose first
# attempt did not reach the ledger.
RESOLUTION_TTL_S = 600.0
MAX_RESOLUTIONS = 10_000

Resolver = Callable[[str, str, float, str], "str | Reason"]
"""resolve(credential_type, value, at, use_ref) -> the purse's account id, or a refusal.

`use_ref` is "terminal/txn_id": a retry of the same payment may resolve the same token
again. A refusal may also be returned as the plain reason string ("revoked")."""

WindowSource = Callable[[str, float], Sequence[Window]]
"""windows(terminal_id, now) -> the offline windows a sale of that terminal must fall in."""


@dataclass(frozen=True, slots=True)
class PaymentMessage:
    txn_id: str
    amount_cents: int
    credential: Credential
    ts: float | None


@dataclass(frozen=True, slots=True)
class BatchMessage:
    batch_id: str
    payments: tuple[PaymentMessage | Malformed, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    channel: str  # relative to {root}/devices/{terminal}/
    payload: bytes


def token_key(credential: Credential) -> str | None:
    """What identifies a QR/BLE token for good (never the token: no tag), or None.

    At most 41 characters ("ble:" + 16 hex + ":" + step + ":" + nonce hex), so it fits the
    ledger's String(64) column.
    """
    if credential.type == "qr":
        token = parse_qr(credential.value)
    elif credential.type == "ble":
        token = parse_ble_hex(credential.value)
    else:
        return None
    if token is None:
        return None
    return f"{credential.type}:{token.credential_id}:{token.step}:{token.nonce.hex()}"


def _read_id(data: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    """(the id when the ledger can store it, what to answer to), e.g. (None, "t\x00").

    An id that cannot be stored (over 64 characters, not printable ASCII) is still echoed
    in a `malformed_request` answer when it is a short string, so the terminal stops
    re-sending instead of retrying forever; it never reaches a log line or the database.
    """
    value = data.get(key)
    usable = read_id(data, key)
    if usable is not None and policy.validate_id(usable, key) is None:
        return usable, usable
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN:
        return None, value
    return None, None


def _payment_fields(data: dict[str, Any]) -> PaymentMessage | Malformed:
    txn_id, reply_id = _read_id(data, "txn_id")
    if txn_id is None:
        return Malformed("txn_id must be 1-64 printable ASCII characters without spaces",
                         reply_id)
    amount = data.get("amount_cents")
    if isinstance(amount, bool) or not isinstance(amount, int):
        return Malformed("amount_cents must be an integer number of cents", txn_id)
    credential = read_credential(data)
    if isinstance(credential, str):
        return Malformed(credential, txn_id)
    ts = read_ts(data)
    if isinstance(ts, str):
        return Malformed(ts, txn_id)
    problem = policy.validate_payment("t", txn_id, amount, 0.0 if ts is None else ts)
    if problem is not None:
        return Malformed(problem, txn_id)
    return PaymentMessage(txn_id, amount, credential, ts)


def parse_payment_request(payload: bytes) -> PaymentMessage | Malformed:
    data = load_object(payload)
    return data if isinstance(data, Malformed) else _payment_fields(data)


def parse_payment_batch(payload: bytes) -> BatchMessage | Malformed:
    """A batch, or Malformed (with the batch_id when readable); bad items stay in place.

    A batch_id the ledger cannot store (over 64 characters, or not printable ASCII) makes
    every item malformed, so the terminal gets a `malformed_request` for each of its sales
    instead of silence and endless re-uploads.
    """
    data = load_object(payload)
    if isinstance(data, Malformed):
        return data
    batch_id, reply_id = _read_id(data, "batch_id")
    if reply_id is None:
        return Malformed("batch_id must be a non-empty string")
    items = data.get("payments")
    if not isinstance(items, list):
        return Malformed("payments must be a list of payment requests", reply_id)
    if len(items) > MAX_BATCH_PAYMENTS:
        return Malformed(f"a batch holds at most {MAX_BATCH_PAYMENTS} payments", reply_id)
    parsed = tuple(
        _payment_fields(item) if isinstance(item, dict)
        else Malformed("each payment must be a JSON object")
        for item in items
    )
    if batch_id is None:
        problem = "batch_id must be 1-64 printable ASCII characters without spaces"
        parsed = tuple(Malformed(problem, p.txn_id) if isinstance(p, PaymentMessage) else p
                       for p in parsed)
    return BatchMessage(reply_id, parsed)


def batch_ts_problem(ts: float, now: float) -> str | None:
    """Why an offline sale's ts is not believable, or None."""
    return policy.offline_ts_problem(ts, now)


def malformed_result(txn_id: str) -> PaymentResult:
    return PaymentResult(txn_id, False, None, Reason.MALFORMED_REQUEST)


def result_payload(result: PaymentResult) -> bytes:
    return encode(result.to_wire())


def batch_result_payload(batch_id: str, results: list[PaymentResult]) -> bytes:
    return encode({"batch_id": batch_id, "results": [r.to_wire() for r in results]})


class _KeyedLocks:
    """One lock per key, alive only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: tuple[str, str]) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


@dataclass(frozen=True, slots=True)
class _Resolved:
    credential: Credential
    resolution: policy.Resolution
    at: float


class _Resolutions:
    """(terminal, txn_id) -> the first resolution of its credential, bounded in age and size.

    Only a retry with the very same credential reuses it; an entry is dropped once its
    payment is stored (from then on the ledger answers retries).
    """

    def __init__(self, ttl_s: float = RESOLUTION_TTL_S, limit: int = MAX_RESOLUTIONS) -> None:
        self._ttl_s = ttl_s
        self._limit = limit
        self._entries: OrderedDict[tuple[str, str], _Resolved] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], credential: Credential,
            now: float) -> policy.Resolution | None:
        with self._lock:
            self._prune(now)
            entry = self._entries.get(key)
            if entry is None or entry.credential != credential:
                return None
            return entry.resolution

    def put(self, key: tuple[str, str], credential: Credential, resolution: policy.Resolution,
            now: float) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = _Resolved(credential, resolution, now)
            self._prune(now)

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def _prune(self, now: float) -> None:
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if len(self._entries) <= self._limit and oldest.at > now - self._ttl_s:
                break
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class PaymentHandler:
    """Answers `payment/request` and `payment/batch` messages of canteen terminals.

    `counts` tallies outcomes (approved, refused, shortfall, retry, malformed) for /metrics.
    """

    def __init__(
        self, ledger: Ledger, resolve: Resolver, clock: Callable[[], float] = time.time,
        windows: WindowSource | None = None,
    ) -> None:
        """`windows`: where offline sales of a terminal may lie; None believes any time
        within the ts bounds (for tools and tests that have no terminals' status)."""
        self.ledger = ledger
        self._resolve = resolve
        self._clock = clock
        self._windows = windows
        self._inflight = _KeyedLocks()
        self._resolutions = _Resolutions()
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def _tally(self, result: PaymentResult) -> None:
        if result.approved:
            self._count("approved")
        elif result.shortfall_cents:
            self._count("shortfall")
        else:
            self._count("refused")

    def handle(self, terminal_id: str, channel: str, payload: bytes) -> Reply | None:
        """The reply to publish for a message on `channel`, or None when nobody can be told."""
        if channel == REQUEST_CHANNEL:
            answer = self.handle_request(terminal_id, payload)
            return None if answer is None else Reply(RESULT_CHANNEL, answer)
        if channel == BATCH_CHANNEL:
            answer = self.handle_batch(terminal_id, payload)
            return None if answer is None else Reply(BATCH_RESULT_CHANNEL, answer)
        raise ValueError(f"not a payment channel: {channel!r}")

    def handle_request(self, terminal_id: str, payload: bytes) -> bytes | None:
        message = parse_payment_request(payload)
        if isinstance(message, Malformed):
            self._count("malformed")
            log.info("malformed payment request from %s: %s", terminal_id, message.problem)
            if message.reply_id is None:
                return None
            return result_payload(malformed_result(message.reply_id))
        result = self.pay(terminal_id, message, offline=False)
        return result_payload(result)

    def pay(self, terminal_id: str, message: PaymentMessage, offline: bool) -> PaymentResult:
        with self._inflight.hold((terminal_id, message.txn_id)):
            stored = self.ledger.lookup(terminal_id, message.txn_id)
            if stored is not None:
                self._count("retry")
                return policy.retry_result(stored.result, stored.amount_cents,
                                          message.amount_cents)
            now = self._clock()
            ts = now if message.ts is None else message.ts
            key = (terminal_id, message.txn_id)
            resolution = self._resolution(key, message.credential, ts if offline else now,
                                          now)
            result = self.ledger.pay(terminal_id, message.txn_id, message.amount_cents,
                                     resolution, ts, offline=offline,
                                     token_key=token_key(message.credential))
            self._resolutions.forget([key])
        self._tally(result)
        return result

    def _resolution(self, key: tuple[str, str], credential: Credential, at: float,
                    now: float) -> policy.Resolution:
        """Resolve the credential as of `at`, or reuse what a failed first attempt got."""
        remembered = self._resolutions.get(key, credential, now)
        if remembered is not None:
            log.info("payment %s/%s retried after a failed write; reusing its resolution",
                     *key)
            return remembered
        resolution = policy.as_resolution(
            self._resolve(credential.type, credential.value, at, "/".join(key)))
        self._resolutions.put(key, credential, resolution, now)
        return resolution

    def handle_batch(self, terminal_id: str, payload: bytes) -> bytes | None:
        """Apply an offline upload in order; one result per distinct txn_id.

        Each credential is resolved as of the moment it was presented (the payment's `ts`),
        because that is when the terminal checked it.
        """
        batch = parse_payment_batch(payload)
        if isinstance(batch, Malformed):
            self._count("malformed")
            log.info("malformed payment batch from %s: %s", terminal_id, batch.problem)
            if batch.reply_id is None:
                return None
            return batch_result_payload(batch.reply_id, [])
        candidates = [p for p in batch.payments if isinstance(p, PaymentMessage)]
        stored = self.ledger.lookup_many(terminal_id, (p.txn_id for p in candidates))
        self._count("retry", len(stored))
        now = self._clock()
        windows = (self._windows(terminal_id, now)
                   if self._windows is not None and len(stored) < len(candidates) else None)
        items: list[PaymentMessage | Malformed] = []
        for item in batch.payments:
            if (isinstance(item, PaymentMessage) and item.ts is not None
                    and item.txn_id not in stored):
                # A decided sale keeps its first answer (the ledger bounds its ts too);
                # only new ones are checked here, before any credential is spent.
                problem = batch_ts_problem(item.ts, now)
                if problem is not None:
                    items.append(Malformed(problem, item.txn_id))
                    continue
            items.append(item)
        valid = [p for p in items if isinstance(p, PaymentMessage)]
        to_apply: list[BatchPayment] = []
        resolved: set[str] = set()
        for p in valid:
            if p.txn_id in resolved:
                continue
            resolved.add(p.txn_id)
            ts = now if p.ts is None else p.ts
            previous = stored.get(p.txn_id)
            window: Window | None = None
            if previous is not None:
                # Decided already: the ledger answers from the stored row, never from this.
                resolution: policy.Resolution = previous.account_id or Reason.NOT_PERMITTED
            elif windows is not None and (window := covering(windows, ts)) is None:
                # The gateway never saw this terminal offline then: not a believable offline
                # sale. Refused without resolving (no token is spent), recorded for staff.
                self._count("outside_window")
                log.warning("offline sale %s/%s dated %.0f lies outside every offline window "
                            "of the terminal", terminal_id, p.txn_id, ts)
                to_apply.append(BatchPayment(p.txn_id, p.amount_cents,
                                             Reason.OUTSIDE_OFFLINE_WINDOW, ts))
                continue
            else:
                resolution = self._resolution((terminal_id, p.txn_id), p.credential, ts, now)
            to_apply.append(BatchPayment(
                p.txn_id, p.amount_cents, resolution, ts, token_key(p.credential),
                window=None if window is None else (window.start, window.end)))
        applied = {r.txn_id: r for r in self.ledger.apply_batch(terminal_id, batch.batch_id,
                                                                  to_apply)}
        self._resolutions.forget((terminal_id, txn_id) for txn_id in applied)
        for txn_id, r in applied.items():
            if txn_id not in stored:
                self._tally(r)
        results: list[PaymentResult] = []
        answered: set[str] = set()
        for item in items:
            if isinstance(item, Malformed):
                self._count("malformed")
                if item.reply_id is not None and item.reply_id not in answered:
                    answered.add(item.reply_id)
                    results.append(malformed_result(item.reply_id))
            elif item.txn_id not in answered:
                answered.add(item.txn_id)
                results.append(applied[item.txn_id])
        return batch_result_payload(batch.batch_id, results)
