"""Scenario files: a virtual community, its weather and a schedule of labelled faults.

```yaml
name: two-towers                     # optional
seed: 7
start: 2026-03-02T00:00:00+08:00     # ISO datetime with zone (a naive one is local time)
duration: 28d                        # 90s, 15m, 6h, 28d, 1d12h, or seconds
timezone: Asia/Shanghai
reporting: {interval: 60s, jitter: 2s, loss: 0.001, blips_per_week: 1, blip_max: 6m}
inrush_probability: 0.1              # a sample that lands on a compressor start reads 2-3x
weather:
  mean_c: 12                         # daily mean on the first day
  trend_c_per_day: 0.15
  amplitude_c: 4                     # half the day-night swing
  day_sd_c: 2                        # day-to-day anomaly (AR(1))
  pm25_mean: 45
  events: [{date: 2026-03-12, delta_c: 7, from: "12:00", to: "18:00"}]  # hot afternoon
holidays: [2026-04-06]               # residents at home (weekend shape), office closed
events:                              # ordinary operations, not faults
  early_start_per_week: 1            # per unit: switched on 20-60 min early (never before
  off_day_per_month: 1               #   the building opens); off all day; setpoint moved
  setpoint_change_per_week: 1
  list: [{type: early_start, device: hvac-b1-gym, date: 2026-03-05, minutes: 45}]
buildings:
  - id: b1
    template: standard               # main meter, residential + common sub-meters, units
    households: 120
    residential_submeters: 2
    hvac: [lobby, gym, office]       # spaces: lobby gym office clubhouse lounge
    fresh_air: 2
    air_purifiers: 2
    calendar: "06:00-23:00"          # optional; the default is rules' DEFAULT_CALENDAR
    units: [...]                     # explicit units (added, or replacing same ids)
    submeters: [...]                 # explicit sub-meters: {id, loads: [{type, size}]}
faults:                              # explicit, each labelled
  - {type: spike, device: hvac-b1-lobby, start: 2026-03-10T14:20+08:00, duration: 5m,
     magnitude: 4}
random_faults:                       # placed deterministically from the seed
  - {type: stuck_sensor, count: 4, devices: ["hvac-*"], duration: [1h, 6h]}
```

Fault types and their `magnitude`: spike (x rated power, 3-6), stuck_sensor (`metric`,
default power_w; `all`: every metric, a meter's stale register snapshot), after_hours
(`variant` left_on | switched_on), counter_reset (the value it restarts from, Wh),
counter_jump (Wh added), dropout, slow_drift (fraction per day, 0.01-0.03),
clogging_filter (growth per day of the filter's pressure drop per unit of airflow,
0.06-0.15; random ones last until it has grown 60-120 %, when the filter is replaced),
submeter_mismatch (on a sub-meter: `under_read` fraction 0.2-0.4; on a main meter:
`unmetered_load` in W). Everything not given has a documented default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from device_drivers.vocabulary import valid_device_id
from rules.model import DEFAULT_CALENDAR, Calendar
from rules.scoring import FAULT_TYPES
from simulators.faults.noise import Keyed

UnitKind = Literal["hvac", "fresh_air", "air_purifier"]
UNIT_KINDS: Final[tuple[str, ...]] = ("hvac", "fresh_air", "air_purifier")
SPACES: Final[tuple[str, ...]] = ("lobby", "gym", "office", "clubhouse", "lounge")
LOAD_TYPES: Final[tuple[str, ...]] = ("residential", "lifts", "lighting", "pumps", "constant")
METRICS_BY_KIND: Final[Mapping[str, tuple[str, ...]]] = {
    "meter": ("power_w", "energy_wh", "voltage_v", "current_a"),
    "hvac": ("power_w", "energy_wh", "running", "temperature_c", "setpoint_c", "fan_speed_pct"),
    "fresh_air": ("power_w", "energy_wh", "running", "fan_speed_pct", "filter_dp_pa",
                  "temperature_c", "co2_ppm"),
    "air_purifier": ("power_w", "energy_wh", "running", "fan_speed_pct", "filter_dp_pa",
                     "pm25_ugm3"),
}
COUNTER_MAX_DEFAULT: Final = 2.0**32


class ScenarioError(ValueError):
    """A scenario file is wrong; the message names the key."""


# ---- specs -----------------------------------------------------------------------------------

DayHours = tuple[float, float] | None
"""[on, off) in seconds after local midnight, or None: off all day."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a unit runs: weekday hours, Saturday, Sunday and holiday overrides."""

    weekday: DayHours
    saturday: DayHours
    sunday: DayHours
    holiday: DayHours
    manual: bool = False  # switched by staff: start/stop vary by minutes day to day

    def for_day(self, weekday: int, holiday: bool) -> DayHours:
        if holiday:
            return self.holiday
        if weekday == 5:
            return self.saturday
        if weekday == 6:
            return self.sunday
        return self.weekday


@dataclass(frozen=True, slots=True)
class UnitSpec:
    id: str
    kind: str
    building: str
    submeter: str
    rated_w: float
    space: str
    schedule: Schedule
    compressor: Literal["fixed", "inverter"] = "inverter"
    fan_pct: float = 80.0
    dcv: bool = False  # fresh air: fan follows occupancy (demand-controlled ventilation)
    dp_clean_pa: float = 100.0  # filter pressure drop, clean, at full fan speed
    filter_age: float = 0.3  # 0 clean .. 1 due for replacement, at the start
    filter_life_days: float = 120.0
    setpoint_cool_c: float = 26.0
    setpoint_heat_c: float = 20.0
    energy_start_wh: float = 1e6
    energy_resolution_wh: float = 1.0


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """A load behind a meter that is not a modelled unit.

    `size`: households (residential), lift cars (lifts), kW (lighting, pumps, constant).
    """

    type: str
    size: float


@dataclass(frozen=True, slots=True)
class MeterSpec:
    id: str
    building: str
    role: Literal["main", "sub"]
    loads: tuple[LoadSpec, ...] = ()
    energy_start_wh: float = 5e8
    energy_resolution_wh: float = 10.0
    gain: float = 1.0  # calibration error (class 0.5: within 0.5 %)


@dataclass(frozen=True, slots=True)
class BuildingSpec:
    id: str
    main: MeterSpec
    submeters: tuple[MeterSpec, ...]
    units: tuple[UnitSpec, ...]
    unmetered_w: float = 800.0  # loads between main and sub-meters (cameras, gates, ...)
    loss_fraction: float = 0.01  # cable losses at nominal load, growing with load^2
    calendar: Calendar | None = None  # None: the site default

    def devices(self) -> list[str]:
        return [self.main.id, *(m.id for m in self.submeters), *(u.id for u in self.units)]


@dataclass(frozen=True, slots=True)
class Reporting:
    interval_s: float = 60.0
    jitter_s: float = 2.0
    loss: float = 0.001
    blips_per_week: float = 1.0  # short communication gaps per device and week
    blip_max_s: float = 360.0


@dataclass(frozen=True, slots=True)
class WeatherEvent:
    day: date
    delta_c: float
    from_s: float = 12 * 3600.0
    to_s: float = 18 * 3600.0


@dataclass(frozen=True, slots=True)
class Weather:
    mean_c: float = 12.0
    trend_c_per_day: float = 0.15
    amplitude_c: float = 4.0
    day_sd_c: float = 2.0
    pm25_mean: float = 45.0
    events: tuple[WeatherEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class LegitEvent:
    type: Literal["early_start", "off_day", "setpoint_change"]
    device: str
    day: date
    value: float = 0.0  # minutes early / setpoint delta


@dataclass(frozen=True, slots=True)
class EventRates:
    early_start_per_week: float = 1.0
    off_day_per_month: float = 1.0
    setpoint_change_per_week: float = 1.0


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One injected fault, as scheduled (`start`: Unix seconds)."""

    type: str
    device: str
    start: float
    duration_s: float
    magnitude: float | None = None
    metric: str | None = None
    variant: str | None = None


@dataclass(frozen=True, slots=True)
class RandomFaults:
    type: str
    count: int
    devices: tuple[str, ...] = ()  # globs; empty: the type's natural devices
    duration_s: tuple[float, float] | None = None
    magnitude: tuple[float, float] | None = None
    metric: str | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    seed: int
    start: datetime
    duration_s: float
    timezone: str
    buildings: tuple[BuildingSpec, ...]
    name: str = "scenario"
    reporting: Reporting = field(default_factory=Reporting)
    weather: Weather = field(default_factory=Weather)
    holidays: frozenset[date] = frozenset()
    events: tuple[LegitEvent, ...] = ()
    event_rates: EventRates = field(default_factory=EventRates)
    faults: tuple[FaultSpec, ...] = ()
    random_faults: tuple[RandomFaults, ...] = ()
    grid_s: float = 10.0
    counter_max: float = COUNTER_MAX_DEFAULT
    inrush_probability: float = 0.1
    default_calendar: Calendar = DEFAULT_CALENDAR

    @property
    def t0(self) -> float:
        return self.start.timestamp()

    @property
    def t1(self) -> float:
        return self.t0 + self.duration_s

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def calendar_for(self, building: str) -> Calendar:
        for b in self.buildings:
            if b.id == building and b.calendar is not None:
                return b.calendar
        return self.default_calendar

    def units(self) -> list[UnitSpec]:
        return [u for b in self.buildings for u in b.units]

    def meters(self) -> list[MeterSpec]:
        return [m for b in self.buildings for m in (b.main, *b.submeters)]

    def device_kinds(self) -> dict[str, str]:
        """device id -> kind, in a stable order (buildings, then meters before units)."""
        out: dict[str, str] = {}
        for b in self.buildings:
            out[b.main.id] = "meter"
            for m in b.submeters:
                out[m.id] = "meter"
            for u in b.units:
                out[u.id] = u.kind
        return out

    def device_building(self) -> dict[str, str]:
        return {dev: b.id for b in self.buildings for dev in b.devices()}


# ---- parsing helpers -------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*"
                          r"(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")
_HOURS_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_duration(value: object, where: str) -> float:
    """`90s`, `15m`, `6h`, `28d`, `1d12h`, or a number of seconds."""
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ScenarioError(f"{where}: a duration must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m and any(m.groups()):
            d, h, mi, s = (float(x) if x else 0.0 for x in m.groups())
            return d * 86400 + h * 3600 + mi * 60 + s
    raise ScenarioError(f"{where}: expected a duration like 90s, 15m, 6h or 28d, got {value!r}")


def _range(value: object, where: str, parse: Any) -> tuple[float, float]:
    if isinstance(value, list | tuple) and len(value) == 2:
        lo, hi = parse(value[0], where), parse(value[1], where)
    else:
        lo = hi = parse(value, where)
    if hi < lo:
        raise ScenarioError(f"{where}: the range is reversed")
    return float(lo), float(hi)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: expected a number, got {value!r}")
    return float(value)


def parse_time(value: object, tz: ZoneInfo, where: str) -> datetime:
    """An ISO datetime; without a zone it is local time of the scenario."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ScenarioError(f"{where}: expected an ISO datetime, got {value!r}") from None
    else:
        raise ScenarioError(f"{where}: expected an ISO datetime, got {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed


def _date(value: object, where: str) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ScenarioError(f"{where}: expected a date YYYY-MM-DD, got {value!r}")


def parse_hours(value: object, where: str) -> DayHours:
    """`"06:30-22:30"` -> (23400, 81000); `off` / null -> None."""
    if value is None or value is False or (isinstance(value, str) and value.strip() == "off"):
        return None
    if isinstance(value, str):
        m = _HOURS_RE.match(value)
        if m:
            h0, m0, h1, m1 = (int(x) for x in m.groups())
            a, b = h0 * 3600 + m0 * 60, h1 * 3600 + m1 * 60
            if 0 <= a < b <= 86400 and m0 < 60 and m1 < 60:
                return (float(a), float(b))
    raise ScenarioError(f"{where}: expected hours like \"06:30-22:30\" or off, got {value!r}")


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a mapping")
    return cast(dict[str, Any], value)


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: expected a list")
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(allowed))}")


def _device_id(value: object, where: str) -> str:
    if not valid_device_id(value):
        raise ScenarioError(f"{where}: {value!r} is not a device id ([a-z0-9][a-z0-9_-]*)")
    return cast(str, value)


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings (zones are then parsed by us, exactly)."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# ---- defaults for spaces and templates -------------------------------------------------------

_SPACE_SCHEDULES: Final[Mapping[str, dict[str, Any]]] = {
    "lobby": {"hours": "06:30-22:30", "manual": False},
    "gym": {"hours": "06:30-22:00", "weekend": "07:30-22:00", "manual": True},
    "office": {"hours": "08:00-18:00", "saturday": "09:00-17:00", "sunday": "off",
               "holiday": "off", "manual": True},
    "clubhouse": {"hours": "09:00-21:30", "weekend": "08:00-22:30", "manual": True},
    "lounge": {"hours": "07:00-22:00", "manual": False},
}
_HVAC_RATING: Final[Mapping[str, tuple[float, float]]] = {
    "lobby": (5000.0, 9000.0), "gym": (8000.0, 14000.0), "office": (2500.0, 4500.0),
    "clubhouse": (10000.0, 16000.0), "lounge": (3500.0, 6000.0),
}


def _schedule(data: Mapping[str, Any], space: str, where: str) -> Schedule:
    base = dict(_SPACE_SCHEDULES.get(space, _SPACE_SCHEDULES["lobby"]))
    explicit = {k: data[k] for k in ("hours", "weekend", "saturday", "sunday", "holiday",
                                     "manual") if k in data}
    if "hours" in explicit:  # explicit hours replace the space's day overrides
        for k in ("weekend", "saturday", "sunday", "holiday"):
            base.pop(k, None)
    base.update(explicit)
    weekday = parse_hours(base.get("hours"), f"{where}.hours")
    weekend_raw = base.get("weekend", base.get("hours"))
    saturday = parse_hours(base.get("saturday", weekend_raw), f"{where}.saturday")
    sunday = parse_hours(base.get("sunday", weekend_raw), f"{where}.sunday")
    holiday = parse_hours(base["holiday"], f"{where}.holiday") if "holiday" in base else sunday
    return Schedule(weekday, saturday, sunday, holiday, bool(base.get("manual", False)))


def _calendar(value: object, where: str) -> Calendar | None:
    if value is None:
        return None
    hours = parse_hours(value, where)
    if hours is None:
        raise ScenarioError(f"{where}: a building calendar needs open hours")
    interval = (int(hours[0] // 60), int(hours[1] // 60))
    return Calendar(weekly=tuple((interval,) for _ in range(7)))


_UNIT_KEYS: Final = {"id", "kind", "rated_w", "space", "submeter", "hours", "weekend",
                     "saturday", "sunday", "holiday", "manual", "compressor", "fan_pct", "dcv",
                     "dp_clean_pa", "filter_age", "filter_life_days", "setpoint_cool_c",
                     "setpoint_heat_c", "energy_start_wh", "energy_resolution_wh"}


def _unit(data: Mapping[str, Any], building: str, default_sub: str, where: str,
          rand: Mapping[str, float]) -> UnitSpec:
    _check_keys(data, _UNIT_KEYS, where)
    unit_id = _device_id(data.get("id"), f"{where}.id")
    kind = data.get("kind")
    if kind not in UNIT_KINDS:
        raise ScenarioError(f"{where}.kind: one of {', '.join(UNIT_KINDS)}, got {kind!r}")
    space = str(data.get("space", "lobby"))
    if space not in SPACES:
        raise ScenarioError(f"{where}.space: one of {', '.join(SPACES)}, got {space!r}")
    defaults: dict[str, float] = {
        "hvac": 7000.0, "fresh_air": 1100.0, "air_purifier": 80.0}
    dp_default = {"hvac": 0.0, "fresh_air": 110.0, "air_purifier": 55.0}[kind]
    rated = _number(data.get("rated_w", rand.get("rated_w", defaults[kind])), f"{where}.rated_w")
    if rated <= 0:
        raise ScenarioError(f"{where}.rated_w: must be positive")
    compressor = data.get("compressor", rand.get("compressor_name", "inverter"))
    if compressor not in ("fixed", "inverter"):
        raise ScenarioError(f"{where}.compressor: fixed or inverter, got {compressor!r}")
    filter_age = _number(data.get("filter_age", rand.get("filter_age", 0.3)), f"{where}.filter_age")
    if not 0.0 <= filter_age <= 1.0:
        raise ScenarioError(f"{where}.filter_age: between 0 (clean) and 1 (due)")
    return UnitSpec(
        id=unit_id, kind=kind, building=building,
        submeter=_device_id(data.get("submeter", default_sub), f"{where}.submeter"),
        rated_w=rated, space=space, schedule=_schedule(data, space, where),
        compressor=cast(Literal["fixed", "inverter"], compressor),
        fan_pct=_number(data.get("fan_pct", rand.get("fan_pct", 80.0)), f"{where}.fan_pct"),
        dcv=bool(data.get("dcv", rand.get("dcv", 0.0) > 0.5)),
        dp_clean_pa=_number(data.get("dp_clean_pa", rand.get("dp_clean_pa", dp_default)),
                            f"{where}.dp_clean_pa"),
        filter_age=filter_age,
        filter_life_days=_number(data.get("filter_life_days", 120.0),
                                 f"{where}.filter_life_days"),
        setpoint_cool_c=_number(data.get("setpoint_cool_c", 26.0), f"{where}.setpoint_cool_c"),
        setpoint_heat_c=_number(data.get("setpoint_heat_c", 20.0), f"{where}.setpoint_heat_c"),
        energy_start_wh=_number(data.get("energy_start_wh", rand.get("energy_start_wh", 1e6)),
                                f"{where}.energy_start_wh"),
        energy_resolution_wh=_number(data.get("energy_resolution_wh", 1.0),
                                     f"{where}.energy_resolution_wh"),
    )


def _loads(value: object, where: str) -> tuple[LoadSpec, ...]:
    out = []
    for i, item in enumerate(_list(value, where)):
        item = _mapping(item, f"{where}[{i}]")
        _check_keys(item, {"type", "size"}, f"{where}[{i}]")
        kind = item.get("type")
        if kind not in LOAD_TYPES:
            raise ScenarioError(f"{where}[{i}].type: one of {', '.join(LOAD_TYPES)}")
        size = _number(item.get("size"), f"{where}[{i}].size")
        if size <= 0:
            raise ScenarioError(f"{where}[{i}].size: must be positive")
        out.append(LoadSpec(kind, size))
    return tuple(out)


def _meter(data: Mapping[str, Any], building: str, role: Literal["main", "sub"], where: str,
           rand: Mapping[str, float]) -> MeterSpec:
    _check_keys(data, {"id", "loads", "energy_start_wh", "energy_resolution_wh", "gain"}, where)
    return MeterSpec(
        id=_device_id(data.get("id"), f"{where}.id"), building=building, role=role,
        loads=_loads(data.get("loads"), f"{where}.loads"),
        energy_start_wh=_number(data.get("energy_start_wh", rand.get("energy_start_wh", 5e8)),
                                f"{where}.energy_start_wh"),
        energy_resolution_wh=_number(data.get("energy_resolution_wh", 10.0),
                                     f"{where}.energy_resolution_wh"),
        gain=_number(data.get("gain", rand.get("gain", 1.0)), f"{where}.gain"),
    )


def _template(data: Mapping[str, Any], bid: str, keyed: Keyed, where: str
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `standard` building: residential risers, a common sub-meter and its units."""
    households = int(_number(data.get("households", 120), f"{where}.households"))
    n_res = int(_number(data.get("residential_submeters", 2), f"{where}.residential_submeters"))
    spaces = [str(s) for s in _list(data.get("hvac", ["lobby", "gym", "office"]),
                                    f"{where}.hvac")]
    n_fa = int(_number(data.get("fresh_air", 2), f"{where}.fresh_air"))
    n_ap = int(_number(data.get("air_purifiers", 2), f"{where}.air_purifiers"))
    if households <= 0 or n_res < 1:
        raise ScenarioError(f"{where}: a standard building needs households and >= 1 riser")
    for s in spaces:
        if s not in SPACES:
            raise ScenarioError(f"{where}.hvac: unknown space {s!r}; one of {', '.join(SPACES)}")
    per = [households // n_res + (1 if i < households % n_res else 0) for i in range(n_res)]
    subs: list[dict[str, Any]] = [
        {"id": f"meter-{bid}-res{i + 1}", "loads": [{"type": "residential", "size": n}]}
        for i, n in enumerate(per)]
    lifts = max(1, round(households / 60))
    subs.append({"id": f"meter-{bid}-common", "loads": [
        {"type": "lifts", "size": lifts},
        {"type": "lighting", "size": round(2.0 + households * 0.03, 1)},
        {"type": "pumps", "size": 5.5 if households > 80 else 3.0},
        {"type": "constant", "size": 1.2},
    ]})
    units: list[dict[str, Any]] = []

    def u(stream: str) -> float:
        return keyed.uniform1(f"template/{bid}/{stream}", 0)

    for space in spaces:
        lo, hi = _HVAC_RATING[space]
        units.append({"id": f"hvac-{bid}-{space}", "kind": "hvac", "space": space,
                      "rated_w": round(lo + (hi - lo) * u(f"hvac-{space}"), -2),
                      "compressor": "fixed" if u(f"comp-{space}") < 0.4 else "inverter",
                      "fan_pct": 60.0 + 20.0 * round(u(f"fan-{space}") * 2)})
    fa_spaces = ["lobby", "gym", "clubhouse", "lounge", "office"]
    for i in range(n_fa):
        space = fa_spaces[i % len(fa_spaces)]
        units.append({"id": f"fa-{bid}-{i + 1}", "kind": "fresh_air", "space": space,
                      "rated_w": round(550 + 1650 * u(f"fa{i}"), -1),
                      "dcv": u(f"fa-dcv{i}") < 0.5,
                      "fan_pct": 70.0 + 10.0 * round(u(f"fa-fan{i}") * 3),
                      "dp_clean_pa": round(80 + 60 * u(f"fa-dp{i}")),
                      "filter_age": round(0.9 * u(f"fa-age{i}"), 2)})
    ap_spaces = ["lobby", "gym", "office", "clubhouse", "lounge"]
    for i in range(n_ap):
        space = ap_spaces[i % len(ap_spaces)]
        units.append({"id": f"ap-{bid}-{i + 1}", "kind": "air_purifier", "space": space,
                      "rated_w": round(45 + 75 * u(f"ap{i}")),
                      "dp_clean_pa": round(40 + 30 * u(f"ap-dp{i}")),
                      "filter_age": round(0.9 * u(f"ap-age{i}"), 2)})
    return subs, units


# ---- the loader ------------------------------------------------------------------------------

_TOP_KEYS: Final = {"name", "description", "seed", "start", "duration", "timezone", "reporting",
                    "weather", "holidays", "events", "buildings", "faults", "random_faults",
                    "grid", "counter_max", "inrush_probability"}
_BUILDING_KEYS: Final = {"id", "template", "households", "residential_submeters", "hvac",
                         "fresh_air", "air_purifiers", "main_meter", "submeters", "units",
                         "unmetered_w", "loss_fraction", "calendar"}


def _building(data: Mapping[str, Any], where: str, keyed: Keyed) -> BuildingSpec:
    _check_keys(data, _BUILDING_KEYS, where)
    bid = _device_id(data.get("id"), f"{where}.id")
    template = data.get("template")
    if template not in (None, "standard"):
        raise ScenarioError(f"{where}.template: only `standard` exists, got {template!r}")
    subs_raw: list[dict[str, Any]] = []
    units_raw: list[dict[str, Any]] = []
    if template == "standard":
        subs_raw, units_raw = _template(data, bid, keyed, where)
    for i, item in enumerate(_list(data.get("submeters"), f"{where}.submeters")):
        item = _mapping(item, f"{where}.submeters[{i}]")
        subs_raw = [s for s in subs_raw if s["id"] != item.get("id")] + [item]
    for i, item in enumerate(_list(data.get("units"), f"{where}.units")):
        item = _mapping(item, f"{where}.units[{i}]")
        units_raw = [u for u in units_raw if u["id"] != item.get("id")] + [item]
    if not subs_raw:
        raise ScenarioError(f"{where}: a building needs sub-meters (or template: standard)")

    def rand_energy(dev: str, lo: float, hi: float) -> float:
        return round(lo + (hi - lo) * keyed.uniform1(f"energy-start/{dev}", 0), -1)

    def rand_gain(dev: str) -> float:
        return 1.0 + max(-0.008, min(0.008, 0.004 * keyed.normal1(f"gain/{dev}", 0)))

    main_raw = _mapping(data.get("main_meter"), f"{where}.main_meter") or {
        "id": f"meter-{bid}-main"}
    main_id = str(main_raw.get("id", f"meter-{bid}-main"))
    main = _meter(main_raw, bid, "main", f"{where}.main_meter",
                  {"energy_start_wh": rand_energy(main_id, 2e8, 2.5e9), "gain": rand_gain(main_id)})
    subs = tuple(
        _meter(s, bid, "sub", f"{where}.submeters[{i}]",
               {"energy_start_wh": rand_energy(str(s.get("id")), 5e7, 1e9),
                "gain": rand_gain(str(s.get("id")))})
        for i, s in enumerate(subs_raw))
    sub_ids = [s.id for s in subs]
    common = next((s for s in sub_ids if s.endswith("-common")), sub_ids[-1])
    # A unit's counter holds 3,000-20,000 hours of its typical draw (years in service).
    units = tuple(
        _unit(u, bid, common, f"{where}.units[{i}]",
              {"energy_start_wh": rand_energy(str(u.get("id")), 3000.0, 20000.0)
               * 0.4 * float(u.get("rated_w", 1000.0))})
        for i, u in enumerate(units_raw))
    for i, unit in enumerate(units):
        if unit.submeter not in sub_ids:
            raise ScenarioError(f"{where}.units[{i}].submeter: {unit.submeter!r} is not a "
                                f"sub-meter of building {bid}")
    unmetered = _number(data.get("unmetered_w", 800.0), f"{where}.unmetered_w")
    return BuildingSpec(id=bid, main=main, submeters=subs, units=units, unmetered_w=unmetered,
                        loss_fraction=_number(data.get("loss_fraction", 0.01),
                                              f"{where}.loss_fraction"),
                        calendar=_calendar(data.get("calendar"), f"{where}.calendar"))


def _fault(data: Mapping[str, Any], tz: ZoneInfo, where: str) -> FaultSpec:
    _check_keys(data, {"type", "device", "start", "duration", "magnitude", "metric", "variant"},
                where)
    kind = data.get("type")
    if kind not in FAULT_TYPES:
        raise ScenarioError(f"{where}.type: one of {', '.join(FAULT_TYPES)}, got {kind!r}")
    magnitude = data.get("magnitude")
    return FaultSpec(
        type=str(kind), device=_device_id(data.get("device"), f"{where}.device"),
        start=parse_time(data.get("start"), tz, f"{where}.start").timestamp(),
        duration_s=parse_duration(data.get("duration", "10m"), f"{where}.duration"),
        magnitude=None if magnitude is None else _number(magnitude, f"{where}.magnitude"),
        metric=None if data.get("metric") is None else str(data.get("metric")),
        variant=None if data.get("variant") is None else str(data.get("variant")),
    )


def _random_faults(data: Mapping[str, Any], where: str) -> RandomFaults:
    _check_keys(data, {"type", "count", "devices", "duration", "magnitude", "metric"}, where)
    kind = data.get("type")
    if kind not in FAULT_TYPES:
        raise ScenarioError(f"{where}.type: one of {', '.join(FAULT_TYPES)}, got {kind!r}")
    count = data.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ScenarioError(f"{where}.count: a non-negative integer")
    devices = data.get("devices") or []
    if isinstance(devices, str):
        devices = [devices]
    return RandomFaults(
        type=str(kind), count=count, devices=tuple(str(d) for d in _list(devices, where)),
        duration_s=(_range(data["duration"], f"{where}.duration", parse_duration)
                    if "duration" in data else None),
        magnitude=(_range(data["magnitude"], f"{where}.magnitude", _number)
                   if "magnitude" in data else None),
        metric=None if data.get("metric") is None else str(data.get("metric")),
    )


def scenario_from_dict(data: Mapping[str, Any], source: str = "<scenario>") -> Scenario:
    """Build and check a scenario; raises ScenarioError naming the offending key."""
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{source}: a scenario is a mapping")
    _check_keys(data, _TOP_KEYS, source)
    tz_name = str(data.get("timezone", "UTC"))
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScenarioError(f"{source}.timezone: unknown zone {tz_name!r}") from None
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ScenarioError(f"{source}.seed: an integer")
    if "start" not in data:
        raise ScenarioError(f"{source}.start: required (ISO datetime with zone)")
    start = parse_time(data["start"], tz, f"{source}.start")
    duration = parse_duration(data.get("duration", "1d"), f"{source}.duration")
    if duration <= 0:
        raise ScenarioError(f"{source}.duration: must be positive")
    keyed = Keyed(seed)

    rep = _mapping(data.get("reporting"), f"{source}.reporting")
    _check_keys(rep, {"interval", "jitter", "loss", "blips_per_week", "blip_max"},
                f"{source}.reporting")
    reporting = Reporting(
        interval_s=parse_duration(rep.get("interval", 60), f"{source}.reporting.interval"),
        jitter_s=parse_duration(rep.get("jitter", 2), f"{source}.reporting.jitter"),
        loss=_number(rep.get("loss", 0.001), f"{source}.reporting.loss"),
        blips_per_week=_number(rep.get("blips_per_week", 1.0),
                               f"{source}.reporting.blips_per_week"),
        blip_max_s=parse_duration(rep.get("blip_max", 360), f"{source}.reporting.blip_max"),
    )
    if reporting.interval_s < 1 or reporting.jitter_s * 2.2 >= reporting.interval_s:
        raise ScenarioError(f"{source}.reporting: interval >= 1 s and jitter < interval / 2.2")
    if not 0 <= reporting.loss < 0.5:
        raise ScenarioError(f"{source}.reporting.loss: a fraction below 0.5")

    w = _mapping(data.get("weather"), f"{source}.weather")
    _check_keys(w, {"mean_c", "trend_c_per_day", "amplitude_c", "day_sd_c", "pm25_mean",
                    "events"}, f"{source}.weather")
    w_events = []
    for i, ev in enumerate(_list(w.get("events"), f"{source}.weather.events")):
        ev = _mapping(ev, f"{source}.weather.events[{i}]")
        _check_keys(ev, {"date", "delta_c", "from", "to"}, f"{source}.weather.events[{i}]")
        hours = parse_hours(f"{ev.get('from', '12:00')}-{ev.get('to', '18:00')}",
                            f"{source}.weather.events[{i}]")
        assert hours is not None
        w_events.append(WeatherEvent(_date(ev.get("date"), f"{source}.weather.events[{i}].date"),
                                     _number(ev.get("delta_c"),
                                             f"{source}.weather.events[{i}].delta_c"),
                                     hours[0], hours[1]))
    weather = Weather(
        mean_c=_number(w.get("mean_c", 12.0), f"{source}.weather.mean_c"),
        trend_c_per_day=_number(w.get("trend_c_per_day", 0.15),
                                f"{source}.weather.trend_c_per_day"),
        amplitude_c=_number(w.get("amplitude_c", 4.0), f"{source}.weather.amplitude_c"),
        day_sd_c=_number(w.get("day_sd_c", 2.0), f"{source}.weather.day_sd_c"),
        pm25_mean=_number(w.get("pm25_mean", 45.0), f"{source}.weather.pm25_mean"),
        events=tuple(w_events),
    )
    holidays = frozenset(_date(d, f"{source}.holidays[{i}]")
                         for i, d in enumerate(_list(data.get("holidays"), f"{source}.holidays")))

    buildings = tuple(_building(_mapping(b, f"{source}.buildings[{i}]"),
                                f"{source}.buildings[{i}]", keyed)
                      for i, b in enumerate(_list(data.get("buildings"), f"{source}.buildings")))
    if not buildings:
        raise ScenarioError(f"{source}.buildings: at least one building")
    seen: set[str] = set()
    for b in buildings:
        for dev in b.devices():
            if dev in seen:
                raise ScenarioError(f"{source}.buildings: device id {dev!r} used twice")
            seen.add(dev)
    unit_ids = {u.id for b in buildings for u in b.units}

    ev_data = _mapping(data.get("events"), f"{source}.events")
    _check_keys(ev_data, {"early_start_per_week", "off_day_per_month",
                          "setpoint_change_per_week", "list"}, f"{source}.events")
    rates = EventRates(
        early_start_per_week=_number(ev_data.get("early_start_per_week", 1.0),
                                     f"{source}.events.early_start_per_week"),
        off_day_per_month=_number(ev_data.get("off_day_per_month", 1.0),
                                  f"{source}.events.off_day_per_month"),
        setpoint_change_per_week=_number(ev_data.get("setpoint_change_per_week", 1.0),
                                         f"{source}.events.setpoint_change_per_week"),
    )
    legit = []
    for i, ev in enumerate(_list(ev_data.get("list"), f"{source}.events.list")):
        where = f"{source}.events.list[{i}]"
        ev = _mapping(ev, where)
        _check_keys(ev, {"type", "device", "date", "minutes", "delta_c"}, where)
        kind = ev.get("type")
        if kind not in ("early_start", "off_day", "setpoint_change"):
            raise ScenarioError(f"{where}.type: early_start, off_day or setpoint_change")
        dev = _device_id(ev.get("device"), f"{where}.device")
        if dev not in unit_ids:
            raise ScenarioError(f"{where}.device: {dev!r} is not a unit of this scenario")
        value = _number(ev.get("minutes", ev.get("delta_c", 0.0)), where)
        legit.append(LegitEvent(cast(Any, kind), dev, _date(ev.get("date"), f"{where}.date"),
                                value))

    faults = tuple(_fault(_mapping(f, f"{source}.faults[{i}]"), tz, f"{source}.faults[{i}]")
                   for i, f in enumerate(_list(data.get("faults"), f"{source}.faults")))
    for i, f in enumerate(faults):
        if f.device not in seen:
            raise ScenarioError(f"{source}.faults[{i}].device: {f.device!r} is not a device of "
                                f"this scenario")
    random_faults = tuple(
        _random_faults(_mapping(f, f"{source}.random_faults[{i}]"), f"{source}.random_faults[{i}]")
        for i, f in enumerate(_list(data.get("random_faults"), f"{source}.random_faults")))
    scenario = Scenario(
        name=str(data.get("name", Path(source).stem)), seed=seed, start=start,
        duration_s=duration, timezone=tz_name, buildings=buildings, reporting=reporting,
        weather=weather, holidays=holidays, events=tuple(legit), event_rates=rates,
        faults=faults, random_faults=random_faults,
        grid_s=parse_duration(data.get("grid", 10), f"{source}.grid"),
        counter_max=_number(data.get("counter_max", COUNTER_MAX_DEFAULT), f"{source}.counter_max"),
        inrush_probability=_number(data.get("inrush_probability", 0.1),
                                   f"{source}.inrush_probability"),
    )
    if not 1.0 <= scenario.grid_s <= reporting.interval_s or 86400 % scenario.grid_s:
        raise ScenarioError(f"{source}.grid: between 1 s and the interval, dividing a day")
    _check_schedules(scenario, source)
    from simulators.faults.placement import check_faults, place_random_faults

    check_faults(scenario, source)
    placed = place_random_faults(scenario)
    return replace(scenario, faults=scenario.faults + placed, random_faults=())


def _check_schedules(scenario: Scenario, source: str) -> None:
    """A unit scheduled outside its building's open hours would be an unlabelled fault."""
    for b in scenario.buildings:
        cal = scenario.calendar_for(b.id)
        for unit in b.units:
            for wd in range(7):
                for hol in (False, True):
                    hours = unit.schedule.for_day(wd, hol)
                    if hours is None:
                        continue
                    ok = any(a * 60 <= hours[0] and hours[1] <= e * 60 for a, e in cal.weekly[wd])
                    if not ok:
                        raise ScenarioError(
                            f"{source}: unit {unit.id} runs {_hm(hours[0])}-{_hm(hours[1])} "
                            f"on weekday {wd}, outside building {b.id}'s open hours")


def _hm(seconds: float) -> str:
    return f"{int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}"


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML file (random faults placed, so `faults` is final)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not YAML: {exc}") from None
    return scenario_from_dict(data, str(path))


def loads_scenario(text: str, source: str = "<string>") -> Scenario:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: not YAML: {exc}") from None
    return scenario_from_dict(data, source)


def local_day_start(day: date, tz: ZoneInfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def days_of(scenario: Scenario) -> list[date]:
    """Every local date the scenario touches."""
    tz = scenario.tz
    first = datetime.fromtimestamp(scenario.t0, tz).date()
    last = datetime.fromtimestamp(scenario.t1, tz).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def natural_devices(scenario: Scenario, fault_type: str) -> list[str]:
    """Devices a fault type plausibly happens on (the default for random faults)."""
    units = scenario.units()
    if fault_type in ("spike", "after_hours"):
        return [u.id for u in units]
    if fault_type == "slow_drift":
        return [u.id for u in units if u.kind in ("hvac", "fresh_air")]
    if fault_type == "clogging_filter":
        return [u.id for u in units if u.kind in ("fresh_air", "air_purifier")]
    if fault_type == "submeter_mismatch":
        return [m.id for b in scenario.buildings for m in b.submeters] + [
            b.main.id for b in scenario.buildings]
    return list(scenario.device_kinds())

