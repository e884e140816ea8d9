"""The access audit log: every decision, appended to a hash-chained table.

Each row stores `row_hash = sha256(prev_hash | canonical row)`, so editing, deleting or
inserting a row breaks the chain at that point and `verify` names the first bad row. Ids are
assigned by the writer as the previous id plus one under a table lock, so they are gapless:
a missing id is a deleted row, and two gateway processes on one database extend one chain.
Deleting the newest rows, or rewriting the whole chain, is only visible against an anchor
(a row id and hash noted elsewhere); `verify(conn, anchor=...)` checks one.

Tokens and secrets never reach this table: an entry carries the credential type and the
credential reference the access service resolved, not the presented value.

Nothing is lost unseen. Every entry this process records gets its instance id and the next
gateway sequence number (`gw_instance`, `gw_seq`, unique together); `verify` reports any
number missing between 1 and the highest written, and, for an instance that is gone, any
missing after it up to the highest it reported handing out (gateway.access.presence). The
reader-facing path goes further: `commit` writes the entry (with the token use it spends,
gateway.access.spent) in one transaction and only then returns, so the decision is
recorded before it is sent and an answer can never be missing from the log.

Two ways in. `commit` is for the decision hot path: it wakes the writer at once, and
concurrent commits share one transaction (group commit, one fsync). `record` only queues
(the API's remote opens, canteen bookkeeping); the writer writes those every
`flush_interval_s` or `batch_size` entries. Writes run on the writer's own thread with a
short lock wait, so a database that is locked or unreachable fails fast: `commit` then
returns None (the caller decides from memory), and the entry is appended to a local spill
file and fsynced before the caller sends anything (gateway.access.audit_spill). Entries stay
queued and are retried; the spill file is replayed by the next start after a crash.

Durability of a commit: on PostgreSQL it is flushed before it returns. On SQLite (WAL) it is
written but not fsynced unless `fsync_each_commit`: a kill -9 of the gateway loses nothing
(the kernel has it), a power cut may lose what came in the last `wal_sync_interval_s`
(0.2 s), after which `_sync_wal` fsyncs it; that fsync per decision would cost more than the
whole rest of the round trip on a busy disk. When the writer is uncontended on SQLite the
write happens on the event loop itself (no thread hand-off); otherwise on its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    String,
    Table,
    Text,
    func,
    insert,
    inspect,
    select,
    text,
    tuple_,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from device_drivers.supervision import ComponentTasks, RequestTasks, SupervisedTask, Supervisor
from gateway.access import spent
from gateway.access.audit_spill import SpillFile, leftovers
from gateway.access.presence import HEARTBEAT_S, gateway_uptime
from gateway.access.spent import ClaimOutcome, TokenClaim
from gateway.store.db import read_engine
from gateway.store.metadata import metadata

if TYPE_CHECKING:
    from gateway.config import SiteConfig

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
WAL_CHECKPOINT_BYTES = 4 << 20
PEER_REASON = "answered_by_peer"  # audit only: another gateway answered this request

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
    # Who did it, for staff actions (enrolling a card); null for devices' decisions.
    Column("actor", String(64), nullable=True),
    # The gateway process and its sequence number: a missing number is a lost decision.
    Column("gw_instance", String(32), nullable=True),
    Column("gw_seq", BigInteger, nullable=True),
)
Index("ux_audit_log_gw_seq", audit_log.c.gw_instance, audit_log.c.gw_seq, unique=True)

# The chained content, in a fixed order; changing it invalidates every existing chain.
_CONTENT = (
    "id", "ts", "device_id", "device_kind", "request_id", "credential_type", "credential_ref",
    "resident_id", "visitor_pass_id", "granted", "action", "reason", "floors",
)
# Chained after _CONTENT when any of them is set, so rows written before they existed
# keep their hashes.
_EXTRA = ("actor", "gw_instance", "gw_seq")
_STRING_LIMITS = {c.name: c.type.length for c in audit_log.columns
                  if isinstance(c.type, String) and c.type.length is not None}
# Statements of the hot path, built once (building them per call cost more than SQLite's
# work for a small batch).
_HEAD = select(audit_log.c.id, audit_log.c.row_hash).order_by(audit_log.c.id.desc()).limit(1)
_ADD_ROWS = insert(audit_log)
_LOCK = text("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
_PG_SESSION = text("SELECT set_config('lock_timeout', :lock, false), "
                   "set_config('statement_timeout', :stmt, false)")
_REFUSAL = {ClaimOutcome.SPENT: "replayed_token", ClaimOutcome.EXHAUSTED: "not_permitted",
            ClaimOutcome.PEER: PEER_REASON}


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
    actor: str | None = None
    gw_instance: str | None = None
    gw_seq: int | None = None

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

    def refused(self, reason: str) -> AuditEntry:
        return dataclasses.replace(self, granted=False, action="none", reason=reason,
                                   floors=None)

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
            "actor": self.actor,
            "gw_instance": self.gw_instance,
            "gw_seq": self.gw_seq,
        }
        for name, limit in _STRING_LIMITS.items():
            value = values.get(name)
            if isinstance(value, str) and len(value) > limit:
                values[name] = value[:limit]
        return values

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["floors"] = list(self.floors) if self.floors is not None else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditEntry:
        values = dict(data)
        floors = values.get("floors")
        values["floors"] = tuple(floors) if floors is not None else None
        return cls(**values)


def _text(value: object) -> str | None:
    """Enum members are stored by value, so the log reads the same as the wire contract."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def canonical(values: Mapping[str, Any]) -> str:
    chained = [values[name] for name in _CONTENT]
    extra = [values.get(name) for name in _EXTRA]
    if any(value is not None for value in extra):
        chained += extra
    return json.dumps(chained, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def chain_hash(prev_hash: str, values: Mapping[str, Any]) -> str:
    return hashlib.sha256(f"{prev_hash}|{canonical(values)}".encode()).hexdigest()


def _already_written(conn: Connection, entries: Sequence[AuditEntry]) -> set[tuple[str, int]]:
    keys = {(e.gw_instance, e.gw_seq) for e in entries
            if e.gw_instance is not None and e.gw_seq is not None}
    if not keys:
        return set()
    found: set[tuple[str, int]] = set()
    ordered = sorted(keys)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start:start + 500]
        found.update((str(i), int(s)) for i, s in conn.execute(
            select(audit_log.c.gw_instance, audit_log.c.gw_seq).where(
                tuple_(audit_log.c.gw_instance, audit_log.c.gw_seq).in_(chunk))).all())
    return found


def append_entries(conn: Connection, entries: Sequence[AuditEntry], *,
                   skip_written: bool = False) -> int:
    """Append entries to the chain inside the caller's transaction; returns the new head id.

    The table lock (SQLite: the write lock BEGIN IMMEDIATE already holds) keeps two writers
    from both extending the same head. `skip_written` leaves out entries whose instance and
    sequence number are in the log already (a spill file replayed after a crash).
    """
    if not entries:
        return 0
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK)
    if skip_written:
        written = _already_written(conn, entries)
        entries = [e for e in entries if (e.gw_instance, e.gw_seq) not in written]
        if not entries:
            return 0
    head = conn.execute(_HEAD).first()
    last_id, prev = (int(head.id), str(head.row_hash)) if head is not None else (0, GENESIS_HASH)
    rows = []
    for entry in entries:
        last_id += 1
        values = entry.content(last_id)
        row_hash = chain_hash(prev, values)
        rows.append({**values, "prev_hash": prev, "row_hash": row_hash})
        prev = row_hash
    conn.execute(_ADD_ROWS, rows)
    return last_id


@dataclass(frozen=True, slots=True)
class ChainCheck:
    ok: bool
    rows: int
    first_bad_id: int | None = None
    problem: str | None = None
    head_id: int | None = None
    head_hash: str | None = None
    # Decisions a gateway numbered but the log does not hold: "instance: seq 12-14".
    gaps: tuple[str, ...] = ()


def _ranges(numbers: Sequence[int]) -> str:
    parts = []
    for _, run in itertools.groupby(enumerate(numbers), lambda p: p[1] - p[0]):
        values = [v for _, v in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ", ".join(parts[:10]) + (f" and {len(parts) - 10} more runs" if len(parts) > 10
                                    else "")


def _sequence_gaps(conn: Connection, seen: Mapping[str, tuple[int, int]],
                   now: float) -> list[str]:
    """Per gateway instance: sequence numbers missing below the highest written, and above
    it up to what an instance that is gone reported handing out."""
    reported: dict[str, tuple[int, float]] = {}
    if inspect(conn).has_table(gateway_uptime.name):
        u = gateway_uptime.c
        for instance, seq, alive in conn.execute(
            select(u.instance_id, func.max(u.seq_assigned), func.max(u.alive_at))
            .group_by(u.instance_id)
        ).all():
            reported[str(instance)] = (int(seq or 0), float(alive))
    gaps = []
    for instance in sorted(set(seen) | set(reported)):
        count, highest = seen.get(instance, (0, 0))
        missing: list[int] = []
        if count != highest:
            present = conn.execute(
                select(audit_log.c.gw_seq).where(audit_log.c.gw_instance == instance)
                .order_by(audit_log.c.gw_seq)).scalars()
            expected = 1
            for seq in present:
                missing.extend(range(expected, int(seq)))
                expected = int(seq) + 1
                if len(missing) > 100_000:
                    break
        handed_out, alive_at = reported.get(instance, (0, now))
        gone = now - alive_at > 3 * HEARTBEAT_S
        if gone and handed_out > highest:
            missing.extend(range(highest + 1, handed_out + 1))
        if missing:
            gaps.append(f"gateway {instance}: {len(missing)} decision(s) missing, "
                        f"seq {_ranges(missing)}")
    return gaps


def verify(conn: Connection, anchor: tuple[int, str] | None = None,
           now: float | None = None) -> ChainCheck:
    """Walk the chain in id order; stop at the first row that does not follow from the last.

    `anchor` is a (row id, row hash) recorded earlier, e.g. printed by a previous verify;
    it catches the newest rows being deleted or the whole chain being recomputed. An intact
    chain is then checked for gateway sequence numbers that never arrived (`gaps`).
    """
    prev_hash, expected_id, rows = GENESIS_HASH, 1, 0
    anchor_seen = anchor is None
    seen: dict[str, tuple[int, int]] = {}  # instance -> (rows, highest seq)
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
        elif chain_hash(prev_hash, {n: row[n] for n in (*_CONTENT, *_EXTRA)}) != row["row_hash"]:
            problem = "row content does not match its hash (row edited)"
        elif anchor is not None and row_id == anchor[0]:
            if row["row_hash"] != anchor[1]:
                problem = "row hash differs from the anchor (chain rewritten)"
            anchor_seen = True
        if problem is not None:
            stream.close()
            return ChainCheck(False, rows, row_id, problem, expected_id - 1 or None,
                              prev_hash if rows else None)
        instance, seq = row["gw_instance"], row["gw_seq"]
        if instance is not None and seq is not None:
            count, highest = seen.get(instance, (0, 0))
            seen[instance] = (count + 1, max(highest, int(seq)))
        rows += 1
        prev_hash, expected_id = str(row["row_hash"]), row_id + 1
    head_id, head_hash = (expected_id - 1, prev_hash) if rows else (None, None)
    if not anchor_seen and anchor is not None:
        return ChainCheck(False, rows, anchor[0], f"anchored row {anchor[0]} is missing "
                          "(newest rows deleted)", head_id, head_hash)
    gaps = _sequence_gaps(conn, seen, time.time() if now is None else now)
    if gaps:
        return ChainCheck(False, rows, None, "decisions missing from the log: "
                          + "; ".join(gaps), head_id, head_hash, tuple(gaps))
    return ChainCheck(True, rows, None, None, head_id, head_hash)


class AuditError(RuntimeError):
    """Entries could not be written (nor spilled) at shutdown; the log names how many."""


class _Busy(Exception):
    """The database is locked by another writer; the decision was spilled and goes out."""


@dataclass(frozen=True, slots=True)
class Committed:
    """What `commit` wrote: the entry as recorded and what its token claim found."""

    entry: AuditEntry
    outcome: ClaimOutcome | None  # None: the entry spent no token


@dataclass(eq=False)
class _Item:
    entry: AuditEntry
    claim: TokenClaim | None = None
    waiter: asyncio.Future[Committed] | None = None
    decided: bool = True  # False while a commit() caller waits for the claim's verdict
    spilled: bool = False
    result: Committed | None = field(default=None, repr=False)


class AuditLog:
    """Ordered writer of audit entries: group-committed on demand, batched otherwise.

    `commit` returns once its entry (and token use) is written, or spilled when the store
    cannot take it in time. `record` is safe to call from the event loop's hot path: it
    never blocks or touches the database. Entries are written in the order recorded. An
    entry leaves the queue only when the transaction holding it has committed, so a failed
    or interrupted write is retried and never duplicated.
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
        instance_id: str | None = None,
        spill_dir: Path | None = None,
        lock_wait_s: float = 0.25,
        commit_timeout_s: float = 1.0,
        fsync_each_commit: bool = False,
        wal_sync_interval_s: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self._retry_max_s = retry_max_s
        self._shutdown_attempts = shutdown_attempts
        self._warn_pending = warn_pending
        self.instance_id = instance_id or secrets.token_hex(8)
        self._spill = SpillFile(spill_dir, self.instance_id) if spill_dir is not None else None
        self._spill_dir = spill_dir
        self.lock_wait_s = lock_wait_s
        self.commit_timeout_s = commit_timeout_s
        self.fsync_each_commit = fsync_each_commit
        self.wal_sync_interval_s = wal_sync_interval_s
        self._unsynced = False
        self._synced_at = 0.0
        self._syncing: asyncio.Future[None] | None = None
        self._failures = 0  # consecutive failed writes; > 0: commits fall back at once
        url = engine.url
        self._sqlite_file = (url.get_backend_name() == "sqlite"
                             and url.database not in (None, "", ":memory:"))
        self._inline_possible = self._sqlite_file and not fsync_each_commit
        self._inline = self._inline_possible
        self._own: Connection | None = None  # the writer's own connection (`_connection`)
        self._own_wait = -1.0
        self._clock = clock
        self._seq = itertools.count(1)
        self.assigned_seq = 0
        self._stamped: deque[tuple[float, int]] = deque()
        self._reportable = 0
        self._pending: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._spilling = asyncio.Lock()
        self._inflight: asyncio.Future[list[Committed]] | None = None
        # Writes a decision starts itself (see _kick); closed with the component.
        self._helpers = RequestTasks("audit", limit=4)
        self._tasks = ComponentTasks(supervisor, "audit")
        self._writer: SupervisedTask | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._skip_written = False
        self._closed = False
        self.written = 0
        self.write_errors = 0
        self.inline_writes = 0  # batches written on the event loop (SQLite, uncontended)
        self.busy_releases = 0  # decisions let go, spilled, while another writer held SQLite
        self._busy = False  # a write of ours waits for SQLite's lock
        self._reader: Engine | None = None  # SQLite: reads spent tokens while it is busy
        self.fallbacks = 0  # commits answered from memory because the database did not take them
        self.spilled = 0
        self.replayed = 0  # entries of a crashed instance's spill file written at start

    @classmethod
    def from_config(cls, engine: Engine, config: SiteConfig, *, instance_id: str | None = None,
                    supervisor: Supervisor | None = None) -> AuditLog:
        """The site's audit log: spill directory and commit sync from its `audit` keys."""
        return cls(engine, supervisor=supervisor, instance_id=instance_id,
                   spill_dir=config.audit_spill_directory,
                   fsync_each_commit=config.audit.fsync_each_commit)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- in ---------------------------------------------------------------------------

    def _stamp(self, entry: AuditEntry) -> AuditEntry:
        if entry.gw_seq is not None:
            return entry
        self.assigned_seq = next(self._seq)
        self._stamped.append((time.monotonic(), self.assigned_seq))
        if len(self._stamped) > 100_000:  # nobody asks (no presence): keep it bounded
            self._reportable = self._stamped.popleft()[1]
        return dataclasses.replace(entry, gw_instance=self.instance_id, gw_seq=self.assigned_seq)

    def reportable_seq(self, settle_s: float = 2.0) -> int:
        """The highest sequence number handed out at least `settle_s` ago: by then its entry
        is in the database or the spill file, unless something lost it. The presence
        heartbeat records it so `verify` can see decisions missing at a dead gateway's end.
        """
        horizon = time.monotonic() - settle_s
        while self._stamped and self._stamped[0][0] <= horizon:
            self._reportable = self._stamped.popleft()[1]
        return self._reportable

    def _enqueue(self, item: _Item) -> None:
        if self._closed:
            raise AuditError("audit log is closed; the entry would be lost")
        self._pending.append(item)
        if len(self._pending) >= self.batch_size or not item.decided:
            self._wake.set()
        if len(self._pending) == self._warn_pending:
            log.warning("audit: %d entries waiting for the database", self._warn_pending)

    def record(self, entry: AuditEntry, claim: TokenClaim | None = None) -> None:
        """Queue an entry whose decision is already made (and maybe already sent)."""
        self._enqueue(_Item(self._stamp(entry), claim))

    def record_decision(
        self, device_id: str, device_kind: str, decision: DecisionLike, now: float,
        request_id: str | None = None,
    ) -> None:
        self.record(AuditEntry.from_decision(device_id, device_kind, decision, now, request_id))

    async def commit(self, entry: AuditEntry, claim: TokenClaim | None = None) -> Committed | None:
        """Write the entry (and spend the token of `claim`) before returning.

        The returned entry is what was recorded: a claim that finds its token spent, its
        visitor pass used up, or its request answered by another gateway turns the entry
        into that denial, and the caller must send exactly that. None means the database
        did not take it in time: the entry was spilled to disk (when a spill directory is
        configured) and stays queued, and the caller decides from memory.
        """
        loop = asyncio.get_running_loop()
        degraded = self._failures > 0
        # SQLite held by another writer right now (a write of ours is waiting for it): go
        # out at once, spilled, like the decisions `_release_waiters` let go. A visitor
        # pass's use waits for the database, so that `max_uses` holds across processes.
        busy = (self._busy and self._spill is not None and not degraded
                and (claim is None or claim.pass_id is None))
        if busy and claim is not None:
            found = self._already_claimed(claim)
            if found is not None:
                # Spent before: known without the write lock, refused at once. The token
                # needs no second record; the refusal is logged like any decision.
                refused = self._stamp(entry).refused(_REFUSAL[found])
                self._enqueue(_Item(refused))
                return Committed(refused, found)
        item = _Item(self._stamp(entry), claim,
                     None if degraded or busy else loop.create_future(),
                     decided=degraded or busy)
        self._enqueue(item)
        if busy and self._spill_now([item]):
            self.busy_releases += 1
            return None
        try:
            if item.waiter is None:
                # The store failed the last write and the writer is backing off: do not make
                # every reader wait for a timeout meanwhile.
                raise ConnectionError("the audit store is failing")
            self._kick()
            async with asyncio.timeout(self.commit_timeout_s):
                return await asyncio.shield(item.waiter)
        except Exception as exc:  # TimeoutError, the write failed, or the database is busy
            if item.result is not None:  # settled just as the wait ended
                return item.result
            item.decided = True
            if not isinstance(exc, _Busy):
                self.fallbacks += 1
                log.warning("audit: decision on %s not recorded in time (%s); deciding from "
                            "memory", entry.device_id, type(exc).__name__)
            await self._spill_items([item])
            return None

    def _kick(self) -> None:
        """Start writing now if the writer is idle, rather than waiting for its task to be
        scheduled: one event-loop turn less on every decision."""
        if self._inflight is None and not self._lock.locked() and self._executor is not None:
            # A short helper of the supervised writer, held by the component and awaited
            # when it closes; its failure goes to the writer.
            self._helpers.start(self._write_now(), name="audit-write-now")

    async def _write_now(self) -> None:
        try:
            await self._write_batch()
        except Exception as exc:
            # The waiting decision has its answer already (the write's failure settled it);
            # the writer takes the batch from here: retries, backs off, spills, and logs.
            log.debug("audit: a decision's own write failed (%s); the writer retries",
                      type(exc).__name__)
            self._wake.set()

    async def record_decision_durably(
        self, device_id: str, device_kind: str, decision: DecisionLike, now: float,
        request_id: str | None = None,
    ) -> bool:
        """`record_decision`, but written (or spilled) before it returns: for a caller that
        is about to act on the decision. True when it is in the database."""
        entry = AuditEntry.from_decision(device_id, device_kind, decision, now, request_id)
        return await self.commit(entry) is not None

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._closed = False
        self._stop.clear()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        if self._spill_dir is not None:
            await asyncio.to_thread(self._replay_leftovers)
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
            await self._helpers.close()
            if self._syncing is not None:  # left behind by a writer that was cancelled
                with contextlib.suppress(Exception):
                    await self._syncing
            await self._tasks.stop()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
            if self._inflight is None:
                self._drop_own()
            if self._reader is not None and self._reader is not self._engine:
                self._reader.dispose()
            self._reader = None
        unwritten = len(self._pending)
        if unwritten and self._spill is not None:
            await self._spill_items(list(self._pending))
            if all(item.spilled for item in self._pending):
                log.error("audit: %d entries could not be written; they are in %s and the "
                          "next start writes them", unwritten, self._spill.path)
                self._spill.close(remove_if_empty=False)
                return
        if self._spill is not None:
            self._spill.close()
        if unwritten:
            raise AuditError(f"{unwritten} audit entries could not be written")

    async def flush(self) -> None:
        """Write everything recorded so far; raises when the database refuses."""
        while self._pending:
            await self._write_batch()

    # --- the writer -------------------------------------------------------------------

    async def _run(self) -> None:
        self._failures = 0
        while not (self._stop.is_set() and not self._pending):
            if self._failures:
                # Backing off: only shutdown cuts the wait short, not a filling queue; a
                # waiting commit() has fallen back to memory meanwhile.
                delay = min(self._retry_max_s, self.flush_interval_s * 2**self._failures)
                await _wait(self._stop if not self._stop.is_set() else None, delay)
            elif not self._stop.is_set():
                await _wait(self._wake, self.flush_interval_s)
                self._wake.clear()
            try:
                await self.flush()
                self._failures = 0
                spill_done = (self._spill is not None and self._spill.size > 0
                              and not self._pending)
                due = time.monotonic() - self._synced_at >= self.wal_sync_interval_s
                if self._unsynced and (due or spill_done) and (
                        self._syncing is None or self._syncing.done()):
                    self._synced_at = time.monotonic()
                    # Beside the writer, not in its way: the next batch need not wait. Held in
                    # `_syncing` and awaited before the spill is cleared; it logs its own
                    # failures and marks the WAL unsynced for the next interval.
                    self._syncing = asyncio.create_task(
                        asyncio.to_thread(self._sync_logged), name="audit-wal-sync")
                if spill_done and self._syncing is not None:
                    await self._syncing  # what the spill file holds is on disk for good
                if spill_done and self._spill is not None:
                    async with self._spilling:  # no append may interleave
                        if not self._pending:
                            self._spill.clear()
            except Exception as exc:
                self._failures += 1
                self.write_errors += 1
                if _busy(exc):  # another writer holds the database: expected, and retried
                    log.warning("audit: database busy (%s), %d entries pending, spilled",
                                type(exc).__name__, len(self._pending))
                else:
                    log.exception("audit: write failed, %d entries pending",
                                  len(self._pending))
                await self._spill_items(list(self._pending))
                if self._stop.is_set() and self._failures >= self._shutdown_attempts:
                    log.error("audit: giving up at shutdown with %d entries unwritten",
                              len(self._pending))
                    return
        with contextlib.suppress(Exception):
            if self._syncing is not None:
                await self._syncing
            if self._unsynced:
                await asyncio.to_thread(self._sync_wal)

    async def _spill_items(self, items: list[_Item]) -> None:
        """fsync what is not on disk yet; never raises (a full disk is logged)."""
        if self._spill is None:
            return
        # One spill at a time: an item another spill is writing counts as spilled only once
        # its fsync is done, and nothing is written twice.
        async with self._spilling:
            todo = [i for i in items if not i.spilled]
            if not todo:
                return
            spill = self._spill
            try:
                await asyncio.to_thread(spill.append,
                                        [(i.entry.to_json(), i.claim) for i in todo])
            except OSError:
                log.exception("audit: could not spill %d entries to %s", len(todo), spill.path)
                return
            for item in todo:
                item.spilled = True
            self.spilled += len(todo)

    async def _write_batch(self) -> None:
        async with self._lock:
            while self._inflight is not None:  # a cancelled caller's write is still running
                await asyncio.wait({self._inflight})
            count = min(len(self._pending), self.batch_size)
            if count == 0:
                return
            batch = list(itertools.islice(self._pending, count))
            if self._inline and self._write_inline(batch):
                return
            if self._inline:
                self._release_waiters(batch)  # busy: do not hold decisions behind the lock
            assert self._executor is not None
            write = asyncio.get_running_loop().run_in_executor(
                self._executor, self._append, batch, self._skip_written, self.lock_wait_s)
            self._inflight = write
            # Registered first, so it settles the queue before any awaiter resumes.
            write.add_done_callback(lambda done: self._settle(batch, done))
            await asyncio.shield(write)

    def _write_inline(self, batch: list[_Item]) -> bool:
        """On SQLite, try the write right here on the event loop, not waiting at all for a
        lock: uncontended it takes a few hundred microseconds without an fsync, less than
        handing it to the writer thread and back. False when the database is busy (another
        writer holds the lock): then the writer thread waits for it, boundedly."""
        try:
            results = self._append(batch, self._skip_written, 0.0)
        except OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                self._inline = False  # something else is wrong: the thread path reports it
            return False
        except Exception as exc:
            future: asyncio.Future[list[Committed]] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
            self._settle(batch, future)
            raise
        self.inline_writes += 1
        self._settle_ok(batch, results)
        return True

    def _release_waiters(self, batch: list[_Item]) -> None:
        """SQLite, and another writer holds the database (the telemetry worker's rollups
        hold it for tens of milliseconds at a time): rather than make the readers wait for
        it, write the waiting decisions to the spill file (the kernel has them when this
        returns: a kill -9 loses nothing; fsynced with the WAL) and let them go out as
        decided from memory. The thread writes them to the store as soon as the lock is
        free, where another process sees their spent tokens from then on."""
        # A token already spent is left waiting: the write will say so in a moment.
        waiting = [i for i in batch if i.waiter is not None and not i.waiter.done()
                   and (i.claim is None or (i.claim.pass_id is None
                                            and self._already_claimed(i.claim) is None))]
        if not waiting or not self._spill_now(batch):
            return
        self._busy = True  # until this write settles
        for item in waiting:
            item.decided = True
            assert item.waiter is not None
            item.waiter.set_exception(_Busy())
            item.waiter.exception()
        self.busy_releases += len(waiting)

    def _already_claimed(self, claim: TokenClaim) -> ClaimOutcome | None:
        """What the store already says about this token, read without the write lock (a
        WAL reader is never blocked by a writer): the outcome of claiming it if that would
        not be FRESH, else None. A token claimed but not committed yet by another process
        at this moment reads as unclaimed: that is the window `_release_waiters` opens."""
        if self._reader is None:
            self._reader = read_engine(self._engine)
        try:
            with self._reader.connect() as conn:
                row = conn.execute(spent.EXISTING, {"b_key": claim.token_key}).first()
        except Exception:
            log.warning("audit: could not read spent tokens", exc_info=True)
            return ClaimOutcome.SPENT  # unknown: never let it go out unchecked
        if row is None:
            return None
        if row.use_ref == claim.use_ref:
            if claim.same_ref_is_ours:
                return None
            if (row.gw_instance != self.instance_id
                    and self._clock() - float(row.spent_at) < spent.PEER_WINDOW_S):
                return ClaimOutcome.PEER
        return ClaimOutcome.SPENT

    def _spill_now(self, items: list[_Item]) -> bool:
        """Append to the spill file without an fsync (in the kernel when this returns;
        fsynced with the WAL by `_sync_logged`); on the loop, it is a few microseconds."""
        if self._spill is None:
            return False
        fresh = [i for i in items if not i.spilled]
        try:
            self._spill.append([(i.entry.to_json(), i.claim) for i in fresh], fsync=False)
        except OSError:
            log.exception("audit: could not spill; the decisions wait for the database")
            return False
        for item in fresh:
            item.spilled = True
        self.spilled += len(fresh)
        self._unsynced = True
        return True

    def _settle(self, batch: list[_Item], write: asyncio.Future[list[Committed]]) -> None:
        self._inflight = None
        self._busy = False
        if write.cancelled() or write.exception() is not None:
            error = write.exception() if not write.cancelled() else None
            if isinstance(error, IntegrityError):
                # A commit whose outcome we never heard may have gone through: the retry
                # leaves out what is there already.
                self._skip_written = True
            for item in batch:
                if item.waiter is not None and not item.waiter.done():
                    item.waiter.set_exception(error or asyncio.CancelledError())
                    item.waiter.exception()  # retrieved: the caller may have given up
            return
        self._inline = self._inline_possible  # the store works: try the fast path again
        self._settle_ok(batch, write.result())

    def _settle_ok(self, batch: list[_Item], results: list[Committed]) -> None:
        self._skip_written = False
        for item, committed in zip(batch, results, strict=True):
            self._pending.popleft()
            item.result = committed
            if item.waiter is not None and not item.waiter.done():
                item.waiter.set_result(committed)
            elif (item.claim is not None and item.waiter is not None
                  and committed.outcome not in (None, ClaimOutcome.FRESH)):
                log.error("audit: a decision sent from memory on %s turned out %s once "
                          "recorded", item.entry.device_id, committed.outcome)
        self.written += len(batch)

    @contextlib.contextmanager
    def _connection(self, lock_wait_s: float) -> Iterator[Connection]:
        """The writer's own connection, kept open (a checkout from the pool, its ping on
        PostgreSQL and the settings around it cost more than the write), waiting at most
        `lock_wait_s` for another writer's lock: a locked database must turn into a fast
        fallback, not a gate that stays shut for 30 s.

        On SQLite it commits without an fsync unless `fsync_each_commit`
        (`synchronous=NORMAL`, no checkpoints on this path; see `_sync_wal`): it is not the
        pool's, so payments never inherit that. On PostgreSQL every commit is flushed (the
        server default). Dropped after any error but a busy SQLite database, and opened
        again on the next write.
        """
        if self._own is None:
            conn = self._engine.connect()
            if self._sqlite_file:
                raw = conn.connection.driver_connection
                assert raw is not None
                if not self.fsync_each_commit:
                    raw.execute("PRAGMA synchronous = NORMAL")
                    raw.execute("PRAGMA wal_autocheckpoint = 0")
            elif conn.dialect.name == "postgresql":
                # Commits stay synchronous: on PostgreSQL the WAL flush adds a fraction of a
                # millisecond to the round trips the write needs anyway.
                ms = int(self.lock_wait_s * 1000)
                conn.execute(_PG_SESSION, {"lock": f"{ms}ms", "stmt": f"{max(ms * 8, 2000)}ms"})
                conn.commit()
            self._own, self._own_wait = conn, -1.0
        conn = self._own
        if self._sqlite_file and self._own_wait != lock_wait_s:
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.execute(f"PRAGMA busy_timeout = {int(lock_wait_s * 1000)}")
            self._own_wait = lock_wait_s
        try:
            yield conn
        except OperationalError as exc:
            if not self._sqlite_file or ("locked" not in str(exc) and "busy" not in str(exc)):
                self._drop_own()
            raise
        except Exception:
            self._drop_own()
            raise

    def _drop_own(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            with contextlib.suppress(Exception):
                own.invalidate()
                own.close()

    def _append(self, batch: list[_Item], skip_written: bool,
                lock_wait_s: float) -> list[Committed]:
        try:
            return self._append_once(batch, skip_written, lock_wait_s)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # The kept connection had died (a database restart, an idle timeout): once more
            # on a fresh one before the decisions fall back to memory.
            return self._append_once(batch, skip_written, lock_wait_s)

    def _append_once(self, batch: list[_Item], skip_written: bool,
                     lock_wait_s: float) -> list[Committed]:
        with self._connection(lock_wait_s) as conn, conn.begin():
            now = self._clock()
            results = []
            for item in batch:
                entry, outcome = item.entry, None
                if item.claim is not None:
                    decided = item.decided
                    outcome = spent.claim(conn, item.claim, now, self.instance_id,
                                          decided=decided)
                    if not decided and outcome is not ClaimOutcome.FRESH:
                        entry = entry.refused(_REFUSAL[outcome])
                results.append(Committed(entry, outcome))
            append_entries(conn, [r.entry for r in results], skip_written=skip_written)
        self._unsynced = True
        return results

    def _sync_logged(self) -> None:
        try:
            if self._spill is not None and self._spill.dirty:
                self._spill.sync()
            self._sync_wal()
        except Exception:
            self._unsynced = True  # tried again at the next interval
            log.warning("audit: could not sync the WAL", exc_info=True)

    def _sync_wal(self) -> None:
        """Make what was committed without an fsync durable against a power cut too.

        A commit at SQLite `synchronous=NORMAL` is atomic and, once it returns, in the
        kernel's hands: a kill -9 of the gateway loses nothing of it. Only a power cut or an
        OS crash before the WAL reaches the disk could; this fsyncs the WAL at most
        `wal_sync_interval_s` after such a commit, on its own thread so the writer never
        waits for it. Any payment's commit, which fsyncs, makes everything before it durable
        at once. When the WAL has grown past WAL_CHECKPOINT_BYTES it is checkpointed here
        (PASSIVE: writers go on meanwhile) instead of on a decision's commit.
        """
        self._unsynced = False
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return
        wal = f"{url.database}-wal"
        try:
            size = os.path.getsize(wal)
        except FileNotFoundError:
            return  # checkpointed and closed: in the database file already
        if size > WAL_CHECKPOINT_BYTES:
            with self._engine.connect() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                raw.execute("PRAGMA wal_checkpoint(PASSIVE)")  # fsyncs the WAL first
            return
        fd = os.open(wal, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- a crashed instance's spill ----------------------------------------------------

    def _replay_leftovers(self) -> None:
        with leftovers(self._spill_dir, self.instance_id) as found:
            for leftover in found:
                entries = []
                with self._engine.begin() as conn:
                    for spilled in leftover.items:
                        entry = AuditEntry.from_json(spilled.entry)
                        if spilled.claim is not None:
                            spent.claim(conn, spilled.claim, entry.ts, entry.gw_instance,
                                        decided=True)
                        entries.append(entry)
                    append_entries(conn, entries, skip_written=True)
                leftover.done()
                self.replayed += len(entries)
                log.warning("audit: wrote %d entries left in %s by a gateway that stopped "
                            "without writing them", len(entries), leftover.path.name)


def _busy(exc: BaseException) -> bool:
    """A lock another writer holds (SQLite's `database is locked`, PostgreSQL's lock
    timeout) or our own commit deadline: transient contention, not a fault to trace."""
    if isinstance(exc, TimeoutError):
        return True
    text = str(exc).lower()
    return "database is locked" in text or "lock timeout" in text


async def _wait(event: asyncio.Event | None, timeout_s: float) -> None:
    """Wait for `event` (or just sleep when None) at most `timeout_s`."""
    if event is None:
        await asyncio.sleep(timeout_s)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
