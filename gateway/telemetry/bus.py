"""The in-process fan-out of readings to their consumers (latest values, stores, rules)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from device_drivers.vocabulary import Reading

log = logging.getLogger(__name__)

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
