"""Checking scheduled faults, placing random ones, and the labels they produce.

Random faults are placed where such faults happen in practice: a spike or a stuck power
reading while the unit runs, a unit left on at closing time or switched on in the night, a
drift or a clogging filter once the site has some history, a sub-meter mismatch on a
sub-meter that carries a material share of the building (a 30 % under-read of a feeder
that carries 5 % of the load is within the normal unmetered load, and would not be a fault
anyone could see). Faults on the same device never overlap.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from datetime import date, datetime, timedelta
from typing import Final

import numpy as np

from rules.scoring import Fault
from simulators.faults.noise import Keyed
from simulators.faults.scenario import (
    METRICS_BY_KIND,
    FaultSpec,
    RandomFaults,
    Scenario,
    ScenarioError,
    UnitSpec,
    days_of,
    local_day_start,
    natural_devices,
)

PHYSICAL_UNIT_FAULTS: Final = frozenset({"spike", "after_hours", "slow_drift", "clogging_filter"})
"""Faults that change what a unit really draws: its upstream meters see them too."""
INSTANT_FAULTS: Final = frozenset({"counter_reset", "counter_jump"})
_HOUSEHOLD_W: Final = 430.0
_STUCK_METRICS: Final[dict[str, tuple[tuple[str, float], ...]]] = {
    # a meter's communication card serving a stale register snapshot freezes everything
    "meter": (("all", 0.6), ("power_w", 0.4)),
    "hvac": (("power_w", 0.65), ("temperature_c", 0.35)),
    "fresh_air": (("power_w", 0.5), ("filter_dp_pa", 0.25), ("co2_ppm", 0.25)),
    "air_purifier": (("power_w", 0.5), ("filter_dp_pa", 0.25), ("pm25_ugm3", 0.25)),
}


def nominal_power_w(scenario: Scenario, device: str) -> float:
    """A device's typical mean draw (for sizing faults, not for generating data)."""
    for b in scenario.buildings:
        unit_w = {u.id: u.rated_w * (0.45 if u.kind == "hvac" else 0.5) for u in b.units}
        if device in unit_w:
            return unit_w[device]
        sub_w: dict[str, float] = {}
        for m in b.submeters:
            total = sum(u_w for uid, u_w in unit_w.items()
                        if next(u for u in b.units if u.id == uid).submeter == m.id)
            for load in m.loads:
                total += {"residential": _HOUSEHOLD_W * load.size, "lifts": 1500.0 * load.size,
                          "lighting": 500.0 * load.size, "pumps": 400.0 * load.size,
                          "constant": 1000.0 * load.size}[load.type]
            sub_w[m.id] = total
        if device in sub_w:
            return sub_w[device]
        if device == b.main.id:
            return sum(sub_w.values()) + b.unmetered_w
    raise KeyError(device)


def _unit(scenario: Scenario, device: str) -> UnitSpec | None:
    return next((u for u in scenario.units() if u.id == device), None)


def _building_of(scenario: Scenario, device: str) -> str:
    return scenario.device_building()[device]


def check_faults(scenario: Scenario, source: str) -> None:
    """Each explicit fault must make sense for its device."""
    kinds = scenario.device_kinds()
    mains = {b.main.id for b in scenario.buildings}
    for i, f in enumerate(scenario.faults):
        where = f"{source}.faults[{i}]"
        kind = kinds[f.device]
        if not scenario.t0 <= f.start < scenario.t1:
            raise ScenarioError(f"{where}.start: outside the scenario")
        if f.type in ("after_hours", "clogging_filter") and kind == "meter":
            raise ScenarioError(f"{where}: {f.type} needs a unit, {f.device} is a meter")
        if f.type == "clogging_filter" and kind not in ("fresh_air", "air_purifier"):
            raise ScenarioError(f"{where}: clogging_filter needs a unit with a filter")
        if f.type == "submeter_mismatch" and kind != "meter":
            raise ScenarioError(f"{where}: submeter_mismatch needs a sub-meter (under_read) or "
                                f"a main meter (unmetered_load)")
        if f.type == "submeter_mismatch":
            variant = f.variant or ("unmetered_load" if f.device in mains else "under_read")
            if (variant == "unmetered_load") != (f.device in mains):
                raise ScenarioError(f"{where}: under_read is on a sub-meter, unmetered_load on "
                                    f"a main meter")
        if f.type == "stuck_sensor" and (f.metric or "power_w") not in (
                "all", *METRICS_BY_KIND[kind]):
            raise ScenarioError(f"{where}.metric: {f.device} ({kind}) reports "
                                f"{', '.join(METRICS_BY_KIND[kind])} (or `all`)")
        if f.type == "spike" and f.magnitude is not None and f.magnitude <= 1:
            raise ScenarioError(f"{where}.magnitude: a spike is a multiple (> 1) of rated power")
        if f.type in ("dropout", "stuck_sensor", "spike", "slow_drift", "clogging_filter",
                      "submeter_mismatch", "after_hours") and f.duration_s <= 0:
            raise ScenarioError(f"{where}.duration: must be positive")


def fault_label(scenario: Scenario, f: FaultSpec) -> Fault:
    """The label a fault produces: the device an alert should name, and its window."""
    end = min(scenario.t1, f.start + f.duration_s)
    unit = _unit(scenario, f.device)
    b = next(b for b in scenario.buildings if f.device in b.devices())
    related: tuple[str, ...] = ()
    if f.type == "submeter_mismatch":
        related = () if f.device == b.main.id else (f.device,)
        return Fault(f.type, b.main.id, f.start, end, related)
    if unit is not None and f.type in PHYSICAL_UNIT_FAULTS:
        related = (unit.submeter, b.main.id)
    elif unit is None and f.device != b.main.id and (
            f.type in ("slow_drift", "spike")
            or (f.type == "stuck_sensor" and (f.metric or "power_w") in ("power_w", "all"))):
        # a sub-meter's wrong power reading unbalances its building: the main meter's
        # balance check sees it
        related = (b.main.id,)
    return Fault(f.type, f.device, f.start, end, related)


def labels(scenario: Scenario) -> list[Fault]:
    """Every injected fault's label, by start time."""
    return sorted((fault_label(scenario, f) for f in scenario.faults),
                  key=lambda x: (x.start, x.device_id, x.type))


# ---- random placement ------------------------------------------------------------------------


class _Placer:
    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.keyed = Keyed(scenario.seed)
        self.days = days_of(scenario)
        self.tz = scenario.tz
        self.taken: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for f in scenario.faults:
            self._take(f)

    def _primary(self, f: FaultSpec) -> set[str]:
        label = fault_label(self.s, f)
        devices = {f.device, label.device_id}
        if f.type == "submeter_mismatch":
            devices.update(label.related)
        return devices

    def _take(self, f: FaultSpec) -> None:
        for dev in self._primary(f):
            self.taken[dev].append((f.start, f.start + max(f.duration_s, 600.0)))

    def _free(self, f: FaultSpec, margin: float = 7200.0) -> bool:
        a, b = f.start - margin, f.start + max(f.duration_s, 600.0) + margin
        return all(not (a < e and s < b) for dev in self._primary(f)
                   for s, e in self.taken.get(dev, ()))

    def place(self, spec: RandomFaults, index: int) -> list[FaultSpec]:
        rng = self.keyed.rng("random-faults", index)
        candidates = natural_devices(self.s, spec.type)
        if spec.devices:
            candidates = [d for d in candidates
                          if any(fnmatch.fnmatchcase(d, g) for g in spec.devices)]
        if spec.type == "submeter_mismatch":
            candidates = [d for d in candidates if self._material(d)]
        if not candidates:
            if spec.count:
                raise ScenarioError(f"random_faults[{index}]: no device suits {spec.type}"
                                    + (f" among {', '.join(spec.devices)}" if spec.devices
                                       else ""))
            return []
        order = list(rng.permutation(len(candidates)))
        placed: list[FaultSpec] = []
        for n in range(spec.count):
            for attempt in range(400):
                dev = candidates[order[(n + attempt) % len(order)]]
                fault = self._draw(spec, dev, rng)
                if fault is None or fault.start + fault.duration_s > self.s.t1:
                    continue  # a fault is labelled whole: it ends inside the scenario
                if self._free(fault):
                    self._take(fault)
                    placed.append(fault)
                    break
            else:
                raise ScenarioError(f"random_faults[{index}]: could not place {spec.count} "
                                    f"{spec.type} faults without overlaps; lower the count")
        return placed

    def _material(self, device: str) -> bool:
        """A sub-meter carrying >= 25 % of its building (or any main meter)."""
        b = next(b for b in self.s.buildings if device in b.devices())
        if device == b.main.id:
            return True
        return nominal_power_w(self.s, device) >= 0.25 * nominal_power_w(self.s, b.main.id)

    def _day(self, rng: np.random.Generator, first: int = 0,
             last_margin_days: float = 0.0) -> date | None:
        usable = [d for d in self.days
                  if local_day_start(d, self.tz) >= self.s.t0 - 1
                  and local_day_start(d, self.tz) + 86400 * (1 + last_margin_days)
                  <= self.s.t1 + 1]
        usable = usable[first:] if len(usable) > first else usable[-1:]
        if not usable:
            return None
        return usable[int(rng.integers(len(usable)))]

    def _at(self, day: date, seconds: float) -> float:
        return local_day_start(day, self.tz) + seconds

    def _span(self, spec: RandomFaults, lo: float, hi: float, rng: np.random.Generator,
              log: bool = False) -> float:
        lo, hi = spec.duration_s or (lo, hi)
        if log and lo > 0:
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return float(rng.uniform(lo, hi))

    def _mag(self, spec: RandomFaults, lo: float, hi: float, rng: np.random.Generator) -> float:
        lo, hi = spec.magnitude or (lo, hi)
        return float(rng.uniform(lo, hi))

    def _draw(self, spec: RandomFaults, dev: str, rng: np.random.Generator) -> FaultSpec | None:
        s = self.s
        unit = _unit(s, dev)
        kind = s.device_kinds()[dev]
        t = spec.type
        if t in ("spike", "stuck_sensor") and unit is not None:
            metric = spec.metric or (self._stuck_metric(kind, rng) if t == "stuck_sensor"
                                     else None)
            day = self._day(rng)
            if day is None:
                return None
            hours = unit.schedule.for_day(day.weekday(), day in s.holidays)
            if hours is None or hours[1] - hours[0] < 4 * 3600:
                return None
            if t == "spike":
                dur = self._span(spec, 120.0, 600.0, rng)
                start = self._at(day, rng.uniform(hours[0] + 3600, hours[1] - 3600))
                return FaultSpec(t, dev, start, dur, round(self._mag(spec, 3.0, 6.0, rng), 2))
            dur = self._span(spec, 3600.0, 6 * 3600.0, rng, log=True)
            start = self._at(day, rng.uniform(hours[0] + 1800, hours[1] - 3 * 3600))
            return FaultSpec(t, dev, start, dur, metric=metric)
        if t == "spike":  # a meter: a measurement glitch
            day = self._day(rng)
            if day is None:
                return None
            dur = self._span(spec, 120.0, 600.0, rng)
            return FaultSpec(t, dev, self._at(day, rng.uniform(0, 86400 - dur)), dur,
                             round(self._mag(spec, 3.0, 6.0, rng), 2))
        if t == "stuck_sensor":
            day = self._day(rng)
            if day is None:
                return None
            dur = self._span(spec, 3600.0, 8 * 3600.0, rng, log=True)
            metric = spec.metric or self._stuck_metric(kind, rng)
            return FaultSpec(t, dev, self._at(day, rng.uniform(0, 86400)), dur, metric=metric)
        if t == "after_hours":
            if unit is None:
                return None
            day = self._day(rng, last_margin_days=0.3)
            if day is None:
                return None
            cal = s.calendar_for(unit.building)
            close = max(e for _, e in cal.weekly[day.weekday()]) * 60.0
            nxt = day + timedelta(days=1)
            reopen = 86400.0 + min(a for a, _ in cal.weekly[nxt.weekday()]) * 60.0
            if rng.random() < 0.7:
                hours = unit.schedule.for_day(day.weekday(), day in s.holidays)
                if hours is None:
                    return None
                start_s = close
                variant = "left_on"
            else:
                start_s = rng.uniform(close + 1800, reopen - 2.5 * 3600)
                variant = "switched_on"
            dur = min(self._span(spec, 3600.0, reopen - start_s, rng), reopen - start_s)
            return FaultSpec(t, dev, self._at(day, start_s), dur, variant=variant)
        if t in INSTANT_FAULTS:
            day = self._day(rng)
            if day is None:
                return None
            start = self._at(day, rng.uniform(0, 86400))
            if t == "counter_reset":
                return FaultSpec(t, dev, start, 600.0, magnitude=float(round(rng.uniform(0, 50))))
            step_wh = nominal_power_w(s, dev) * s.reporting.interval_s / 3600.0
            lo, hi = spec.magnitude or (20 * step_wh + 500.0, 2000 * step_wh + 5000.0)
            jump = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            return FaultSpec(t, dev, start, 600.0, magnitude=float(round(jump, -1)))
        if t == "dropout":
            day = self._day(rng)
            if day is None:
                return None
            dur = self._span(spec, 1200.0, 6 * 3600.0, rng, log=True)
            return FaultSpec(t, dev, self._at(day, rng.uniform(0, 86400)), dur)
        if t == "slow_drift":
            day = self._day(rng, first=8, last_margin_days=2.0)
            if day is None:
                return None
            dur = self._span(spec, 5 * 86400.0, 12 * 86400.0, rng)
            return FaultSpec(t, dev, self._at(day, rng.uniform(0, 86400)), dur,
                             round(self._mag(spec, 0.01, 0.03, rng), 4))
        if t == "clogging_filter":
            # Dust (construction, catkins, a smog spell) loads the filter 6-15 % a day; it
            # is a fault until someone replaces it, once its pressure drop per unit of
            # airflow has grown by 60-120 % (the usual replacement point is about 2x).
            day = self._day(rng, first=2, last_margin_days=2.0)
            if day is None:
                return None
            rate = self._mag(spec, 0.06, 0.15, rng)
            if spec.duration_s is not None:
                dur = self._span(spec, 0.0, 0.0, rng)
            else:
                dur = float(rng.uniform(0.6, 1.2)) / rate * 86400.0
            return FaultSpec(t, dev, self._at(day, rng.uniform(0, 86400)), dur, round(rate, 4))
        if t == "submeter_mismatch":
            day = self._day(rng)
            if day is None:
                return None
            b = next(b for b in s.buildings if dev in b.devices())
            dur = self._span(spec, 2 * 3600.0, 3 * 86400.0, rng, log=True)
            start = self._at(day, rng.uniform(0, 86400))
            if dev == b.main.id:
                watts = self._mag(spec, 0.12, 0.30, rng) * nominal_power_w(s, dev)
                return FaultSpec(t, dev, start, dur, round(watts, -1), variant="unmetered_load")
            return FaultSpec(t, dev, start, dur, round(self._mag(spec, 0.2, 0.4, rng), 3),
                             variant="under_read")
        return None

    def _stuck_metric(self, kind: str, rng: np.random.Generator) -> str:
        choices = _STUCK_METRICS[kind]
        x = float(rng.random())
        for name, weight in choices:
            x -= weight
            if x <= 0:
                return name
        return choices[0][0]


def place_random_faults(scenario: Scenario) -> tuple[FaultSpec, ...]:
    placer = _Placer(scenario)
    placed: list[FaultSpec] = []
    for i, spec in enumerate(scenario.random_faults):
        placed.extend(placer.place(spec, i))
    return tuple(sorted(placed, key=lambda f: (f.start, f.device)))


def local_date(scenario: Scenario, ts: float) -> date:
    return datetime.fromtimestamp(ts, scenario.tz).date()
