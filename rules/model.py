"""What a rule, an alert transition and the site around them are: plain frozen data.

The loader (rules/loader.py) builds these from YAML, the engine (rules/engine.py) evaluates
them, the gateway persists and publishes the transitions. Nothing here does I/O.

Durations are seconds (float); timestamps are Unix seconds of event time (the reading's
`ts`), never the wall clock, except for the live deadman check the gateway drives with
`Engine.tick(now)`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

Severity = Literal["info", "warning", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = ("info", "warning", "critical")

AlertState = Literal["pending", "firing", "resolved"]
"""`pending` (a condition holds, its `for` has not elapsed) is internal: persisted so a
restart keeps the timer, never published. MQTT, InfluxDB and the API see firing/resolved."""


# ---- the site around the rules ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What rules match on. `building` is None for devices outside any building."""

    device_id: str
    kind: str
    building: str | None = None


Interval = tuple[int, int]
"""[start, end) in minutes after local midnight, 0 <= start < end <= 1440."""


@dataclass(frozen=True, slots=True)
class Calendar:
    """When a building is open, in the site's time zone.

    `weekly[d]` are the open intervals of weekday d (0 = Monday, as `date.weekday()`); a
    holiday (ISO date string, local) uses `holiday_hours` instead (default: closed all day).
    """

    weekly: tuple[tuple[Interval, ...], ...]  # exactly 7 entries
    holidays: frozenset[str] = frozenset()
    holiday_hours: tuple[Interval, ...] = ()


DEFAULT_CALENDAR: Final = Calendar(weekly=tuple(((360, 1380),) for _ in range(7)))
"""06:00-23:00 every day: common areas of a residential building. Anything drawing power
between 23:00 and 06:00 that a schedule rule watches is out of hours."""


@dataclass(frozen=True, slots=True)
class SiteContext:
    """The site facts rules need: time zone, calendars, the device registry.

    `calendars` maps a building id to its calendar; buildings absent use `default_calendar`.
    Devices absent from `devices` (replay of a recording) are learned from the readings,
    with their kind from the reading and no building.
    """

    timezone: str = "UTC"
    default_calendar: Calendar = DEFAULT_CALENDAR
    calendars: Mapping[str, Calendar] = field(default_factory=dict)
    devices: Mapping[str, DeviceInfo] = field(default_factory=dict)

    def calendar_for(self, building: str | None) -> Calendar:
        if building is None:
            return self.default_calendar
        return self.calendars.get(building, self.default_calendar)


# ---- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """Which devices a rule watches; every given selector must match (None: any).

    `device_ids` are shell-style globs (`hvac-b1-*`), any one of which may match.
    """

    kinds: frozenset[str] | None = None
    device_ids: tuple[str, ...] | None = None
    buildings: frozenset[str] | None = None
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.device_ids:
            pattern = "|".join(fnmatch.translate(glob) for glob in self.device_ids)
            object.__setattr__(self, "_regex", re.compile(pattern))

    def matches(self, device: DeviceInfo) -> bool:
        if self.kinds is not None and device.kind not in self.kinds:
            return False
        if self.buildings is not None and device.building not in self.buildings:
            return False
        return self._regex is None or self._regex.match(device.device_id) is not None


@dataclass(frozen=True, slots=True)
class RuleBase:
    """Fields every rule kind has.

    `for_s`: the condition must hold this long (event time) before the alert fires; until
    then it is pending. `message` is a `str.format` template; the engine offers `rule_id`,
    `device_id`, `kind`, `building`, `metric`, `value`, `severity`, every field of the rule
    (e.g. `above`, `clear`, `window_s`) and the rule's labels. `source` names the file and
    line the rule came from (for messages about the rule itself).
    """

    id: str
    match: Match
    severity: Severity = "warning"
    for_s: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    message: str = ""
    source: str = ""


@dataclass(frozen=True, slots=True)
class ThresholdRule(RuleBase):
    """`metric` above `above` (or below `below`); clears only past `clear` (hysteresis).

    Exactly one of above/below is set. With `above`, clear <= above and the alert resolves
    when the value drops below `clear`; with `below`, clear >= below. clear == the threshold
    means no hysteresis.
    """

    kind: Literal["threshold"] = "threshold"
    metric: str = "power_w"
    above: float | None = None
    below: float | None = None
    clear: float | None = None  # None: the threshold itself


@dataclass(frozen=True, slots=True)
class RateOfChangeRule(RuleBase):
    """|Δmetric| / Δt between consecutive readings over `max_per_s` (per second).

    `direction`: `up`, `down` or `both`. Readings closer than `min_interval_s` are not
    compared (divide-by-tiny). Resolves once the rate stays under `clear_per_s` (default
    `max_per_s`).
    """

    kind: Literal["rate_of_change"] = "rate_of_change"
    metric: str = "power_w"
    max_per_s: float = 0.0
    clear_per_s: float | None = None
    direction: Literal["up", "down", "both"] = "both"
    min_interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class FlatlineRule(RuleBase):
    """The metric has not changed by more than `tolerance` for `window_s` of event time.

    Values with |value| <= `ignore_below` do not count (a switched-off unit reports 0 for
    hours, which is not a stuck sensor). Resolves on the first change.
    """

    kind: Literal["flatline"] = "flatline"
    metric: str = "power_w"
    window_s: float = 3600.0
    tolerance: float = 0.0
    ignore_below: float = 0.0


@dataclass(frozen=True, slots=True)
class CounterRule(RuleBase):
    """A cumulative counter (`energy_wh`) that must only grow, as fast as the power allows.

    Between consecutive readings: Δ < -`regression_tolerance` is a regression, unless the
    previous value was within `rollover_margin` (fraction) of `counter_max` and the new one
    near 0, which is a rollover (not alerted; the delta is counter_max - prev + new). A
    delta over `jump_factor` x the energy the reported `power_metric` explains (mean power
    x Δt / 3600) plus `jump_margin` (Wh) is an implausible jump; with `max_power` (W) set,
    the allowance is at least `max_power` x Δt / 3600 (the most the device can use unseen
    across the gap, e.g. a unit cycling between two readings) plus `jump_margin`. One alert
    per rule and device covers all three (the message says which); it resolves after
    `clear_after_s` of event time without another anomaly.
    """

    kind: Literal["counter"] = "counter"
    metric: str = "energy_wh"
    power_metric: str = "power_w"
    counter_max: float = 2.0**32
    rollover_margin: float = 0.05
    regression_tolerance: float = 0.0
    jump_factor: float = 2.0
    jump_margin: float = 50.0
    max_power: float | None = None
    clear_after_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class NoDataRule(RuleBase):
    """Deadman: no reading from a device for `timeout_s`.

    Event time: a gap between a device's consecutive readings, or the newest reading of any
    device (the stream's watermark) being `timeout_s` past the device's last one. Live, the
    gateway also calls `Engine.tick(wall_clock)`. Resolves on the device's next reading.
    `metric` None: any reading counts; else only readings carrying that metric.
    """

    kind: Literal["no_data"] = "no_data"
    metric: str | None = None
    timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class ScheduleRule(RuleBase):
    """Consumption outside the building's calendar: `metric` above `above` while closed.

    Resolves when the value drops to `clear` (default `above`) or the building opens.
    """

    kind: Literal["schedule"] = "schedule"
    metric: str = "power_w"
    above: float = 0.0
    clear: float | None = None


@dataclass(frozen=True, slots=True)
class BaselineRule(RuleBase):
    """Deviation from what this device usually does at this hour of the week.

    Values are averaged per `bucket_s` (event time). The baseline per device and
    hour-of-week is robust (`method`: `median_mad` over the last `history_weeks` buckets of
    that hour, or `ewma` with weight `alpha`). A bucket deviates when
    |mean - baseline| > max(`k` x scale, `min_abs_deviation`) (`direction` up/down/both),
    where scale is 1.4826 x MAD (or the EWMA of absolute deviations). No alert during the
    first `warmup_s` of a device's data. Resolves at the first bucket within bounds.
    """

    kind: Literal["baseline"] = "baseline"
    metric: str = "power_w"
    bucket_s: float = 900.0
    method: Literal["median_mad", "ewma"] = "median_mad"
    history_weeks: int = 4
    alpha: float = 0.3
    k: float = 4.0
    min_abs_deviation: float = 0.0
    direction: Literal["up", "down", "both"] = "both"
    warmup_s: float = 7 * 86_400.0


@dataclass(frozen=True, slots=True)
class RatioRule(RuleBase):
    """numerator / denominator**exponent drifting from the device's own reference.

    E.g. `filter_dp_pa / fan_speed_pct**2` (pressure drop grows with the square of the
    flow) or `power_w / fan_speed_pct**3`. Only readings with denominator >=
    `min_denominator` count. The reference is the median ratio of the device's first
    `learn_s` of data; the alert fires when the mean ratio over `window_s` exceeds the
    reference by `rise_pct` percent (or falls by `fall_pct`, when set), and resolves below
    `clear_pct`.
    """

    kind: Literal["ratio"] = "ratio"
    numerator: str = "filter_dp_pa"
    denominator: str = "fan_speed_pct"
    exponent: float = 1.0
    min_denominator: float = 1e-9
    learn_s: float = 86_400.0
    window_s: float = 3600.0
    rise_pct: float | None = 30.0
    fall_pct: float | None = None
    clear_pct: float | None = None


@dataclass(frozen=True, slots=True)
class FloorRule(RuleBase):
    """A cycling unit's base draw (its floor) against its own lowest at the same operating point.

    Per `window_s` bucket and operating point (the value of `per`, e.g. the fan speed, in
    steps of `per_step`; readings with `per` below `min_per` are not used), the floor is
    the lowest value of `metric` held by two consecutive readings at that point. A bucket
    is judged only when its peak reaches `min_swing` times its floor: the unit's big load
    (a compressor) ran and stopped inside it, so the floor is what runs without it (the
    fan and controls), which the weather does not move. The reference is the lowest judged
    floor of that operating point so far; after `learn_s` from the device's first usable
    reading, a floor more than `rise_pct` above it is the condition, and a floor back under
    `clear_pct` resolves. `for` counts in event time across judged buckets.
    """

    kind: Literal["floor"] = "floor"
    metric: str = "power_w"
    per: str | None = None
    per_step: float = 1.0
    min_per: float = 1e-9
    window_s: float = 3600.0
    min_swing: float = 2.0
    learn_s: float = 7 * 86_400.0
    rise_pct: float = 10.0
    clear_pct: float | None = None


@dataclass(frozen=True, slots=True)
class GroupRule(RuleBase):
    """Per building: the main meter vs the sum of its sub-meters, on `metric`.

    `match` selects the sub-meters, `main` the main meter(s) (one per building). Means
    per `window_s` bucket; the alert (device = the main meter) fires when
    |main - sum(subs)| > max(`tolerance_pct` % of main, `min_abs`) and resolves when
    within. A bucket in which any member sent nothing is not judged.
    """

    kind: Literal["group"] = "group"
    metric: str = "power_w"
    main: Match = field(default_factory=Match)
    window_s: float = 900.0
    tolerance_pct: float = 10.0
    min_abs: float = 0.0


@dataclass(frozen=True, slots=True)
class EventRule(RuleBase):
    """Device events (`door_forced`, `door_held_open`, `tamper`, ...) as alerts.

    Fires on an event whose type is in `events`; resolves after `clear_after_s` of event
    time without another, or on an event of a type in `clear_events`.
    """

    kind: Literal["event"] = "event"
    events: frozenset[str] = frozenset()
    clear_events: frozenset[str] = frozenset()
    clear_after_s: float = 300.0


Rule = (ThresholdRule | RateOfChangeRule | FlatlineRule | CounterRule | NoDataRule
        | ScheduleRule | BaselineRule | RatioRule | FloorRule | GroupRule | EventRule)
RULE_KINDS: Final[tuple[str, ...]] = (
    "threshold", "rate_of_change", "flatline", "counter", "no_data", "schedule", "baseline",
    "ratio", "floor", "group", "event",
)


def rule_metric(rule: Rule) -> str | None:
    """The metric an alert of this rule is about (the `metric` of the alert object)."""
    if isinstance(rule, RatioRule):
        return rule.numerator
    if isinstance(rule, EventRule):
        return None
    return rule.metric


# ---- what the engine emits -------------------------------------------------------------------


def alert_id(rule_id: str, device_id: str, started_at: float) -> str:
    """Deterministic, so a replay after a restart names the same alert (idempotent upserts)."""
    key = f"{rule_id}\x00{device_id}\x00{round(started_at * 1000)}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Transition:
    """One alert changing state, at event time `ts`.

    `started_at` is when the condition began (the pending start), so an alert's id is
    stable from pending through resolved. `value` is the value that caused the transition
    (None for no-data and events).
    """

    alert_id: str
    rule_id: str
    device_id: str
    metric: str | None
    state: AlertState
    severity: Severity
    value: float | None
    started_at: float
    ts: float
    message: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The alert object of CONTRACT.md section 1 (`{root}/alerts/{rule_id}/{device}`),
        plus `alert_id` and `labels` (extensions)."""
        return {"rule_id": self.rule_id, "device_id": self.device_id, "metric": self.metric,
                "state": self.state, "severity": self.severity, "value": self.value,
                "started_at": self.started_at, "ts": self.ts, "message": self.message,
                "alert_id": self.alert_id, "labels": dict(self.labels)}
