"""Readings of polled Modbus units, published over MQTT for the telemetry worker.

A Modbus unit cannot speak MQTT, so the gateway speaks for it, on its own topic
`{root}/gateway/{site}/polled/{unit}` (mqtt_protocol.polled_topic) with the payload of the
contract's telemetry topic. The telemetry worker then ingests MQTT devices and polled units
through one path (seq, duplicates, spool, InfluxDB), and refuses readings on a polled unit's
`devices/{unit}/telemetry` topic: nobody but the poller may speak for it. Readings wait in a
bounded buffer while the broker is away; when it is full the oldest are dropped and counted
rather than growing without end.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from device_drivers import mqtt_protocol as proto
from device_drivers.supervision import ComponentTasks, Supervisor
from device_drivers.vocabulary import Reading

log = logging.getLogger(__name__)

RETRY_S = 0.5


class PolledReadings:
    def __init__(
        self,
        root: str,
        site_id: str,
        publish: Callable[[str, bytes], Awaitable[None]],
        *,
        max_buffered: int = 100_000,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._root, self._site = root, site_id
        self._publish = publish
        self._buffer: deque[Reading] = deque()
        self._max = max_buffered
        self._ready = asyncio.Event()
        self._tasks = ComponentTasks(supervisor, "polled-readings")
        self.published = 0
        self.dropped = 0

    def enqueue(self, reading: Reading) -> None:
        """The fleet's `on_reading`: never blocks a poll loop."""
        if len(self._buffer) >= self._max:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("polled readings: buffer full, %d dropped so far", self.dropped)
        self._buffer.append(reading)
        self._ready.set()

    async def __aenter__(self) -> PolledReadings:
        await self._tasks.start()
        self._tasks.spawn("polled-readings", self._drain)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._tasks.stop()

    async def _drain(self) -> None:
        while True:
            await self._ready.wait()
            while self._buffer:
                reading = self._buffer[0]
                topic = proto.polled_topic(self._root, self._site, reading.device_id)
                try:
                    await self._publish(topic, proto.telemetry_payload(reading))
                except Exception as exc:  # broker away: keep the reading, try again
                    log.debug("polled reading not published yet: %s", exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                if self._buffer and self._buffer[0] is reading:
                    self._buffer.popleft()
                self.published += 1
            self._ready.clear()
