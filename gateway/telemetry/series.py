"""Time series from the 1-minute rollups: what `GET /api/v1/energy/series` answers.

Selectors (`device_id`):
- a device id: that device;
- `building:{id}`: the sum over the devices of that building;
- `kind:{kind}`: the sum over the devices of that kind (`kind:meter` is community power
  when the meters measure the buildings' supplies);
- `site:{site id}`: the sum over every device of the site that reports the metric. Unlike
  the others it may count energy twice when meters and the loads behind them both report.
  Prefixed because a plain `site` is a valid device id.

Points. Steps are multiples of 60 s aligned to the epoch (a point's `ts` is a multiple of
`step`) and each point covers its whole step, so the first and last may reach outside
[start, end); steps without data are left out. For a sum, each device is first reduced over
the step (min, max, mean = its sum / its count, last = its value with the greatest
timestamp), then the devices are added: min and max are the sums of the devices' minima and
maxima (a bound, not a simultaneous value), mean the sum of the means (e.g. the average
community power), last the sum of the last values (community power now), count the total
number of readings. A device without data in a step adds nothing to that step.

Bounded: at most MAX_POINTS steps per request; more is a ValueError (the API's 422).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, Engine, and_, func, literal_column, select

from device_drivers.vocabulary import DEVICE_KINDS, STANDARD_METRICS
from gateway.config import SiteConfig
from gateway.store.db import read_engine
from gateway.telemetry.rollups import MINUTE
from gateway.telemetry.tables import telemetry_rollups

MAX_POINTS = 10_000
_IN_CHUNK = 500

DeviceInfo = tuple[str, str | None]
"""A device's (kind, building)."""


class UnknownSeries(LookupError):
    """The selector names no known device, building, kind or site; the message says which."""


class InvalidRange(ValueError):
    """start/end/step that cannot be answered (empty range, bad step, too many points)."""


@dataclass(frozen=True, slots=True)
class Point:
    ts: float
    min: float
    max: float
    mean: float
    last: float
    count: int


@dataclass(frozen=True, slots=True)
class SeriesResult:
    device_id: str
    metric: str
    unit: str
    step: int
    points: list[Point] = field(default_factory=list)


def select_devices(selector: str, devices: Mapping[str, DeviceInfo],
                   site_id: str | None = None) -> list[str]:
    """The device ids a selector names; UnknownSeries when it names nothing known."""
    prefix, sep, value = selector.partition(":")
    if not sep:
        if selector not in devices:
            raise UnknownSeries(f"no device {selector!r}")
        return [selector]
    if prefix == "building":
        found = [d for d, (_, building) in devices.items() if building == value]
        if not found:
            raise UnknownSeries(f"no devices in building {value!r}")
        return sorted(found)
    if prefix == "kind":
        if value not in DEVICE_KINDS:
            raise UnknownSeries(f"no device kind {value!r} (one of {', '.join(DEVICE_KINDS)})")
        found = [d for d, (kind, _) in devices.items() if kind == value]
        if not found:
            raise UnknownSeries(f"no devices of kind {value!r}")
        return sorted(found)
    if prefix == "site":
        if site_id is None or value != site_id or not devices:
            raise UnknownSeries(f"no site {value!r}")
        return sorted(devices)
    raise UnknownSeries(
        f"no device {selector!r} (selectors are a device id, building:ID, kind:KIND, site:ID)")


def check_range(start: float, end: float, step: int) -> tuple[int, int]:
    """The first step's start and the end of the last step; InvalidRange if unanswerable."""
    if not (math.isfinite(start) and math.isfinite(end)):
        raise InvalidRange("start and end must be finite numbers")
    if start >= end:
        raise InvalidRange("start must be before end")
    if step <= 0 or step % MINUTE:
        raise InvalidRange("step must be a positive multiple of 60 seconds")
    first = math.floor(start / step) * step
    stop = math.ceil(end / step) * step
    if (stop - first) // step > MAX_POINTS:
        raise InvalidRange(
            f"{(stop - first) // step} steps of {step} s: at most {MAX_POINTS}; "
            "use a larger step or a shorter range")
    return first, stop


def series(engine: Engine, *, device_id: str, metric: str, start: float, end: float,
           step: int, devices: Mapping[str, DeviceInfo],
           site_id: str | None = None) -> SeriesResult:
    """The points of one device or the sum over a selection; see the module docstring."""
    first, stop = check_range(start, end, step)
    ids = select_devices(device_id, devices, site_id)
    # Per device and step: one grouped query, then the last value by primary key lookup of
    # the step's latest minute (the minute holding the greatest timestamp of the step).
    r = telemetry_rollups.c
    # Integers we computed, inlined so that PostgreSQL sees the same expression in SELECT
    # and GROUP BY (two bound parameters would be two different expressions to it).
    bucket = (r.minute - literal_column(str(int(first)), BigInteger)) // literal_column(
        str(int(step)), BigInteger)
    per_device: dict[int, list[tuple[float, float, float, int, float]]] = {}
    with engine.connect() as conn:
        for i in range(0, len(ids), _IN_CHUNK):
            grouped = (
                select(r.device_id, bucket.label("b"), func.min(r.min).label("lo"),
                       func.max(r.max).label("hi"), func.sum(r.sum).label("total"),
                       func.sum(r.count).label("n"), func.max(r.minute).label("lm"))
                .where(r.metric == metric, r.device_id.in_(ids[i:i + _IN_CHUNK]),
                       r.minute >= first, r.minute < stop)
                .group_by(r.device_id, bucket)
                .subquery()
            )
            query = select(grouped.c.b, grouped.c.lo, grouped.c.hi, grouped.c.total,
                           grouped.c.n, r.last).join_from(
                grouped, telemetry_rollups,
                and_(r.device_id == grouped.c.device_id, r.metric == metric,
                     r.minute == grouped.c.lm))
            for b, lo, hi, total, n, last in conn.execute(query):
                per_device.setdefault(int(b), []).append(
                    (float(lo), float(hi), float(total) / int(n), int(n), float(last)))
    points = []
    for b in sorted(per_device):
        rows = per_device[b]
        points.append(Point(
            ts=float(first + b * step),
            min=math.fsum(row[0] for row in rows),
            max=math.fsum(row[1] for row in rows),
            mean=math.fsum(row[2] for row in rows),
            last=math.fsum(row[4] for row in rows),
            count=sum(row[3] for row in rows),
        ))
    return SeriesResult(device_id, metric, STANDARD_METRICS.get(metric, ""), step, points)


class SeriesQuery:
    """`series` bound to the store and the site's device registry: the object the runtime
    hands to the API (api.services.EnergySeries). Calls block: the API runs them in a
    worker thread. Reads through a deferred-transaction engine (gateway.store.db.read_engine), so a
    long query never holds SQLite's write lock; `dispose()` closes it."""

    def __init__(self, engine: Engine, devices: Mapping[str, DeviceInfo],
                 site_id: str | None = None) -> None:
        self._owner = engine
        self._engine = read_engine(engine)
        self._devices = dict(devices)
        self._site_id = site_id

    @classmethod
    def from_config(cls, engine: Engine, config: SiteConfig) -> SeriesQuery:
        """The site's devices with their kind and building, and `site:{site id}`."""
        return cls(engine, {d.device_id: (d.kind, d.building) for d in config.devices},
                   site_id=config.site.id)

    def dispose(self) -> None:
        if self._engine is not self._owner:
            self._engine.dispose()

    def series(self, *, device_id: str, metric: str, start: float, end: float,
               step: int) -> SeriesResult:
        return series(self._engine, device_id=device_id, metric=metric, start=start,
                      end=end, step=step, devices=self._devices, site_id=self._site_id)
