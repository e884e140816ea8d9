"""When a canteen terminal may have sold offline: the periods the gateway saw it offline.

An offline sale is a debit the gateway did not decide, so it is only believed when it falls
inside a period in which the terminal really could not reach a gateway:

- the terminal's own status: `{"online": false}` on `{root}/devices/{id}/status`, which the
  broker also publishes as the terminal's last will when its connection drops, until it says
  `{"online": true}` again (recorded durably in `terminal_offline_periods`, so a restart of
  the gateway between the outage and the upload changes nothing);
- no gateway up and connected at all (the gaps between the presence heartbeats of every
  gateway process, gateway.access.presence): a terminal that cannot get an answer sells
  offline whether or not its own link dropped.

Each period is widened by `slack_s` on both sides: the broker publishes a last will only
after the keepalive expires, and clocks differ a little. Anything else is refused as
`outside_offline_window` (a forged upload dated last week, or a batch from a terminal that
was online all along). The same windows bound the offline limits: the per-card and
per-terminal limits apply to all offline sales of one window together, however many
batches they arrive in (gateway.canteen.ledger).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

from sqlalchemy import (
    Column,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Table,
    insert,
    or_,
    select,
    update,
)

from device_drivers.supervision import ComponentTasks, Supervisor
from gateway.access.presence import HEARTBEAT_S, gaps, segments_since
from gateway.canteen.policy import MAX_BATCH_AGE_S
from gateway.store.db import read_engine
from gateway.store.metadata import metadata

if TYPE_CHECKING:
    from gateway.config import SiteConfig

log = logging.getLogger(__name__)

DEFAULT_SLACK_S = 120.0  # a last will comes 1.5 keepalives (default 60 s) after the link died
_MEMORY_PER_TERMINAL = 256

terminal_offline_periods = Table(
    "terminal_offline_periods",
    metadata,
    Column("period_id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Column("seen_by", String(32), nullable=True),
)
Index("ix_terminal_offline_periods_device", terminal_offline_periods.c.device_id,
      terminal_offline_periods.c.started_at)


@dataclass(frozen=True, slots=True)
class Window:
    start: float
    end: float

    def __contains__(self, ts: object) -> bool:
        return isinstance(ts, int | float) and self.start <= ts <= self.end


def merge(spans: Sequence[tuple[float, float]], slack_s: float) -> list[Window]:
    """Widen every span by `slack_s` on both sides and join the ones that then overlap."""
    merged: list[Window] = []
    for start, end in sorted((a - slack_s, b + slack_s) for a, b in spans):
        if merged and start <= merged[-1].end:
            merged[-1] = Window(merged[-1].start, max(merged[-1].end, end))
        else:
            merged.append(Window(start, end))
    return merged


def covering(windows: Sequence[Window], ts: float) -> Window | None:
    return next((w for w in windows if ts in w), None)


@dataclass(frozen=True, slots=True)
class _Transition:
    device_id: str
    online: bool
    at: float


class OfflineWindows:
    """Records terminals' online/offline transitions and answers which windows cover a sale.

    `observe` runs on the event loop (the device router calls it for each status message of
    a canteen terminal) and only updates memory and queues the write; `windows` may be
    called from any thread (the ledger's) and reads the store plus what this process saw.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        instance_id: str | None = None,
        slack_s: float = DEFAULT_SLACK_S,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._engine = engine
        self._read = read_engine(engine)
        self._instance = instance_id
        self.slack_s = slack_s
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, float] = {}
        self._closed: dict[str, deque[tuple[float, float]]] = {}
        self._queue: deque[_Transition] = deque()
        self._wake = asyncio.Event()
        self._tasks = ComponentTasks(supervisor, "offline-windows")
        self.write_failures = 0

    @classmethod
    def from_config(cls, engine: Engine, config: SiteConfig, *, instance_id: str | None = None,
                    supervisor: Supervisor | None = None) -> OfflineWindows:
        """The site's windows: slack from `canteen.offline_window_slack_s`."""
        return cls(engine, instance_id=instance_id, supervisor=supervisor,
                   slack_s=config.canteen.offline_window_slack_s)

    async def __aenter__(self) -> Self:
        await self._tasks.start()
        self._tasks.spawn("offline-windows-writer", self._run)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._tasks.stop()
        try:
            await asyncio.to_thread(self._write_queued)
        except Exception:
            log.warning("offline windows: %d transitions not recorded", len(self._queue),
                        exc_info=True)
        finally:
            if self._read is not self._engine:
                self._read.dispose()

    # --- in: status messages -------------------------------------------------------------

    def observe(self, device_id: str, online: bool, at: float | None = None) -> None:
        at = self._clock() if at is None else at
        with self._lock:
            if online:
                started = self._open.pop(device_id, None)
                if started is not None:
                    closed = self._closed.setdefault(device_id,
                                                     deque(maxlen=_MEMORY_PER_TERMINAL))
                    closed.append((started, at))
            elif device_id not in self._open:
                self._open[device_id] = at
            else:
                return  # offline again while offline: nothing new
        self._queue.append(_Transition(device_id, online, at))
        self._wake.set()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await asyncio.to_thread(self._write_queued)
                delay = 0.5
            except Exception:
                self.write_failures += 1
                log.warning("offline windows: could not record %d transitions; retrying",
                            len(self._queue), exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                self._wake.set()

    def _write_queued(self) -> None:
        p = terminal_offline_periods.c
        while self._queue:
            transition = self._queue[0]
            with self._engine.begin() as conn:
                is_open = conn.execute(select(p.period_id).where(
                    p.device_id == transition.device_id, p.ended_at.is_(None)).limit(1)).first()
                if transition.online and is_open is not None:
                    conn.execute(update(terminal_offline_periods).where(
                        p.device_id == transition.device_id, p.ended_at.is_(None),
                    ).values(ended_at=transition.at))
                elif not transition.online and is_open is None:
                    conn.execute(insert(terminal_offline_periods).values(
                        device_id=transition.device_id, started_at=transition.at,
                        ended_at=None, seen_by=self._instance))
            self._queue.popleft()

    # --- out: which windows cover a sale ---------------------------------------------------

    def windows(self, device_id: str, now: float | None = None) -> list[Window]:
        """Every window of the last MAX_BATCH_AGE_S in which `device_id` may have sold
        offline, widened by the slack and merged; blocking (reads the store)."""
        now = self._clock() if now is None else now
        since = now - MAX_BATCH_AGE_S - self.slack_s
        p = terminal_offline_periods.c
        with self._read.connect() as conn:
            rows = conn.execute(select(p.started_at, p.ended_at).where(
                p.device_id == device_id, or_(p.ended_at.is_(None), p.ended_at >= since))
            ).all()
            segments = segments_since(conn, since)
        spans = [(float(start), now if end is None else float(end)) for start, end in rows]
        with self._lock:
            spans.extend(self._closed.get(device_id, ()))
            if device_id in self._open:
                spans.append((self._open[device_id], now))
        spans.extend(gaps(segments, since, now, self._heartbeat_s))
        return merge(spans, self.slack_s)
