"""When a gateway process was up and connected: heartbeats in `gateway_uptime`.

Each `scgw run` process has an instance id (random, per start). While its control session
is connected to the broker it keeps one row per connected stretch ("segment") with the time
the stretch began and the last heartbeat, and the highest audit sequence number it has
handed out so far. Two things read it:

- the canteen's offline windows: a terminal that could not reach any gateway (the process
  was down, or cut off from the broker) sold offline legitimately, so the gaps between
  segments are offline windows for every terminal (gateway.canteen.offline_windows);
- `scgw audit verify`: an instance that is gone, whose audit rows stop before the sequence
  number it reported, lost decisions at its end (gateway.access.audit.verify).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Table,
    insert,
    select,
    update,
)

from device_drivers.supervision import ComponentTasks, Supervisor
from gateway.store.metadata import metadata

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0

gateway_uptime = Table(
    "gateway_uptime",
    metadata,
    Column("instance_id", String(32), primary_key=True),
    Column("segment", Integer, primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("alive_at", Float, nullable=False, index=True),
    Column("seq_assigned", BigInteger, nullable=False),
)


def new_instance_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Segment:
    instance_id: str
    started_at: float
    alive_at: float


def segments_since(conn: Connection, since: float) -> list[Segment]:
    """Connected stretches of every gateway that were alive at or after `since`."""
    u = gateway_uptime.c
    rows = conn.execute(
        select(u.instance_id, u.started_at, u.alive_at).where(u.alive_at >= since)
        .order_by(u.started_at)
    ).all()
    return [Segment(str(r.instance_id), float(r.started_at), float(r.alive_at)) for r in rows]


def gaps(segments: Sequence[Segment], start: float, end: float,
         heartbeat_s: float = HEARTBEAT_S) -> list[tuple[float, float]]:
    """The stretches of [start, end] in which no gateway was up and connected.

    A segment counts as up until a heartbeat after its last one (it may have died any time
    in between). Time before the first segment is not a gap: nobody saw it.
    """
    if not segments:
        return []
    spans = sorted((s.started_at, s.alive_at + heartbeat_s) for s in segments)
    found: list[tuple[float, float]] = []
    cursor = max(start, spans[0][0])
    for begin, finish in spans:
        if begin > cursor and begin > start:
            found.append((cursor, min(begin, end)))
        cursor = max(cursor, finish)
        if cursor >= end:
            break
    if cursor < end:
        found.append((cursor, end))
    return [(a, b) for a, b in found if b > a]


class GatewayPresence:
    """Writes this instance's heartbeat while `connected()` holds; a supervised task."""

    def __init__(
        self,
        engine: Engine,
        instance_id: str,
        connected: Callable[[], bool],
        seq_assigned: Callable[[], int] = lambda: 0,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._engine = engine
        self.instance_id = instance_id
        self._connected = connected
        self._seq = seq_assigned
        self.heartbeat_s = heartbeat_s
        self._clock = clock
        self._segment = 0
        self._in_segment = False
        self._tasks = ComponentTasks(supervisor, "presence")
        self.failures = 0

    async def __aenter__(self) -> Self:
        await self._tasks.start()
        self._tasks.spawn("gateway-presence", self._run)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._tasks.stop()
        if self._in_segment:  # a clean stop: the last heartbeat is the end of the stretch
            try:
                await asyncio.to_thread(self._beat, self._clock())
            except Exception:
                log.warning("presence: could not record the final heartbeat", exc_info=True)

    async def beat_now(self) -> None:
        """One heartbeat (or the end of a segment) right away."""
        connected = self._connected()
        if not connected:
            self._in_segment = False
            return
        if not self._in_segment:
            self._segment += 1
            self._in_segment = True
            await asyncio.to_thread(self._open, self._clock())
        else:
            await asyncio.to_thread(self._beat, self._clock())

    async def _run(self) -> None:
        while True:
            try:
                await self.beat_now()
            except Exception:
                self.failures += 1
                self._in_segment = False  # start a new segment once the store is back
                log.warning("presence: heartbeat failed", exc_info=True)
            await asyncio.sleep(self.heartbeat_s)

    def _open(self, now: float) -> None:
        with self._engine.begin() as conn:
            conn.execute(insert(gateway_uptime).values(
                instance_id=self.instance_id, segment=self._segment, started_at=now,
                alive_at=now, seq_assigned=self._seq()))

    def _beat(self, now: float) -> None:
        u = gateway_uptime.c
        with self._engine.connect() as conn:
            relaxed = conn.dialect.name == "sqlite"
            if relaxed:  # a heartbeat lost to a power cut is harmless; its fsync is not
                _pragma(conn, "synchronous = NORMAL")
            try:
                with conn.begin():
                    conn.execute(update(gateway_uptime).where(
                        u.instance_id == self.instance_id, u.segment == self._segment,
                    ).values(alive_at=now, seq_assigned=self._seq()))
            finally:
                if relaxed:
                    _pragma(conn, "synchronous = FULL")


def _pragma(conn: Connection, setting: str) -> None:
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute(f"PRAGMA {setting}")
