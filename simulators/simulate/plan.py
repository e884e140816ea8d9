"""A scenario's timeline: when each resident passes a gate or rides an elevator, who eats
when, which faults strike, all from the seed; and the simulated clock that paces it.

Each local day is planned from its own random stream (`seed/date`), so the events of a day
do not depend on where the run started, and the same seed gives the same sequence. The
energy readings come from the rule scenarios' generator (`simulators.faults`) and are
merged in by timestamp; they are not planned here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from rules.scoring import FAULT_TYPES
from simulators.simulate.site import Resident
from simulators.simulate.spec import DOOR_FAULTS, Fault, Spec, When

_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happens at simulated time `ts`.

    kind: access (a credential at a reader), meal (a sale at a terminal), door (a reader
    reports door_forced / door_held_open / tamper), terminal_down / terminal_up,
    modbus_down / modbus_up, weather (outdoor conditions for the Modbus units).
    """

    ts: float
    kind: str
    device: str
    resident: int = -1  # index into the scenario's residents
    credential: str = "card"  # card | qr
    amount_cents: int = 0
    detail: str = ""

    def describe(self) -> tuple[float, str, str, int, str, int, str]:
        return (round(self.ts, 3), self.kind, self.device, self.resident, self.credential,
                self.amount_cents, self.detail)


class SimClock:
    """Simulated time running `speed` times faster than the wall clock from `start`, but
    never ahead of the wall clock: a gateway refuses readings stamped more than five
    minutes ahead, so a run that catches up with the present goes on in real time."""

    def __init__(self, start: float, speed: float, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.start, self.speed, self.wall, self.mono = start, speed, wall, mono
        self._m0 = mono()

    def now(self) -> float:
        return min(self.start + (self.mono() - self._m0) * self.speed, self.wall())

    def caught_up(self) -> bool:
        """Whether simulated time has reached the wall clock (it then runs in real time)."""
        return self.start + (self.mono() - self._m0) * self.speed >= self.wall()

    def delay(self, ts: float) -> float:
        """Wall seconds until simulated time reaches `ts` (0 when it already has)."""
        paced = (ts - self.start) / self.speed - (self.mono() - self._m0)
        return max(paced, ts - self.wall(), 0.0)


def resolve_start(spec: Spec, now: float, duration_s: float | None) -> float:
    """The run's first simulated second. A local time of day means its latest occurrence
    that lets the whole run end by now (a day of a simulation is history at speed)."""
    when = spec.start
    if when.kind == "offset":
        return now + when.value
    if when.kind == "absolute":
        return when.value
    today = datetime.fromtimestamp(now, spec.tz).date()
    candidate = _local(today, when.value, spec)
    for _ in range(400):
        if candidate + (duration_s or 0.0) <= now:
            break
        today -= timedelta(days=1)
        candidate = _local(today, when.value, spec)
    return candidate


def _local(day: date, seconds: float, spec: Spec) -> float:
    midnight = datetime(day.year, day.month, day.day, tzinfo=spec.tz)
    return (midnight + timedelta(seconds=seconds)).timestamp()


def resolve_at(when: When, start: float, spec: Spec) -> float:
    if when.kind == "offset":
        return start + when.value
    if when.kind == "absolute":
        return when.value
    day = datetime.fromtimestamp(start, spec.tz).date()
    at = _local(day, when.value, spec)
    return at if at >= start else _local(day + timedelta(days=1), when.value, spec)


def fault_starts(spec: Spec, start: float) -> dict[int, float]:
    return {i: resolve_at(f.at, start, spec) for i, f in enumerate(spec.faults)}


def _fault_events(spec: Spec, starts: dict[int, float]) -> list[Event]:
    out: list[Event] = []
    for i, f in enumerate(spec.faults):
        at = starts[i]
        out.extend(_one_fault(f, at))
    return out


def _one_fault(f: Fault, at: float) -> list[Event]:
    if f.type in DOOR_FAULTS:
        return [Event(at, "door", f.device, detail=f.type)]
    if f.type == "terminal_offline":
        return [Event(at, "terminal_down", f.device),
                Event(at + f.duration_s, "terminal_up", f.device)]
    if f.type == "modbus_offline":
        return [Event(at, "modbus_down", f.device),
                Event(at + f.duration_s, "modbus_up", f.device)]
    assert f.type in FAULT_TYPES  # energy faults live in the readings
    return []


class Planner:
    """Events of the scenario from `start` on, in time order, day by day."""

    def __init__(self, spec: Spec, people: list[Resident], phones: bool) -> None:
        self.spec, self.people, self.phones = spec, people, phones
        self.gates = [g for g, _ in spec.gates]
        self.elevators = {b.id: b.elevator_ids() for b in spec.buildings}

    def events(self, start: float, end: float | None) -> Iterator[Event]:
        faults = sorted(_fault_events(self.spec, fault_starts(self.spec, start)),
                        key=lambda e: e.ts)
        day = datetime.fromtimestamp(start, self.spec.tz).date()
        while end is None or _local(day, 0.0, self.spec) < end:
            todays = self._day(day)
            todays += self._weather(day)
            midnight, tomorrow = _local(day, 0.0, self.spec), _local(
                day + timedelta(days=1), 0.0, self.spec)
            todays += [e for e in faults if midnight <= e.ts < tomorrow]
            todays.sort(key=lambda e: (e.ts, e.kind, e.device, e.resident))
            for event in todays:
                if event.ts >= start and (end is None or event.ts < end):
                    yield event
            day += timedelta(days=1)

    def _credential(self, rng: random.Random) -> str:
        return "qr" if self.phones and rng.random() < self.spec.rhythm.phone_share else "card"

    def _trip(self, rng: random.Random, out: list[Event], who: int, t: float,
              outbound: bool) -> None:
        """Leaving: elevator down, then a gate; coming home: a gate, then the elevator."""
        resident = self.people[who]
        gate = rng.choice(self.gates) if self.gates else None
        cars = self.elevators.get(resident.building) or []
        car = rng.choice(cars) if cars else None
        walk = rng.uniform(40.0, 150.0)
        first, second = (car, gate) if outbound else (gate, car)
        for device, at in ((first, t), (second, t + walk)):
            if device is not None:
                out.append(Event(at, "access", device, who, self._credential(rng)))

    def _day(self, day: date) -> list[Event]:
        spec = self.spec
        rng = random.Random(f"{spec.seed}/{day.isoformat()}")
        rhythm, weekend = spec.rhythm, day.weekday() >= 5
        commute = 0.75 * (rhythm.weekend_factor if weekend else 1.0)
        out: list[Event] = []

        def at(window: tuple[float, float]) -> float:
            return _local(day, rng.uniform(*window), spec)

        for who in range(len(self.people)):
            if rng.random() < commute:
                self._trip(rng, out, who, at(rhythm.morning_rush), outbound=True)
                self._trip(rng, out, who, at(rhythm.evening_rush), outbound=False)
            outings = _poisson(rng, rhythm.outings_per_day)
            for _ in range(outings):
                leave = at((9 * 3600.0, 20 * 3600.0))
                self._trip(rng, out, who, leave, outbound=True)
                self._trip(rng, out, who, leave + rng.uniform(1200.0, 7200.0), outbound=False)
            for meal in spec.canteen.meals:
                if spec.canteen.terminals and rng.random() < spec.canteen.diners:
                    out.append(Event(at(meal), "meal", rng.choice(spec.canteen.terminals), who,
                                     self._credential(rng), rng.choice(spec.canteen.menu_cents)))
        return out

    def _weather(self, day: date) -> list[Event]:
        """Outdoor conditions for the Modbus units every 15 minutes (their own physics)."""
        if not self.spec.modbus:
            return []
        return [Event(_local(day, q * 900.0, self.spec), "weather", "-") for q in range(96)]


def _poisson(rng: random.Random, mean: float) -> int:
    count, limit, product = 0, pow(2.718281828459045, -mean), rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def outdoor(spec: Spec, ts: float) -> tuple[float, float]:
    """(outdoor °C, occupancy 0..1) at `ts`: the scenario's weather means and the rule
    scenarios' lobby occupancy profile."""
    import math

    import numpy as np

    from simulators.faults import models

    weather = spec.energy.get("weather") or {}
    mean = float(weather.get("mean_c", 12.0))
    amplitude = float(weather.get("amplitude_c", 4.0))
    local = datetime.fromtimestamp(ts, spec.tz)
    tod = local.hour * 3600.0 + local.minute * 60.0 + local.second
    temp = mean + amplitude * math.sin((tod / _DAY - 0.375) * 2 * math.pi)
    occupancy = models.by_daytype(models.OCCUPANCY["lobby"], np.array([tod]),
                                  np.array([local.weekday() >= 5]))
    return temp, float(occupancy[0])
