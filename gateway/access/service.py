"""The access service: the pure decision wired to the store, the replay guard and the clock.

`decide` is synchronous and touches only memory. `admit` is what a reader's request goes
through: the same decision, then its audit entry and the token it spends written in one
transaction (gateway.access.audit.AuditLog.commit, group-committed) before it returns, so
a token opens once across every reader, gateway process and restart, and a visitor pass's
`max_uses` holds (gateway.access.spent). When the database does not take the write in time
the decision made from memory stands (the in-memory replay guard still refuses replays at
this gateway) and the write is spilled to disk and caught up later.

The index catches up off the event loop whenever `directory_changes` moves
(polled every 0.3 s), reloading only what changed, so a revocation written by any process
on the same database is in force within about half a second at 20,000 residents
(docs/bench-access.md); an API write in this process calls `refresh_now()` and the very
next request sees it. When the database is unreachable the last index keeps serving: gates
must keep opening for residents while the store is being repaired.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterable, Sequence
from datetime import tzinfo
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, Self
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from device_drivers import tokens
from device_drivers.supervision import ComponentTasks, Supervisor
from device_drivers.vocabulary import CREDENTIAL_TYPES, Credential, Reason
from gateway.access import spent
from gateway.access.audit import AuditEntry, AuditLog
from gateway.access.decision import (
    AccessDecision,
    Reader,
    decide,
    decide_for_resident,
    replayed,
    without_token,
)
from gateway.access.index import DirectoryIndex, build_index, empty_index
from gateway.access.spent import ClaimOutcome, TokenClaim
from gateway.store.db import read_engine
from gateway.store.directory import (
    ALL_PARTS,
    Building,
    ChangeSet,
    Floor,
    directory_version,
    load_delta,
    load_snapshot,
    pending_changes,
    record_visitor_pass_uses,
    upsert_building,
)

if TYPE_CHECKING:
    from gateway.config import SiteConfig

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 3600.0  # spent tokens past any use are deleted this often


class IssuedToken(NamedTuple):
    """A QR token for the app or a visitor's browser (`POST /api/v1/me/access-token`)."""

    qr: str
    expires_at: float
    credential_id: str

    def __repr__(self) -> str:  # the token is a bearer credential until it expires
        return f"IssuedToken(credential_id={self.credential_id!r}, expires_at={self.expires_at})"


class AccessService:
    """Owns the current index, the site-wide ReplayGuard and visitor-pass use counts."""

    def __init__(
        self,
        engine: Engine,
        readers: Iterable[Reader],
        *,
        timezone: str | tzinfo = "UTC",
        poll_interval_s: float = 0.3,
        buildings: Sequence[tuple[Building, Sequence[Floor]]] = (),
        supervisor: Supervisor | None = None,
        journal: AuditLog | None = None,
    ) -> None:
        self._engine = engine
        self.journal = journal
        self._read = read_engine(engine)
        self._readers = {r.device_id: r for r in readers}
        self._tz = ZoneInfo(timezone) if isinstance(timezone, str) else timezone
        self._poll_s = poll_interval_s
        self._buildings = list(buildings)
        self._index = empty_index(self._tz)
        self._guard = tokens.ReplayGuard()
        self._rebuild = asyncio.Lock()
        self._pass_uses: dict[str, int] = {}
        self._unsaved_uses: set[str] = set()
        self._tasks = ComponentTasks(supervisor, "access")
        self.poll_failures = 0
        self.rebuilds = 0

    @classmethod
    def from_config(cls, engine: Engine, config: SiteConfig,
                    supervisor: Supervisor | None = None,
                    journal: AuditLog | None = None) -> AccessService:
        """Readers are the gate, elevator and canteen devices; buildings mirror into the store."""
        readers = [
            Reader(d.device_id, d.kind, d.building, gate_ids=frozenset(d.gate_ids),
                   restricted=d.restricted, duration_s=config.access.unlock_duration_s)
            for d in config.devices if d.kind in ("gate", "elevator", "canteen")
        ]
        buildings = [
            (Building(b.id, b.name), [Floor(b.id, f.number, f.name, f.public) for f in b.floors])
            for b in config.buildings
        ]
        return cls(engine, readers, timezone=config.site.timezone, buildings=buildings,
                   supervisor=supervisor, journal=journal)

    async def __aenter__(self) -> Self:
        if self._buildings:
            await asyncio.to_thread(self._mirror_buildings)
        await self.refresh_now()
        await self._tasks.start()
        self._tasks.spawn("access-index-watch", self._watch)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._tasks.stop()
        try:
            await self._save_pass_uses()
        finally:
            if self._read is not self._engine:
                self._read.dispose()

    @property
    def index(self) -> DirectoryIndex:
        return self._index

    @property
    def readers(self) -> dict[str, Reader]:
        return self._readers

    # --- the hot path ---------------------------------------------------------------------

    def decide(self, device_id: str, credential_type: str, value: str,
               now: float | None = None) -> AccessDecision:
        """The decision from memory alone (the replay guard of this process, use counts as
        far as it knows); `admit` makes it durable and site-wide."""
        decision, _ = self._decide(device_id, credential_type, value,
                                   time.time() if now is None else now, None)
        return decision

    def _decide(self, device_id: str, credential_type: str, value: str, now: float,
                use_ref: str | None, payment: bool = False,
                ) -> tuple[AccessDecision, TokenClaim | None]:
        reader = self._readers.get(device_id)
        if reader is None:
            known = isinstance(credential_type, str) and credential_type in CREDENTIAL_TYPES
            return AccessDecision(False, "none", None, Reason.MALFORMED_REQUEST, 0, None, None,
                                  str(credential_type) if known else "invalid"), None
        decision = decide(self._index, reader, Credential(credential_type, value), now,
                          self._pass_uses)
        claim = None
        token = decision.consume
        if token is not None:
            if not self._guard.use(token, now):
                return replayed(decision), None
            decision = without_token(decision)
            if use_ref is not None:
                pass_id = decision.visitor_pass_id if decision.granted else None
                claim = TokenClaim(token.spent_key, token.issued_at, device_id, use_ref,
                                   pass_id=pass_id, same_ref_is_ours=payment)
        if decision.granted and decision.visitor_pass_id is not None:
            self._count_pass_use(decision.visitor_pass_id, durable=claim is not None)
        return decision, claim

    async def admit(self, device_id: str, credential_type: str, value: str,
                    now: float | None = None, *, request_id: str | None = None,
                    payment_ref: str | None = None) -> AccessDecision | None:
        """Decide, record the decision and the token it spends, and only then return it.

        `request_id` is the reader's (it goes to the audit log); `payment_ref`
        ("terminal/txn_id") marks a canteen resolution, which a retry of the same payment
        may repeat. None: another gateway on the same broker is answering this very request
        (send nothing). Without a journal this is `decide`.
        """
        now = time.time() if now is None else now
        reader = self._readers.get(device_id)
        use_ref = payment_ref if payment_ref is not None else f"{device_id}/{request_id}"
        decision, claim = self._decide(device_id, credential_type, value, now,
                                       use_ref if self.journal is not None else None,
                                       payment=payment_ref is not None)
        if self.journal is None:
            return decision
        kind = reader.kind if reader is not None else "unknown"
        entry = AuditEntry.from_decision(device_id, kind, decision, now, request_id)
        committed = await self.journal.commit(entry, claim)
        if committed is None or committed.outcome in (None, ClaimOutcome.FRESH):
            return decision  # recorded as decided, or the store is away: memory decides
        if (committed.outcome is not ClaimOutcome.EXHAUSTED and decision.granted
                and decision.visitor_pass_id in self._pass_uses):
            self._pass_uses[decision.visitor_pass_id] -= 1  # counted above, did not happen
        if committed.outcome is ClaimOutcome.PEER:
            return None
        if committed.outcome is ClaimOutcome.EXHAUSTED and decision.visitor_pass_id:
            visit = self._index.visitor_passes.get(decision.visitor_pass_id)
            if visit is not None:
                self._pass_uses[visit.pass_id] = max(visit.max_uses,
                                                     self._pass_uses.get(visit.pass_id, 0))
            return AccessDecision(False, "none", None, Reason.NOT_PERMITTED, 0,
                                  decision.resident_id, decision.credential_ref,
                                  decision.credential_type,
                                  visitor_pass_id=decision.visitor_pass_id)
        return replayed(decision)

    def remote_readers(self) -> dict[str, str]:
        """device id -> kind of the gates and elevators an app may open or call remotely."""
        return {device_id: reader.kind for device_id, reader in self._readers.items()
                if reader.kind in ("gate", "elevator")}

    def check_remote(self, resident_id: str, device_id: str,
                     now: float | None = None) -> AccessDecision:
        """Remote unlock / elevator call from the app: the resident's rights at that reader."""
        reader = self._readers.get(device_id)
        if reader is None:
            return AccessDecision(False, "none", None, Reason.NOT_PERMITTED, 0, resident_id,
                                  None, "app")
        return decide_for_resident(self._index, reader, resident_id,
                                   time.time() if now is None else now)

    def _count_pass_use(self, pass_id: str, durable: bool) -> None:
        """Count in memory (so this process refuses the pass once it is used up without
        asking the store); without a durable claim, also save the count later."""
        visit = self._index.visitor_passes[pass_id]
        self._pass_uses[pass_id] = max(visit.uses, self._pass_uses.get(pass_id, 0)) + 1
        if not durable:
            self._unsaved_uses.add(pass_id)

    # --- tokens for the app and visitors --------------------------------------------------

    def issue_qr(self, resident_id: str, now: float | None = None,
                 credential_id: str | None = None) -> IssuedToken | None:
        """A QR from the resident's newest usable phone credential (or the one named).

        None when there is none: the resident must enrol a phone first.
        """
        index = self._index
        usable = index.phones_of.get(resident_id, ()) if index.active_resident(
            resident_id) else ()
        if credential_id is None and usable:
            credential_id = usable[-1]
        if credential_id is None or credential_id not in usable:
            return None
        return self._mint(credential_id, now)

    def issue_visitor_qr(self, pass_id: str, now: float | None = None) -> IssuedToken | None:
        """A QR for a visitor's browser; None when the pass is unknown or revoked."""
        index = self._index
        visit = index.visitor_passes.get(pass_id)
        if visit is None or visit.revoked or index.active_resident(visit.issuer_id) is None:
            return None
        return self._mint(visit.credential_id, now)

    def _mint(self, credential_id: str, now: float | None) -> IssuedToken:
        now = time.time() if now is None else now
        entry = self._index.credential(credential_id)
        assert entry is not None
        secret = entry.secret
        return IssuedToken(tokens.mint_qr(credential_id, secret, now),
                           tokens.qr_expires_at(now), credential_id)

    # --- keeping the index current --------------------------------------------------------

    async def refresh_now(self, full: bool = False) -> None:
        """Catch up with the store now; the next decision sees every write committed before.

        Only what changed is reloaded (single cards and phones row by row, other parts of
        the directory whole) unless `full` is given.
        """
        async with self._rebuild:
            started = time.perf_counter()
            previous = self._index
            index = await asyncio.to_thread(self._load, previous, full)
            if index is previous:
                return
            self._index = index
            self.rebuilds += 1
            self._pass_uses = {pid: n for pid, n in self._pass_uses.items()
                               if pid in index.visitor_passes
                               and n > index.visitor_passes[pid].uses}
        log.info("access index version %d in %.3f s: %s", index.version,
                 time.perf_counter() - started, index.sizes)

    def _load(self, previous: DirectoryIndex, full: bool) -> DirectoryIndex:
        """The index after the changes since `previous`; `previous` itself if there are none."""
        # A rebuild allocates a few hundred thousand objects; left on, the cyclic GC runs
        # dozens of passes over the whole heap meanwhile, which made the rebuild 1.6x slower.
        # Nothing built here forms reference cycles, so refcounting frees all of it anyway.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with self._read.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    version = directory_version(conn)
                    if version == previous.version and not full:
                        return previous
                    if full or previous.version == 0 or version < previous.version:
                        changes = ChangeSet(ALL_PARTS)
                    else:
                        changes = pending_changes(conn, previous.version)
                    snapshot = load_snapshot(conn, changes.parts)
                    delta = load_delta(conn, changes)
            return build_index(snapshot, self._tz, previous, delta)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _version(self) -> int:
        with self._read.connect() as conn:
            return directory_version(conn)

    def _mirror_buildings(self) -> None:
        with self._engine.begin() as conn:
            for building, building_floors in self._buildings:
                upsert_building(conn, building, building_floors)

    async def _save_pass_uses(self) -> None:
        if not self._unsaved_uses:
            return
        uses = {pid: self._pass_uses[pid] for pid in self._unsaved_uses
                if pid in self._pass_uses}
        self._unsaved_uses.clear()
        try:
            await asyncio.to_thread(self._write_pass_uses, uses)
        except BaseException:
            self._unsaved_uses.update(uses)
            raise

    def _write_pass_uses(self, uses: dict[str, int]) -> None:
        with self._engine.begin() as conn:
            record_visitor_pass_uses(conn, uses)

    def _prune_spent(self) -> None:
        total = 0
        while True:
            with self._engine.begin() as conn:  # one short transaction per chunk
                gone = spent.prune(conn, time.time())
            total += gone
            if gone < spent.PRUNE_CHUNK:
                break
            time.sleep(0.05)  # let decisions and payments in between
        if total:
            log.info("forgot %d spent tokens no path can accept any more", total)

    async def _watch(self) -> None:
        delay = self._poll_s
        next_prune = time.monotonic() + 60.0
        while True:
            await asyncio.sleep(delay)
            try:
                if self.journal is not None and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    await asyncio.to_thread(self._prune_spent)
                await self._save_pass_uses()
                if await asyncio.to_thread(self._version) != self._index.version:
                    await self.refresh_now()
                delay = self._poll_s
            except Exception as exc:
                # Keep serving the last index; back off so a dead database is not hammered.
                self.poll_failures += 1
                delay = min(delay * 2, 5.0)
                log.warning("directory poll failed (%s); still serving index version %d",
                            type(exc).__name__, self._index.version, exc_info=True)
