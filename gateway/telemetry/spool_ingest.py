"""The worker's MQTT sink: device messages in, spool records out.

Kept apart from the worker's process management (worker.py) because it is the hot path:
everything here runs on paho's network thread for every message, before the PUBACK.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

from device_drivers.mqtt_protocol import polled_topic
from gateway.telemetry.ingest import Ingest
from gateway.telemetry.records import ReadingMemo, encode_event, encode_reading
from gateway.telemetry.spool import Spool


class SpoolIngestor:
    """The MQTT sink: each message through `Ingest`, its records appended on `flush()`.

    Records are gathered per network read and appended in one call just before the PUBACKs
    of that read are queued, so an acknowledged reading is always in the spool. Each of
    `memos` (one per consumer in this process, see `ReadingMemo`) gets every record's
    `Reading`, so the consumers skip parsing the lines they read back.
    """

    def __init__(self, ingest: Ingest, spool: Spool, *, root: str, site: str,
                 memos: Sequence[ReadingMemo] = (),
                 clock: Callable[[], float] = time.time,
                 buildings: Mapping[str, str | None] | None = None,
                 polled: Collection[str] = ()) -> None:
        self.ingest, self.spool, self.site, self.clock = ingest, spool, site, clock
        self._buildings = dict(buildings or {})  # the optional `building` tag per device
        self._polled = frozenset(polled)  # Modbus units: readings only from the poller
        self._polled_prefix = polled_topic(root, site, "").encode()
        self.memos = tuple(memos)
        self._prefix, self._suffix = f"{root}/devices/".encode(), b"/telemetry"
        self._known = set(ingest.kinds)
        self._devices: dict[bytes, str] = {}
        self._pending: list[bytes] = []

    def _device(self, topic: bytes) -> str:
        device = self._devices.get(topic)
        if device is None:
            raw = topic
            if topic.startswith(self._prefix) and topic.endswith(self._suffix):
                raw = topic[len(self._prefix):-len(self._suffix)]
            device = raw.decode(errors="replace")
            if device in self._known:  # bounded by the registry; unknown ids stay uncached
                self._devices[topic] = device
        return device

    def message(self, topic: bytes, payload: bytes) -> None:
        if topic.endswith(b"/event"):  # rare: door forced, tamper (for the rules engine)
            self._event(topic, payload)
            return
        if topic.startswith(self._polled_prefix):
            device = topic[len(self._polled_prefix):].decode(errors="replace")
            if device not in self._polled:
                self.ingest.refuse(device, "unknown_device", "not a Modbus unit of this site")
                return
        else:
            device = self._device(topic)
            if device in self._polled:
                self.ingest.refuse(device, "polled_unit", "readings of a Modbus-polled unit "
                                   "come from the gateway's poller; its device topic is refused")
                return
        readings = self.ingest.message(device, payload, self.clock())
        memos = self.memos
        for reading in readings:
            record = encode_reading(reading, self.site,
                                    self._buildings.get(reading.device_id))
            if record is None:
                self.ingest.refused["unwritable"] += 1
                continue
            self._pending.append(record)
            for memo in memos:
                memo.put(record, reading)

    def _event(self, topic: bytes, payload: bytes) -> None:
        raw = topic.removeprefix(self._prefix).removesuffix(b"/event")
        event = self.ingest.event(raw.decode(errors="replace"), payload, self.clock())
        record = None if event is None else encode_event(event, self.site)
        if record is not None:
            self._pending.append(record)

    def flush(self) -> None:
        if self._pending:
            records, self._pending = self._pending, []
            self.spool.append(records)
