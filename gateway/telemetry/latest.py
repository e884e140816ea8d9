"""The latest reading of every device, kept from the telemetry bus for the API/dashboard.

Bounded by the device registry: one entry per configured device, nothing else.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from device_drivers.supervision import ComponentTasks, Supervisor
from device_drivers.vocabulary import Reading
from gateway.telemetry.bus import TelemetryBus


class LatestReadings:
    def __init__(self, bus: TelemetryBus, device_ids: set[str],
                 supervisor: Supervisor | None = None) -> None:
        self._bus = bus
        self._device_ids = device_ids
        self._latest: dict[str, Reading] = {}
        self._queue: asyncio.Queue[Reading] | None = None
        self._tasks = ComponentTasks(supervisor, "latest-readings")

    def get(self, device_id: str) -> Reading | None:
        return self._latest.get(device_id)

    async def __aenter__(self) -> LatestReadings:
        self._queue = self._bus.subscribe()
        await self._tasks.start()
        self._tasks.spawn("latest-readings", self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._tasks.stop()
        if self._queue is not None:
            self._bus.unsubscribe(self._queue)

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            reading = await self._queue.get()
            if reading.device_id not in self._device_ids:
                continue
            previous = self._latest.get(reading.device_id)
            if previous is None or reading.ts >= previous.ts:
                merged = {**previous.metrics, **reading.metrics} if previous else reading.metrics
                self._latest[reading.device_id] = Reading(
                    reading.device_id, reading.kind, reading.ts, merged, reading.seq
                )
