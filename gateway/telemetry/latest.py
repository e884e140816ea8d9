"""The latest reading of every device, kept from the telemetry bus for the API/dashboard.

Bounded by the device registry: one entry per configured device, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from device_drivers.vocabulary import Reading
from gateway.telemetry.bus import TelemetryBus


class LatestReadings:
    def __init__(self, bus: TelemetryBus, device_ids: set[str]) -> None:
        self._bus = bus
        self._device_ids = device_ids
        self._latest: dict[str, Reading] = {}
        self._queue: asyncio.Queue[Reading] | None = None
        self._task: asyncio.Task[None] | None = None

    def get(self, device_id: str) -> Reading | None:
        return self._latest.get(device_id)

    async def __aenter__(self) -> LatestReadings:
        self._queue = self._bus.subscribe()
        self._task = asyncio.create_task(self._run(), name="latest-readings")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
