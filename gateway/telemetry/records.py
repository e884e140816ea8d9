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

from collections.abc import Iterable, Mapping
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
    try:
        measurement, tags, fields, ts_ms = parse_line(record.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(str(exc)) from None
    if ts_ms is None:
        raise RecordError("record without a timestamp")
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
