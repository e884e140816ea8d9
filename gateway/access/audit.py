"""The access audit log: every decision, appended to a hash-chained table.

Each row stores `row_hash = sha256(prev_hash | canonical row)`, so editing, deleting or
inserting a row breaks the chain at that point and `verify` names the first bad row. Ids are
assigned by the writer as the previous id plus one under a table lock, so they are gapless:
a missing id is a deleted row, and two gateway processes on one database extend one chain.
Deleting the newest rows, or rewriting the whole chain, is only visible against an anchor
(a row id and hash noted elsewhere); `verify(conn, anchor=...)` checks one.

Tokens and secrets never reach this table: an entry carries the credential type and the
credential reference the access service resolved, not the presented value.

The hot path only appends to an in-memory queue (`record`); a background task writes
batches from a worker thread every `flush_interval_s` or `batch_size` entries. A failed
write keeps its entries queued and is retried; leaving the context writes everything still
pending before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    String,
    Table,
    Text,
    insert,
    select,
    text,
)

from device_drivers.supervision import ComponentTasks, SupervisedTask, Supervisor
from gateway.store.metadata import metadata

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", Float, nullable=False, index=True),
    Column("device_id", String(64), nullable=False),
    Column("device_kind", String(16), nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("credential_type", String(16), nullable=True),
    Column("credential_ref", String(64), nullable=True),
    Column("resident_id", String(64), nullable=True, index=True),
    Column("visitor_pass_id", String(64), nullable=True),
    Column("granted", Boolean, nullable=False),
    Column("action", String(16), nullable=False),
    Column("reason", String(32), nullable=True),
    Column("floors", Text, nullable=True),  # JSON list of the floors enabled, or null
    Column("prev_hash", String(64), nullable=False),
    Column("row_hash", String(64), nullable=False),
)

# The chained content, in a fixed order; changing it invalidates every existing chain.
_CONTENT = (
    "id", "ts", "device_id", "device_kind", "request_id", "credential_type", "credential_ref",
    "resident_id", "visitor_pass_id", "granted", "action", "reason", "floors",
)
_STRING_LIMITS = {c.name: c.type.length for c in audit_log.columns
                  if isinstance(c.type, String) and c.type.length is not None}


class DecisionLike(Protocol):
    """What the audit needs from gateway.access.decision.AccessDecision."""

    @property
    def granted(self) -> bool: ...
    @property
    def action(self) -> str: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def floors(self) -> Sequence[int] | None: ...
    @property
    def resident_id(self) -> str | None: ...
    @property
    def credential_ref(self) -> str | None: ...
    @property
    def credential_type(self) -> str | None: ...
    @property
    def visitor_pass_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: float
    device_id: str
    device_kind: str
    granted: bool
    action: str
    reason: str | None = None
    credential_type: str | None = None
    credential_ref: str | None = None
    resident_id: str | None = None  # for a visitor pass: the resident who issued it
    visitor_pass_id: str | None = None
    floors: tuple[int, ...] | None = None
    request_id: str | None = None

    @classmethod
    def from_decision(
        cls, device_id: str, device_kind: str, decision: DecisionLike, now: float,
        request_id: str | None = None,
    ) -> AuditEntry:
        return cls(
            ts=now,
            device_id=device_id,
            device_kind=device_kind,
            granted=bool(decision.granted),
            action=_text(decision.action) or "none",
            reason=_text(decision.reason),
            credential_type=_text(decision.credential_type),
            credential_ref=decision.credential_ref,
            resident_id=decision.resident_id,
            visitor_pass_id=decision.visitor_pass_id,
            floors=tuple(decision.floors) if decision.floors is not None else None,
            request_id=request_id,
        )

    def content(self, row_id: int) -> dict[str, Any]:
        """The row's chained columns; over-long strings are cut so a batch never fails."""
        values: dict[str, Any] = {
            "id": row_id,
            "ts": float(self.ts),
            "device_id": self.device_id,
            "device_kind": self.device_kind,
            "request_id": self.request_id,
            "credential_type": self.credential_type,
            "credential_ref": self.credential_ref,
            "resident_id": self.resident_id,
            "visitor_pass_id": self.visitor_pass_id,
            "granted": self.granted,
            "action": self.action,
            "reason": self.reason,
            "floors": json.dumps(list(self.floors)) if self.floors is not None else None,
        }
        for name, limit in _STRING_LIMITS.items():
            value = values.get(name)
            if isinstance(value, str) and len(value) > limit:
                values[name] = value[:limit]
        return values


def _text(value: object) -> str | None:
    """Enum members are stored by value, so the log reads the same as the wire contract."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def canonical(values: Mapping[str, Any]) -> str:
    return json.dumps([values[name] for name in _CONTENT], separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)


def chain_hash(prev_hash: str, values: Mapping[str, Any]) -> str:
    return hashlib.sha256(f"{prev_hash}|{canonical(values)}".encode()).hexdigest()


def append_entries(conn: Connection, entries: Sequence[AuditEntry]) -> int:
    """Append entries to the chain inside the caller's transaction; returns the new head id.

    The table lock (SQLite: the write lock BEGIN IMMEDIATE already holds) keeps two writers
    from both extending the same head.
    """
    if not entries:
        return 0
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE"))
    head = conn.execute(
        select(audit_log.c.id, audit_log.c.row_hash).order_by(audit_log.c.id.desc()).limit(1)
    ).first()
    last_id, prev = (int(head.id), str(head.row_hash)) if head is not None else (0, GENESIS_HASH)
    rows = []
    for entry in entries:
        last_id += 1
        values = entry.content(last_id)
        row_hash = chain_hash(prev, values)
        rows.append({**values, "prev_hash": prev, "row_hash": row_hash})
        prev = row_hash
    conn.execute(insert(audit_log), rows)
    return last_id


@dataclass(frozen=True, slots=True)
class ChainCheck:
    ok: bool
    rows: int
    first_bad_id: int | None = None
    problem: str | None = None
    head_id: int | None = None
    head_hash: str | None = None


def verify(conn: Connection, anchor: tuple[int, str] | None = None) -> ChainCheck:
    """Walk the chain in id order; stop at the first row that does not follow from the last.

    `anchor` is a (row id, row hash) recorded earlier, e.g. printed by a previous verify;
    it catches the newest rows being deleted or the whole chain being recomputed.
    """
    prev_hash, expected_id, rows = GENESIS_HASH, 1, 0
    anchor_seen = anchor is None
    stream = conn.execution_options(yield_per=2000).execute(
        select(audit_log).order_by(audit_log.c.id)
    )
    for row in stream.mappings():
        row_id = int(row["id"])
        problem: str | None = None
        if row_id != expected_id:
            problem = (f"row {expected_id} is missing (deleted)" if row_id > expected_id
                       else f"row id {row_id} is out of sequence")
        elif row["prev_hash"] != prev_hash:
            problem = "prev_hash does not match the row before it (row inserted or replaced)"
        elif chain_hash(prev_hash, {n: row[n] for n in _CONTENT}) != row["row_hash"]:
            problem = "row content does not match its hash (row edited)"
        elif anchor is not None and row_id == anchor[0]:
            if row["row_hash"] != anchor[1]:
                problem = "row hash differs from the anchor (chain rewritten)"
            anchor_seen = True
        if problem is not None:
            stream.close()
            return ChainCheck(False, rows, row_id, problem, expected_id - 1 or None,
                              prev_hash if rows else None)
        rows += 1
        prev_hash, expected_id = str(row["row_hash"]), row_id + 1
    head_id, head_hash = (expected_id - 1, prev_hash) if rows else (None, None)
    if not anchor_seen and anchor is not None:
        return ChainCheck(False, rows, anchor[0], f"anchored row {anchor[0]} is missing "
                          "(newest rows deleted)", head_id, head_hash)
    return ChainCheck(True, rows, None, None, head_id, head_hash)


class AuditError(RuntimeError):
    """Entries could not be written at shutdown; the log names how many."""


class AuditLog:
    """Batched, ordered writer of audit entries.

    `record` is safe to call from the event loop's hot path: it never blocks or touches
    the database. Entries are written in the order recorded. An entry leaves the queue only
    when the transaction holding it has committed, so a failed or interrupted write is
    retried and never duplicated.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval_s: float = 0.1,
        batch_size: int = 500,
        retry_max_s: float = 5.0,
        shutdown_attempts: int = 5,
        warn_pending: int = 100_000,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._engine = engine
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self._retry_max_s = retry_max_s
        self._shutdown_attempts = shutdown_attempts
        self._warn_pending = warn_pending
        self._pending: deque[AuditEntry] = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future[None] | None = None
        self._tasks = ComponentTasks(supervisor, "audit")
        self._writer: SupervisedTask | None = None
        self._closed = False
        self.written = 0
        self.write_errors = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, entry: AuditEntry) -> None:
        if self._closed:
            raise AuditError("audit log is closed; the entry would be lost")
        self._pending.append(entry)
        if len(self._pending) >= self.batch_size:
            self._wake.set()
        if len(self._pending) == self._warn_pending:
            log.warning("audit: %d entries waiting for the database", self._warn_pending)

    def record_decision(
        self, device_id: str, device_kind: str, decision: DecisionLike, now: float,
        request_id: str | None = None,
    ) -> None:
        self.record(AuditEntry.from_decision(device_id, device_kind, decision, now, request_id))

    async def __aenter__(self) -> Self:
        self._closed = False
        self._stop.clear()
        await self._tasks.start()
        self._writer = self._tasks.spawn("audit-writer", self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._wake.set()
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                await writer.join()  # the writer drains what is pending, then returns
        finally:
            self._closed = True
            await self._tasks.stop()
        if self._pending:
            raise AuditError(f"{len(self._pending)} audit entries could not be written")

    async def flush(self) -> None:
        """Write everything recorded so far; raises when the database refuses."""
        while self._pending:
            await self._write_batch()

    async def _run(self) -> None:
        failures = 0
        while not (self._stop.is_set() and not self._pending):
            if failures:
                # Backing off: only shutdown cuts the wait short, not a filling queue.
                delay = min(self._retry_max_s, self.flush_interval_s * 2**failures)
                await _wait(self._stop if not self._stop.is_set() else None, delay)
            elif not self._stop.is_set():
                await _wait(self._wake, self.flush_interval_s)
                self._wake.clear()
            try:
                await self.flush()
                failures = 0
            except Exception:
                failures += 1
                self.write_errors += 1
                log.exception("audit: write failed, %d entries pending", len(self._pending))
                if self._stop.is_set() and failures >= self._shutdown_attempts:
                    log.error("audit: giving up at shutdown with %d entries unwritten",
                              len(self._pending))
                    return

    async def _write_batch(self) -> None:
        async with self._lock:
            while self._inflight is not None:  # a cancelled caller's write is still running
                await asyncio.wait({self._inflight})
            count = min(len(self._pending), self.batch_size)
            if count == 0:
                return
            batch = list(itertools.islice(self._pending, count))
            write = asyncio.ensure_future(asyncio.to_thread(self._append, batch))
            self._inflight = write
            # Registered first, so it settles the queue before any awaiter resumes.
            write.add_done_callback(functools.partial(self._settle, count))
            await asyncio.shield(write)

    def _settle(self, count: int, write: asyncio.Future[None]) -> None:
        self._inflight = None
        if write.cancelled() or write.exception() is not None:
            return
        for _ in range(count):
            self._pending.popleft()
        self.written += count

    def _append(self, batch: list[AuditEntry]) -> None:
        with self._engine.begin() as conn:
            append_entries(conn, batch)


async def _wait(event: asyncio.Event | None, timeout_s: float) -> None:
    """Wait for `event` (or just sleep when None) at most `timeout_s`."""
    if event is None:
        await asyncio.sleep(timeout_s)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
