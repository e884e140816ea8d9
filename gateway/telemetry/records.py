"""What a spool record is: one line of InfluxDB line protocol, UTF-8, site tag included.

Chosen for throughput on a 2-core edge box. The InfluxDB writer is the sink that must move
the most points per second (the issue asks for half of raw batched `/write`), and with line
protocol records it does no per-point Python work at all: it joins the records it read with
newlines, gzips and POSTs. A JSON record would cost a decode and an encode per point in the
writer and an encode at ingest, where this costs one encode at ingest. Consumers that want
`Reading`s back (the local store) parse the line: milliseconds of precision are all a 1-minute
rollup needs. Alerts share the log, and so their order relative to readings, as `alerts`
points. An encoder returns None for a reading with nothing writable (the caller counts it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from device_drivers.vocabulary import DeviceEvent, Reading
from gateway.telemetry.line_protocol import (
    ALERTS,
    DEVICE_EVENTS,
    TELEMETRY,
    alert_line,
    event_line,
    parse_line,
    reading_line,
)

AlertEvent = Mapping[str, Any]
"""An alert transition as on the MQTT `alerts` topic (CONTRACT.md section 1)."""


class RecordError(ValueError):
    """A record that is not a point of our schema."""


def encode_reading(reading: Reading, site: str, building: str | None = None) -> bytes | None:
    line = reading_line(reading, site, building)
    return None if line is None else line.encode()


def encode_readings(
    readings: Iterable[Reading], site: str, buildings: Mapping[str, str | None] | None = None,
) -> tuple[list[bytes], int]:
    """Records for `Spool.append`, and how many readings had nothing writable.

    `buildings` maps device ids to their building (the optional `building` tag).
    """
    records, skipped = [], 0
    for reading in readings:
        line = reading_line(reading, site, buildings.get(reading.device_id) if buildings else None)
        if line is None:
            skipped += 1
        else:
            records.append(line.encode())
    return records, skipped


def encode_alert(alert: AlertEvent, site: str) -> bytes | None:
    line = alert_line(alert, site)
    return None if line is None else line.encode()


def encode_event(event: DeviceEvent, site: str) -> bytes | None:
    line = event_line(event.device_id, event.kind, event.type, event.ts, site)
    return None if line is None else line.encode()


def decode_record(record: bytes) -> Reading | DeviceEvent | dict[str, Any]:
    """A `telemetry` record as a Reading (ts to the millisecond), a `device_events` one as a
    DeviceEvent, an `alerts` one as a dict shaped like the MQTT alert object (plus `site`);
    RecordError for anything else."""
    fast = _reading_fast(record)
    if fast is not None:
        return fast
    try:
        measurement, tags, fields, ts_ms = parse_line(record.decode())
        if ts_ms is None:
            raise RecordError("record without a timestamp")
        decoded = _decoded(measurement, tags, fields, ts_ms)
    except (UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise RecordError(str(exc)) from None
    if isinstance(decoded, Reading) and len(_reading_heads) < _MAX_HEADS:
        _reading_heads[record.partition(b" ")[0]] = (decoded.device_id, decoded.kind)
    return decoded


_MAX_HEADS = 100_000
_reading_heads: dict[bytes, tuple[str, str]] = {}
"""Measurement and tags of telemetry records already decoded -> (device id, kind): a
device's records all share one, so only the fields of the next ones need parsing."""


def _reading_fast(record: bytes) -> Reading | None:
    """The Reading of a telemetry record whose tags were seen before and whose fields are
    plain numbers (every record ingest writes); None sends the record the general way.

    Why: the general parser cost 9 us a record, more than all of ingest, and the local store
    and the rules engine both read every record back. Same result as the general way."""
    head, _, rest = record.partition(b" ")
    ids = _reading_heads.get(head)
    if ids is None or b"\\" in rest or b'"' in rest:
        return None
    fields, _, stamp = rest.partition(b" ")
    metrics: dict[str, float] = {}
    seq: int | None = None
    try:
        for item in fields.split(b","):
            key, _, value = item.partition(b"=")
            if not key:
                return None
            if value[-1:] == b"i":
                digits = value[:-1]
                if not digits.lstrip(b"-").isdigit():
                    return None
                if key == b"seq":
                    seq = int(digits)
                else:
                    metrics[key.decode()] = float(int(digits))
            elif key == b"seq":
                return None
            else:
                metrics[key.decode()] = float(value)
        return Reading(ids[0], ids[1], int(stamp) / 1000, metrics, seq)
    except (ValueError, OverflowError):  # booleans, a corrupt line: the general way decides
        return None


def _decoded(measurement: str, tags: dict[str, str], fields: dict[str, Any], ts_ms: int
             ) -> Reading | DeviceEvent | dict[str, Any]:
    if measurement == TELEMETRY and "device_id" in tags and "kind" in tags:
        seq = fields.pop("seq", None)
        metrics = {k: float(v) for k, v in fields.items() if isinstance(v, int | float)}
        return Reading(tags["device_id"], tags["kind"], ts_ms / 1000, metrics,
                       seq if isinstance(seq, int) and not isinstance(seq, bool) else None)
    if measurement == DEVICE_EVENTS and isinstance(fields.get("type"), str):
        return DeviceEvent(tags.get("device_id", ""), tags.get("kind", ""), ts_ms / 1000,
                           str(fields["type"]))
    if measurement == ALERTS:
        return {**tags, **fields, "ts": ts_ms / 1000}
    raise RecordError(f"record of unknown measurement {measurement!r}")


Decoded = Reading | DeviceEvent | dict[str, Any]


class ReadingMemo:
    """Readings by their spool record, put by ingest for one consumer in the same process.

    Why: parsing a line back costs more than all of ingest (measured: 9 us a record against
    ingest's 8 us), and the local store and the rules engine would each pay it for every
    reading they read back moments after it was appended. Ingest rounds timestamps to the
    millisecond, so a memoised reading equals the decoded one. Only a shortcut: a record
    missing here (after a restart, a drop, a full memo) is decoded. One memo per consumer,
    because each takes its entries out; bounded by `max_items`.
    """

    def __init__(self, max_items: int = 10_000) -> None:
        self.max_items = max_items
        self._readings: dict[bytes, Reading] = {}

    def __len__(self) -> int:
        return len(self._readings)

    def put(self, record: bytes, reading: Reading) -> None:
        if len(self._readings) < self.max_items:
            self._readings[record] = reading

    def forget(self, records: Iterable[bytes]) -> None:
        """Records the consumer skips (already applied before a restart)."""
        if self._readings:
            for record in records:
                self._readings.pop(record, None)

    def caught_up(self) -> None:
        """The consumer has read everything: entries still here are of records it will never
        read (dropped by a full spool), unless only the last append or two are, so a big
        memo is cleared and a small one kept."""
        if len(self._readings) > self.max_items // 2:
            self._readings.clear()

    def decode(self, records: Sequence[bytes]) -> tuple[list[Decoded], list[RecordError]]:
        """Each record as `decode_record` gives it, from the memo where it can be; and why
        each record that is not a point of our schema was skipped."""
        items: list[Decoded] = []
        bad: list[RecordError] = []
        memo = self._readings
        for record in records:
            known = memo.pop(record, None)
            if known is not None:
                items.append(known)
                continue
            try:
                items.append(decode_record(record))
            except RecordError as exc:
                bad.append(exc)
        return items, bad
