"""The local-store consumer of the telemetry spool: batches into 1-minute rollups, exactly once.

It reads the spool's `local` cursor, decodes each record back to a `Reading` and hands the
batch to the rollup store together with the batch's end record number, which the store keeps
in the same transaction as the rollups. The spool cursor is persisted lazily (a restart may
replay up to one fsync interval), and a sum or a count is not idempotent, so records below
the store's applied number are skipped here and the store ignores a replayed batch as well.

A database that refuses (locked, down, schema not migrated yet) is retried with jittered
backoff for as long as it takes, readings staying in the spool, like the InfluxDB writer. Any
other exception is a bug: it propagates, the thread dies, and the worker process exits
non-zero for its supervisor to restart. Retention pruning runs here, hourly, so that the
store has a single writer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from device_drivers.vocabulary import Reading
from gateway.telemetry.local_db import LocalDbError
from gateway.telemetry.records import ReadingMemo
from gateway.telemetry.spool import Spool, SpoolClosedError

log = logging.getLogger(__name__)

CONSUMER = "local"
PRUNE_EVERY_S = 3600.0
LINGER_BELOW = 1000  # records: a smaller batch waits up to `linger_s` for more


class RollupSink(Protocol):
    """What `gateway.telemetry.rollups.RollupStore` offers the consumer."""

    def applied_recno(self, consumer: str = "local") -> int: ...

    def reset_cursor(self, consumer: str = "local", recno: int = -1) -> None: ...

    def apply(self, readings: Sequence[Reading], end_recno: int,
              consumer: str = "local") -> None: ...

    def prune(self, now: float) -> int: ...


class LocalStoreConsumer:
    """Drains the `local` spool cursor into `store` until `stop()`; `run()` blocks.

    `memo` (filled by ingest, see `ReadingMemo`) spares decoding records read back soon
    after they were appended; a reading from it equals the decoded one, so replays count the
    same minutes.

    Counters are plain attributes written by the consumer thread only (the health report
    reads them): `state`, `written` (readings applied), `retries`, `quarantined` (records
    that are not readings of our schema), `last_error`, `pruned`.
    """

    def __init__(self, spool: Spool, store: RollupSink, *, memo: ReadingMemo | None = None,
                 linger_s: float = 0.2, backoff_max_s: float = 30.0,
                 prune_every_s: float = PRUNE_EVERY_S) -> None:
        self.spool, self.store = spool, store
        self.memo = memo if memo is not None else ReadingMemo(0)
        self.linger_s, self.backoff_max_s = linger_s, backoff_max_s
        self.prune_every_s = prune_every_s
        self.state = "starting"
        self.written = self.retries = self.quarantined = self.pruned = 0
        self.last_error: str | None = None
        self._applied: int | None = None
        self._next_prune = 0.0
        self._stop = threading.Event()
        self._random = random.Random()

    @property
    def lag_s(self) -> float:
        age = self.spool.stats().consumers[CONSUMER].oldest_age_s
        return age or 0.0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
        except SpoolClosedError:
            pass
        finally:
            self.state = "stopped"

    def step(self, wait_s: float = 0.5) -> int:
        """Apply one batch (waiting up to `wait_s` for one); returns records consumed."""
        if self._applied is None and not self._start():
            return 0
        self._maybe_prune()
        # A trickle is gathered up to `linger_s`, so SQLite commits (fsyncs) a few times a
        # second, not once per reading.
        batch = self.spool.read_gathered(CONSUMER, fill=LINGER_BELOW, linger_s=self.linger_s,
                                         stop=self._stop)
        if batch is None:
            return 0  # stopping
        if not batch.records:
            self.memo.caught_up()
            self.spool.wait(CONSUMER, wait_s)
            return 0
        assert self._applied is not None
        skip = max(0, min(len(batch.records), self._applied - batch.start.recno))
        self.memo.forget(batch.records[:skip])
        readings = self._decode(batch.records[skip:])
        if skip < len(batch.records) and not self._apply(readings, batch.end.recno):
            return 0  # stopping
        self.spool.ack(CONSUMER, batch.end)
        self._applied = batch.end.recno
        self.written += len(readings)
        return len(batch.records)

    def _start(self) -> bool:
        """Learn where the store is; a store ahead of the spool means a recreated spool."""
        try:
            applied = self.store.applied_recno(CONSUMER)
            tail = self.spool.stats().written_recno
            if applied > tail:
                log.warning("local store has applied spool records up to %d but the spool "
                            "ends at %d: the spool was recreated; starting over from it",
                            applied, tail)
                self.store.reset_cursor(CONSUMER, -1)
                applied = -1
        except (LocalDbError, OSError) as exc:
            self._failed(exc, self.retries)
            return False
        self._applied = applied
        self.state = "ok"
        return True

    def _decode(self, records: list[bytes]) -> list[Reading]:
        decoded, bad = self.memo.decode(records)
        if bad:
            if not self.quarantined:
                log.warning("local store: spool record that is not a point of our schema "
                            "skipped (%s); further ones are only counted", bad[0])
            self.quarantined += len(bad)
        return [item for item in decoded if isinstance(item, Reading)]

    def _apply(self, readings: list[Reading], end_recno: int) -> bool:
        attempt = 0
        while not self._stop.is_set():
            try:
                self.store.apply(readings, end_recno, CONSUMER)
            except (LocalDbError, OSError) as exc:
                self._failed(exc, attempt)
                attempt += 1
                continue
            if self.state != "ok":
                log.info("local store: writing again after %d retries", self.retries)
                self.state = "ok"
            return True
        return False

    def _failed(self, exc: Exception, attempt: int = 0) -> None:
        self.retries += 1
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if self.state != "retrying":
            log.warning("local store: %s; retrying with backoff, readings stay in the spool",
                        self.last_error)
        self.state = "retrying"
        ceiling = min(self.backoff_max_s, 0.5 * 2 ** min(attempt, 16))
        self._stop.wait(ceiling / 2 + self._random.uniform(0, ceiling / 2))

    def _maybe_prune(self) -> None:
        now = time.time()
        if now < self._next_prune:
            return
        self._next_prune = now + self.prune_every_s
        try:
            removed = self.store.prune(now)
        except (LocalDbError, OSError) as exc:
            log.warning("local store: retention prune failed (%s); next try in %.0f s",
                        exc, self.prune_every_s)
            return
        self.pruned += removed
        if removed:
            log.info("local store: pruned %d rollup rows past retention", removed)
