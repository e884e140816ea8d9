"""InfluxDB line protocol for the schema of CONTRACT.md section 4.

- `telemetry,device_id=..,kind=..,site=.. <metric>=<float>,...,seq=<int>i <ms>`
- `alerts,device_id=..,rule_id=..,severity=..,site=.. state="..",value=<float>,message=".." <ms>`
- `device_events,device_id=..,kind=..,site=.. type=".." <ms>` (an extension of the contract:
  door forced, tamper, ... in the same log as the readings, in order, for the rules engine)

Timestamps are milliseconds (`PRECISION`): readings carry float seconds, VictoriaMetrics keeps
milliseconds, and with one precision everywhere both backends hold the same points. A replayed
reading maps to the same series and millisecond, so writing it twice is harmless.

Escaping, checked against influxd 1.6 and VictoriaMetrics: measurement, tag keys, tag values
and field keys escape `,` `=` and space with a backslash. A backslash itself has no escape
that both servers read alike (1.x keeps `\\\\` as two characters, VictoriaMetrics makes it
one, and 1.x refuses a tag value ending in one), so identifiers get `/` in its place, and CR or
LF become a space: identifiers here are device, site and rule ids, where neither is legitimate.
String field values escape `\\` and `"`; a newline is written as the two characters `\\n`
so that one point is always one line. Tags are sorted by key, the order InfluxDB prefers.
Values that cannot be written (NaN, infinities) and metric names the schema reserves (`seq`,
`time`, empty) are left out of the point rather than failing the batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from device_drivers.vocabulary import Reading

PRECISION = "ms"
TELEMETRY = "telemetry"
ALERTS = "alerts"
DEVICE_EVENTS = "device_events"
RESERVED_FIELDS = frozenset({"seq", "time", ""})

_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\\": "/", "\n": r"\ ",
                              "\r": r"\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\\\n", "\r": "\\\\r"})
_ESCAPED = re.compile(r"\\(.)")
_STRING_ESCAPED = re.compile(r'\\(["\\])')
_BOOLEANS = {"t": True, "T": True, "true": True, "True": True, "TRUE": True,
             "f": False, "F": False, "false": False, "False": False, "FALSE": False}
_TYPE_NAMES = {float: "float", int: "integer", str: "string", bool: "boolean"}
FieldValue = float | int | str | bool
_prefixes: dict[tuple[str, str, str, str], str] = {}
_field_keys: dict[str, str] = {}


def escape_key(value: str) -> str:
    """A measurement, tag key, tag value or field key as it must appear in a line."""
    return value.translate(_KEY_ESCAPES)


def escape_string(value: str) -> str:
    """A string field value, without the surrounding quotes."""
    return value.translate(_STRING_ESCAPES)


def timestamp(ts: float) -> int:
    """Reading time (Unix seconds) in PRECISION units; the same float always gives the same."""
    return round(ts * 1000)


def _field_key(name: str) -> str:
    escaped = _field_keys.get(name)
    if escaped is None:
        escaped = escape_key(name)
        if len(_field_keys) < 10_000:  # metric names are few; bound the cache anyway
            _field_keys[name] = escaped
    return escaped


def _tags(tags: Mapping[str, str]) -> str:
    return "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags.items()) if v)


def reading_line(reading: Reading, site: str, building: str | None = None) -> str | None:
    """One `telemetry` point; None when nothing in the reading can be written.

    `building` (the device's building in the site file) is an extra tag beyond CONTRACT.md
    section 4, so dashboards can sum power per building; devices without one carry none.
    """
    if not math.isfinite(reading.ts):
        return None
    key = (site, reading.device_id, reading.kind, building or "")
    prefix = _prefixes.get(key)
    if prefix is None:
        prefix = TELEMETRY + _tags(
            {"site": site, "device_id": reading.device_id, "kind": reading.kind,
             "building": building or ""}) + " "
        if len(_prefixes) < 100_000:
            _prefixes[key] = prefix
    fields = []
    for name, value in reading.metrics.items():
        if name in RESERVED_FIELDS or not isinstance(value, int | float):
            continue
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range, from JSON
            continue
        if math.isfinite(number):
            fields.append(f"{_field_key(name)}={number!r}")
    if reading.seq is not None:
        fields.append(f"seq={int(reading.seq)}i")
    if not fields:
        return None
    return f"{prefix}{','.join(fields)} {timestamp(reading.ts)}"


def alert_line(alert: Mapping[str, Any], site: str) -> str | None:
    """One `alerts` point from an alert object as on MQTT; None without a time or fields."""
    ts = alert.get("ts")
    if not isinstance(ts, int | float) or not math.isfinite(ts):
        return None
    tags = {"site": site, **{k: str(alert.get(k) or "") for k in
                             ("rule_id", "device_id", "severity")}}
    fields = []
    for name in ("state", "message"):
        text = alert.get(name)
        if text is not None:
            fields.append(f'{name}="{escape_string(str(text))}"')
    value = alert.get("value")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        fields.append(f"value={float(value)!r}")
    if not fields:
        return None
    return f"{ALERTS}{_tags(tags)} {','.join(fields)} {timestamp(float(ts))}"


def event_line(device_id: str, kind: str, event_type: str, ts: float, site: str) -> str | None:
    """One `device_events` point; None for a time that cannot be written."""
    if not math.isfinite(ts):
        return None
    tags = {"device_id": device_id, "kind": kind, "site": site}
    return f'{DEVICE_EVENTS}{_tags(tags)} type="{escape_string(event_type)}" {timestamp(ts)}'


def _split_unescaped(text: str, separator: str, limit: int = -1, quotes: bool = True
                     ) -> list[str]:
    """Split at `separator` outside backslash escapes (and, with `quotes`, double quotes)."""
    parts: list[str] = []
    start, quoted, index, n = 0, False, 0, len(text)
    while index < n:
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"' and quotes:
            quoted = not quoted
        elif char == separator and not quoted and (limit < 0 or len(parts) < limit):
            parts.append(text[start:index])
            start = index + 1
        index += 1
    parts.append(text[start:])
    return parts


def _unescape_key(text: str) -> str:
    return _ESCAPED.sub(r"\1", text) if "\\" in text else text


def _value(text: str) -> FieldValue:
    if text.startswith('"'):
        return _STRING_ESCAPED.sub(r"\1", text[1:-1])
    if text.endswith("i") and text[:-1].lstrip("-").isdigit():
        return int(text[:-1])
    if text in _BOOLEANS:
        return _BOOLEANS[text]
    return float(text)


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, FieldValue], int | None]:
    """(measurement, tags, fields, timestamp) of one line; ValueError if it is not one.

    The inverse of the encoders above, for consumers of the spool other than InfluxDB (the
    local store) and for matching server error messages. Lines without backslashes or
    quotes (nearly all) take a fast path of plain `str.split`.
    """
    if "\\" not in line and '"' not in line:
        head, _, rest = line.partition(" ")
        measurement, *tag_items = head.split(",")
        tags = dict(item.split("=", 1) for item in tag_items)
        fields_text, _, ts_text = rest.partition(" ")
        field_items = fields_text.split(",")
        fields = {}
        for item in field_items:
            key, _, value = item.partition("=")
            fields[key] = _value(value)
    else:
        head, rest = [*_split_unescaped(line, " ", 1, quotes=False), ""][:2]
        measurement, *tag_items = _split_unescaped(head, ",", quotes=False)
        tags = {}
        for item in tag_items:
            key, value = [*_split_unescaped(item, "=", 1, quotes=False), ""][:2]
            tags[_unescape_key(key)] = _unescape_key(value)
        fields_text, ts_text = [*_split_unescaped(rest, " ", 1), ""][:2]
        fields = {}
        for item in _split_unescaped(fields_text, ","):
            key, value = [*_split_unescaped(item, "=", 1), ""][:2]
            fields[_unescape_key(key)] = _value(value)
        measurement = _unescape_key(measurement)
    if not measurement or not fields or any(not key for key in fields):
        raise ValueError(f"not a line protocol point: {line[:200]!r}")
    return measurement, tags, fields, int(ts_text) if ts_text else None


def field_types(line: str) -> tuple[str, dict[str, str]]:
    """(measurement, {field key: InfluxDB type}) of a line, to match server error messages.

    Types are spelled as InfluxDB reports them in a field type conflict.
    """
    try:
        measurement, _, fields, _ = parse_line(line)
    except ValueError:
        return "", {}
    return measurement, {key: _TYPE_NAMES[type(value)] for key, value in fields.items()}
