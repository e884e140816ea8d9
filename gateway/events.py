"""Typed events that cross from drivers into the runtime, and the internal telemetry bus.

Drivers produce these from bytes; the core decides on them; nothing here does I/O except
the bus, which is a bounded in-process fan-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEVICE_KINDS = ("gate", "elevator", "canteen", "hvac", "fresh_air", "air_purifier", "meter")


@dataclass(frozen=True, slots=True)
class Reading:
    """One timestamped set of metric values from one device (CONTRACT.md telemetry)."""

    device_id: str
    kind: str
    ts: float
    metrics: Mapping[str, float]
    seq: int | None = None


@dataclass
class TelemetryBus:
    """Fan-out of readings to subscribers (pipeline, rules, dashboard).

    Publishing never blocks the producer (a Modbus poll loop or the MQTT reader): when a
    subscriber falls behind, its oldest reading is dropped and counted rather than stalling
    every device.
    """

    maxsize: int = 10_000
    dropped: int = 0
    _queues: list[asyncio.Queue[Reading]] = field(default_factory=list)

    def subscribe(self) -> asyncio.Queue[Reading]:
        queue: asyncio.Queue[Reading] = asyncio.Queue(self.maxsize)
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Reading]) -> None:
        self._queues.remove(queue)

    def publish(self, reading: Reading) -> None:
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(reading)
