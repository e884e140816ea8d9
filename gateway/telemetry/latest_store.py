"""The latest reading of every device, for the API and dashboard, read from the local store.

Telemetry ingest runs in the telemetry worker process, so the API process no longer sees
readings go by on an in-process bus; the worker writes each device's latest values to
`telemetry_latest` in the transaction that applies a spool batch (gateway/telemetry/
rollups.py). This cache re-reads that table every `interval_s` in a worker thread and serves
`get` from memory, so a route never waits on the database and the table is read once per
interval however many clients poll. Values are at most one interval plus one spool batch old.

Reads go through gateway.store.db.read_engine (deferred SQLite transactions), so a refresh never
takes the write lock the canteen's debits and the telemetry worker need.

A database that is briefly unreachable (PostgreSQL restarting) is not a crash: the cache
keeps serving what it has, logs once per outage, and tries again next interval. Bounded by
the device registry: one entry per configured device, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Collection
from types import TracebackType

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from device_drivers.supervision import ComponentTasks, Supervisor
from device_drivers.vocabulary import Reading
from gateway.store.db import read_engine
from gateway.telemetry.tables import telemetry_latest

log = logging.getLogger(__name__)


class LatestCache:
    """Satisfies api.services.LatestReadings: `get(device_id) -> Reading | None`."""

    def __init__(self, engine: Engine, device_ids: Collection[str], *,
                 supervisor: Supervisor | None = None, interval_s: float = 1.0) -> None:
        self._engine = engine
        self._read: Engine | None = None  # deferred SQLite reads, from __aenter__ on
        self._device_ids = frozenset(device_ids)
        self._interval_s = interval_s
        self._latest: dict[str, Reading] = {}
        self._tasks = ComponentTasks(supervisor, "latest-cache")
        self._failing = False
        self.refreshed_at: float | None = None
        """time.time() of the last successful refresh (None before the first)."""

    def get(self, device_id: str) -> Reading | None:
        return self._latest.get(device_id)

    def load(self) -> dict[str, Reading]:
        """Read the table (blocking; runs in a worker thread)."""
        t = telemetry_latest.c
        latest: dict[str, Reading] = {}
        with (self._read or self._engine).connect() as conn:
            rows = conn.execute(select(t.device_id, t.kind, t.ts, t.metrics, t.seq)).all()
        for row in rows:
            if row.device_id not in self._device_ids:
                continue
            try:
                metrics = {str(k): float(v) for k, v in json.loads(row.metrics).items()}
            except (ValueError, TypeError, AttributeError):
                log.warning("telemetry_latest: unreadable metrics for %s", row.device_id)
                continue
            latest[row.device_id] = Reading(row.device_id, row.kind, float(row.ts), metrics,
                                            None if row.seq is None else int(row.seq))
        return latest

    async def refresh(self) -> bool:
        """One refresh now; False (and the old values kept) when the database failed."""
        try:
            latest = await asyncio.to_thread(self.load)
        except DBAPIError as exc:
            if not self._failing:
                log.warning("latest readings: cannot read the store (%s); serving the last "
                            "values read", exc.__class__.__name__)
            self._failing = True
            return False
        if self._failing:
            log.info("latest readings: reading the store again")
        self._failing = False
        self._latest = latest  # one assignment: readers see the old map or the new one
        self.refreshed_at = time.time()
        return True

    async def __aenter__(self) -> LatestCache:
        self._read = read_engine(self._engine)
        await self.refresh()  # serve values from the first request on
        await self._tasks.start()
        self._tasks.spawn("latest-cache", self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._tasks.stop()
        read, self._read = self._read, None
        if read is not None and read is not self._engine:
            read.dispose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh()
