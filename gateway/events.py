"""The live event hub behind `GET /api/v1/events` (Server-Sent Events).

The paths that already handle a message (the device router's decisions and status, the
canteen's answers, the alert and telemetry taps of the runtime) hand it to `publish` here;
the hub encodes it once, keeps it in a bounded ring for replay after a reconnect
(`Last-Event-ID`), and appends it to the bounded queue of every subscriber that may see it.
Publishing never waits: a subscriber whose queue is full loses the event, the loss is counted
(`scgw_sse_dropped_total`) and the subscriber is told to start over (`lagged`), so a browser
that stops reading never slows a gate, a payment or the event loop.

Readings are thinned per device (at most one per `reading_interval_s`) and kept out of the
ring: they are many, the next one comes within seconds, and replaying old ones would push
the decisions a reconnecting client needs out of the ring.

Event ids are integers that increase for the life of the process and start from the
wall-clock milliseconds of its start, so an id from an earlier process is older than every
id here and a reconnect across a gateway restart is answered with a reset, not a replay of
the wrong events.

Single-threaded: every method runs on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from gateway.metrics import Registry

log = logging.getLogger(__name__)

EventKind = Literal["access", "payment", "alert", "device", "reading"]
EVENT_KINDS: Final[tuple[EventKind, ...]] = ("access", "payment", "alert", "device", "reading")

# Which kinds each role sees: what its REST routes would show it. A resident's view is
# further narrowed to events whose owner is that resident (see `visible_to`).
ROLE_KINDS: Final[Mapping[str, frozenset[str]]] = {
    "resident": frozenset({"access", "payment"}),
    "staff": frozenset({"access", "payment", "device"}),
    "engineer": frozenset({"alert", "device", "reading"}),
    "admin": frozenset(EVENT_KINDS),
}


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    kind: str
    data: str  # the JSON object, encoded once for every subscriber
    owner: str | None = None  # the resident the event is about (access, payment)

    def frame(self) -> bytes:
        """The event as an SSE frame (JSON never contains a raw newline)."""
        return f"id: {self.id}\nevent: {self.kind}\ndata: {self.data}\n\n".encode()


@dataclass(frozen=True, slots=True)
class View:
    """What one subscriber may see: these kinds, and with `owner`, only its own events."""

    kinds: frozenset[str]
    owner: str | None = None

    @classmethod
    def of(cls, role: str, resident_id: str | None) -> View:
        """The view of a role (unknown roles, and a resident without a record, see nothing)."""
        if role == "resident":
            if resident_id is None:
                return cls(frozenset())
            return cls(ROLE_KINDS["resident"], resident_id)
        return cls(ROLE_KINDS.get(role, frozenset()))

    def accepts(self, event: Event) -> bool:
        return event.kind in self.kinds and (self.owner is None or event.owner == self.owner)


@dataclass(eq=False)
class Subscription:
    """One client's view: its bounded queue, and whether it lost events."""

    view: View
    limit: int
    queue: deque[Event] = field(default_factory=deque)
    lagged: bool = False  # events were dropped since the client last started over
    reset: bool = False  # its Last-Event-ID was too old (or unknown) to replay from
    replay: list[Event] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def next(self, timeout_s: float) -> Event | None:
        """The next event, or None after `timeout_s` without one (time for a keep-alive)."""
        if not self.queue:
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
            except TimeoutError:
                return None
        return self.queue.popleft() if self.queue else None

    def take_lag(self) -> bool:
        """Whether events were dropped; the queue is cleared so the client starts fresh."""
        if not self.lagged:
            return False
        self.lagged = False
        self.queue.clear()
        return True


class EventHub:
    def __init__(self, metrics: Registry | None = None, *, ring_size: int = 2048,
                 queue_limit: int = 256, reading_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ring: deque[Event] = deque(maxlen=ring_size)
        self._next_id = int(time.time() * 1000)
        self._evicted_upto = self._next_id - 1  # ids up to here can no longer be replayed
        self._subscribers: set[Subscription] = set()
        self._queue_limit = queue_limit
        self._reading_interval_s = reading_interval_s
        self._last_reading: dict[str, float] = {}
        self._clock = clock
        self._metrics = metrics
        self._first_id = self._next_id
        self.dropped = 0
        if metrics is not None:
            metrics.counter("scgw_sse_dropped_total",
                            "Live events not delivered to a client whose queue was full "
                            "(it is told to start over).")
            metrics.counter_func("scgw_sse_events_total", "Live events published.",
                                 lambda: float(self._next_id - self._first_id))
            metrics.gauge("scgw_sse_clients", "Clients on /api/v1/events.",
                          lambda: float(len(self._subscribers)))

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def wants(self, kind: str) -> bool:
        """Whether any subscriber may see events of this kind (taps skip work if not)."""
        return any(kind in s.view.kinds for s in self._subscribers)

    def publish(self, kind: EventKind, data: Mapping[str, Any], owner: str | None = None
                ) -> Event:
        event = Event(self._next_id, kind, json.dumps(data, separators=(",", ":"),
                                                      default=str), owner)
        self._next_id += 1
        if kind != "reading":
            if len(self._ring) == self._ring.maxlen:
                self._evicted_upto = self._ring[0].id
            self._ring.append(event)
        for sub in self._subscribers:
            if not sub.view.accepts(event):
                continue
            if len(sub.queue) >= sub.limit:
                self.dropped += 1
                sub.lagged = True
                if self._metrics is not None:
                    self._metrics.inc("scgw_sse_dropped_total")
                continue
            sub.queue.append(event)
            sub._wake.set()
        return event

    def publish_reading(self, device_id: str, data: Mapping[str, Any]) -> Event | None:
        """A reading, unless this device had one within `reading_interval_s`."""
        now = self._clock()
        last = self._last_reading.get(device_id)
        if last is not None and now - last < self._reading_interval_s:
            return None
        self._last_reading[device_id] = now
        return self.publish("reading", data)

    def subscribe(self, view: View, last_event_id: str | None = None) -> Subscription:
        """A new subscriber; with `last_event_id`, what it missed is in `replay`, or
        `reset` says that cannot be known (too old, from another process, not an id)."""
        sub = Subscription(view, self._queue_limit)
        if last_event_id is not None:
            last = _as_id(last_event_id)
            if last is None or last < self._evicted_upto or last >= self._next_id:
                sub.reset = True
            else:
                sub.replay = [e for e in self._ring if e.id > last and view.accepts(e)]
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def recent(self) -> tuple[Event, ...]:
        """What a reconnecting client could be replayed, oldest first."""
        return tuple(self._ring)


def _as_id(text: str) -> int | None:
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        return None
    return int(text)
