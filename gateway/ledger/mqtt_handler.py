"""Glue between CONTRACT.md payment messages and the ledger.

Parsing and encoding are pure. `PaymentHandler` is blocking (the ledger writes to the
database), so the MQTT shell runs it in a worker thread and publishes what it returns.

A retried request is answered from the stored result *before* its credential is resolved
again: resolving consumes a single-use QR/BLE token, so a retry carrying the same token
would otherwise be refused as `replayed_token` although the first attempt was approved.
Requests for the same (terminal, txn_id) are also serialised here, so a retry that overtakes
its original waits for it instead of racing it to the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from device_drivers.mqtt_protocol import (
    Credential,
    Malformed,
    encode,
    load_object,
    read_credential,
    read_id,
    read_ts,
)
from gateway.ledger import rules
from gateway.ledger.rules import PaymentResult, Reason
from gateway.ledger.service import BatchPayment, Ledger

log = logging.getLogger(__name__)

REQUEST_CHANNEL = "payment/request"
RESULT_CHANNEL = "payment/result"
BATCH_CHANNEL = "payment/batch"
BATCH_RESULT_CHANNEL = "payment/batch_result"
MAX_BATCH_PAYMENTS = 1000

Resolver = Callable[[str, str, float], "str | Reason"]
"""resolve(credential_type, value, now) -> the purse's account id, or a refusal reason.

A refusal may also be returned as the plain reason string ("revoked")."""


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


def _payment_fields(data: dict[str, Any]) -> PaymentMessage | Malformed:
    txn_id = read_id(data, "txn_id")
    if txn_id is None:
        return Malformed("txn_id must be a non-empty string")
    amount = data.get("amount_cents")
    if isinstance(amount, bool) or not isinstance(amount, int):
        return Malformed("amount_cents must be an integer number of cents", txn_id)
    credential = read_credential(data)
    if isinstance(credential, str):
        return Malformed(credential, txn_id)
    ts = read_ts(data)
    if isinstance(ts, str):
        return Malformed(ts, txn_id)
    problem = rules.validate_payment("t", txn_id, amount, 0.0 if ts is None else ts)
    if problem is not None:
        return Malformed(problem, txn_id)
    return PaymentMessage(txn_id, amount, credential, ts)


def parse_payment_request(payload: bytes) -> PaymentMessage | Malformed:
    data = load_object(payload)
    return data if isinstance(data, Malformed) else _payment_fields(data)


def parse_payment_batch(payload: bytes) -> BatchMessage | Malformed:
    """A batch, or Malformed (with the batch_id when readable); bad items stay in place."""
    data = load_object(payload)
    if isinstance(data, Malformed):
        return data
    batch_id = read_id(data, "batch_id")
    if batch_id is None:
        return Malformed("batch_id must be a non-empty string")
    items = data.get("payments")
    if not isinstance(items, list):
        return Malformed("payments must be a list of payment requests", batch_id)
    if len(items) > MAX_BATCH_PAYMENTS:
        return Malformed(f"a batch holds at most {MAX_BATCH_PAYMENTS} payments", batch_id)
    parsed = tuple(
        _payment_fields(item) if isinstance(item, dict)
        else Malformed("each payment must be a JSON object")
        for item in items
    )
    return BatchMessage(batch_id, parsed)


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


class PaymentHandler:
    """Answers `payment/request` and `payment/batch` messages of canteen terminals.

    `counts` tallies outcomes (approved, refused, shortfall, retry, malformed) for /metrics.
    """

    def __init__(
        self, ledger: Ledger, resolve: Resolver, clock: Callable[[], float] = time.time
    ) -> None:
        self.ledger = ledger
        self._resolve = resolve
        self._clock = clock
        self._inflight = _KeyedLocks()
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
                return rules.retry_result(stored.result, stored.amount_cents,
                                          message.amount_cents)
            now = self._clock()
            ts = now if message.ts is None else message.ts
            resolution = rules.as_resolution(
                self._resolve(message.credential.type, message.credential.value,
                              ts if offline else now)
            )
            result = self.ledger.pay(terminal_id, message.txn_id, message.amount_cents,
                                     resolution, ts, offline=offline)
        self._tally(result)
        return result

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
        valid = [p for p in batch.payments if isinstance(p, PaymentMessage)]
        stored = self.ledger.lookup_many(terminal_id, (p.txn_id for p in valid))
        self._count("retry", len(stored))
        now = self._clock()
        to_apply: list[BatchPayment] = []
        resolved: set[str] = set()
        for p in valid:
            if p.txn_id in resolved:
                continue
            resolved.add(p.txn_id)
            ts = now if p.ts is None else p.ts
            previous = stored.get(p.txn_id)
            if previous is not None:
                # Decided already: the ledger answers from the stored row, never from this.
                resolution: rules.Resolution = previous.account_id or Reason.NOT_PERMITTED
            else:
                resolution = rules.as_resolution(
                    self._resolve(p.credential.type, p.credential.value, ts)
                )
            to_apply.append(BatchPayment(p.txn_id, p.amount_cents, resolution, ts))
        applied = {r.txn_id: r for r in self.ledger.apply_batch(terminal_id, batch.batch_id,
                                                                  to_apply)}
        for txn_id, r in applied.items():
            if txn_id not in stored:
                self._tally(r)
        results: list[PaymentResult] = []
        answered: set[str] = set()
        for item in batch.payments:
            if isinstance(item, Malformed):
                self._count("malformed")
                if item.reply_id is not None and item.reply_id not in answered:
                    answered.add(item.reply_id)
                    results.append(malformed_result(item.reply_id))
            elif item.txn_id not in answered:
                answered.add(item.txn_id)
                results.append(applied[item.txn_id])
        return batch_result_payload(batch.batch_id, results)
