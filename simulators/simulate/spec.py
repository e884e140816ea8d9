"""The community scenario file of `scgw simulate` (docs/simulate.md) and its checks.

Every problem is reported with the file and line it is on, all of them at once, as
`scgw rules check` does: a scenario is written by hand and fixed in one go.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from device_drivers.vocabulary import valid_device_id
from rules.scoring import FAULT_TYPES
from simulators.faults.scenario import ScenarioError, parse_duration, parse_hours
from simulators.simulate.marks import KeyPath, Reader, line_index

DOOR_FAULTS: Final = ("door_forced", "door_held_open", "tamper")
DEVICE_FAULTS: Final = ("terminal_offline", "modbus_offline")
ALL_FAULTS: Final = (*FAULT_TYPES, *DOOR_FAULTS, *DEVICE_FAULTS)
UNIT_KINDS: Final = ("hvac", "fresh_air", "air_purifier", "meter")
_REL_RE: Final = re.compile(r"^\s*([+-])\s*(\S.*)$")
_HM_RE: Final = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


class SpecError(ValueError):
    """A scenario file is wrong; `problems` are `FILE:LINE: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class When:
    """A moment: `offset` seconds after the start, `local` seconds after local midnight
    (the first such moment at or after the start), or `absolute` Unix seconds."""

    kind: str
    value: float


@dataclass(frozen=True, slots=True)
class Building:
    id: str
    name: str
    floors: int  # residential floors 2..floors above the lobby (floor 1)
    basements: int
    public_floors: tuple[int, ...]
    units_per_floor: int
    residents_per_unit: tuple[int, int]
    elevators: int
    energy: Mapping[str, Any]  # a rule-scenario building (template standard), or empty

    def floor_numbers(self) -> list[int]:
        return [*range(-self.basements, 0), *range(1, self.floors + 1)]

    def elevator_ids(self) -> list[str]:
        return [f"elev-{self.id}-{i + 1}" for i in range(self.elevators)]


@dataclass(frozen=True, slots=True)
class Canteen:
    terminals: tuple[str, ...] = ("canteen-1",)
    menu_cents: tuple[int, ...] = (1200, 1500, 1800, 2200)
    meals: tuple[tuple[float, float], ...] = ((11.5 * 3600, 13 * 3600), (17.5 * 3600, 19 * 3600))
    diners: float = 0.4  # share of residents eating at each meal
    opening_balance_cents: int = 20_000
    topup_below_cents: int = 5_000
    topup_cents: int = 20_000


@dataclass(frozen=True, slots=True)
class Rhythm:
    morning_rush: tuple[float, float] = (7 * 3600, 9 * 3600)
    evening_rush: tuple[float, float] = (17 * 3600, 19.5 * 3600)
    outings_per_day: float = 0.6  # extra round trips spread over the day
    weekend_factor: float = 0.6  # fewer commuters on Saturday and Sunday
    phone_share: float = 0.6  # passages and payments by phone, when phones are known


@dataclass(frozen=True, slots=True)
class ModbusUnit:
    id: str
    kind: str
    profile: str
    building: str | None
    port: int  # 0: any free port


@dataclass(frozen=True, slots=True)
class Fault:
    type: str
    device: str
    at: When
    duration_s: float
    line: int
    magnitude: float | None = None
    metric: str | None = None
    variant: str | None = None


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    seed: int
    timezone: str
    start: When
    duration_s: float | None  # None: until stopped
    buildings: tuple[Building, ...]
    gates: tuple[tuple[str, str], ...]  # (id, name)
    canteen: Canteen
    rhythm: Rhythm
    modbus: tuple[ModbusUnit, ...]
    faults: tuple[Fault, ...]
    energy: Mapping[str, Any] = field(default_factory=dict)  # reporting/weather/holidays
    root: str = "scgw"
    source: str = "<scenario>"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def readers(self) -> list[tuple[str, str, str | None]]:
        """(device id, kind, building) of every gate and elevator reader."""
        return [(g, "gate", None) for g, _ in self.gates] + [
            (e, "elevator", b.id) for b in self.buildings for e in b.elevator_ids()]


def _when(value: object, where: str) -> When:
    """`+15m` (after the start), `12:10` (local time), or an ISO datetime with zone."""
    if isinstance(value, str):
        rel = _REL_RE.match(value)
        if rel:
            seconds = parse_duration(rel.group(2), where)
            return When("offset", seconds if rel.group(1) == "+" else -seconds)
        hm = _HM_RE.match(value)
        if hm and int(hm.group(1)) < 24 and int(hm.group(2)) < 60:
            return When("local", int(hm.group(1)) * 3600.0 + int(hm.group(2)) * 60.0)
        try:
            from datetime import datetime

            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return When("absolute", parsed.timestamp())
    raise ScenarioError(f"{where}: expected +15m, -1h, a local time like 07:30 or an ISO "
                        f"datetime with zone, found {value!r}")


def _span(value: object, where: str) -> tuple[float, float]:
    hours = parse_hours(value, where)
    if hours is None:
        raise ScenarioError(f"{where}: expected hours like \"07:00-09:00\"")
    return hours


_TOP: Final = {"name", "seed", "timezone", "start", "duration", "root", "buildings", "gates",
               "canteen", "rhythm", "energy", "modbus", "faults", "description"}
_BUILDING: Final = {"id", "name", "floors", "basements", "public_floors", "units_per_floor",
                    "residents_per_unit", "elevators", "energy"}


def _building(r: Reader, raw: object, path: KeyPath) -> Building | None:
    node = r.keys(raw, path, _BUILDING)
    bid = node.get("id")
    if not valid_device_id(bid):
        r.fail((*path, "id"), f"a building id like b1 is required, found {bid!r}")
        return None
    floors = int(r.number(node, "floors", path, 6, 1, 200, integer=True))
    basements = int(r.number(node, "basements", path, 0, 0, 10, integer=True))
    public = r.items(node.get("public_floors", [1]), (*path, "public_floors"))
    numbers = [*range(-basements, 0), *range(1, floors + 1)]
    for i, floor in enumerate(public):
        if floor not in numbers:
            r.fail((*path, "public_floors", i), f"floor {floor!r} is not a floor of {bid}")
    per_unit = node.get("residents_per_unit", [1, 3])
    lo, hi = (per_unit, per_unit) if isinstance(per_unit, int) else (
        tuple(per_unit) if isinstance(per_unit, list) and len(per_unit) == 2 else (0, -1))
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= 12):
        r.fail((*path, "residents_per_unit"), f"an integer or [low, high] within 0..12, "
               f"found {per_unit!r}")
        lo, hi = 1, 1
    energy = r.keys(node.get("energy"), (*path, "energy"),
                    {"households", "residential_submeters", "hvac", "fresh_air",
                     "air_purifiers", "calendar", "units", "submeters", "unmetered_w"})
    return Building(
        id=str(bid), name=str(node.get("name", f"Building {bid}")), floors=floors,
        basements=basements, public_floors=tuple(int(f) for f in public if f in numbers),
        units_per_floor=int(r.number(node, "units_per_floor", path, 2, 1, 20, integer=True)),
        residents_per_unit=(lo, hi),
        elevators=int(r.number(node, "elevators", path, 1, 0, 12, integer=True)),
        energy=dict(energy))


def _canteen(r: Reader, raw: object) -> Canteen:
    path: KeyPath = ("canteen",)
    node = r.keys(raw, path, {"terminals", "menu_cents", "meals", "diners",
                              "opening_balance_cents", "topup_below_cents", "topup_cents"})
    d = Canteen()
    count = int(r.number(node, "terminals", path, len(d.terminals), 0, 50, integer=True))
    menu = r.items(node.get("menu_cents", list(d.menu_cents)), (*path, "menu_cents"))
    if not menu or not all(isinstance(m, int) and not isinstance(m, bool) and 0 < m <= 100_000
                           for m in menu):
        r.fail((*path, "menu_cents"), "a list of prices in cents (1..100000)")
        menu = list(d.menu_cents)
    meals = tuple(r.parsed(_span, m, (*path, "meals", i), (0.0, 1.0)) for i, m in
                  enumerate(r.items(node.get("meals", ["11:30-13:00", "17:30-19:00"]),
                                    (*path, "meals"))))
    return Canteen(
        terminals=tuple(f"canteen-{i + 1}" for i in range(count)), menu_cents=tuple(menu),
        meals=meals, diners=r.number(node, "diners", path, d.diners, 0, 1),
        opening_balance_cents=int(r.number(node, "opening_balance_cents", path,
                                           d.opening_balance_cents, 0, 10**8, integer=True)),
        topup_below_cents=int(r.number(node, "topup_below_cents", path, d.topup_below_cents,
                                       0, 10**8, integer=True)),
        topup_cents=int(r.number(node, "topup_cents", path, d.topup_cents, 1, 10**7,
                                 integer=True)))


def _rhythm(r: Reader, raw: object) -> Rhythm:
    path: KeyPath = ("rhythm",)
    node = r.keys(raw, path, {"morning_rush", "evening_rush", "outings_per_day",
                              "weekend_factor", "phone_share"})
    d = Rhythm()
    return Rhythm(
        morning_rush=r.parsed(_span, node.get("morning_rush", "07:00-09:00"),
                              (*path, "morning_rush"), d.morning_rush),
        evening_rush=r.parsed(_span, node.get("evening_rush", "17:00-19:30"),
                              (*path, "evening_rush"), d.evening_rush),
        outings_per_day=r.number(node, "outings_per_day", path, d.outings_per_day, 0, 20),
        weekend_factor=r.number(node, "weekend_factor", path, d.weekend_factor, 0, 2),
        phone_share=r.number(node, "phone_share", path, d.phone_share, 0, 1))


def _modbus(r: Reader, raw: object, index: int) -> ModbusUnit | None:
    path: KeyPath = ("modbus", index)
    node = r.keys(raw, path, {"id", "kind", "profile", "building", "port"})
    uid, kind, profile = node.get("id"), node.get("kind"), node.get("profile")
    if not valid_device_id(uid):
        r.fail((*path, "id"), f"a device id is required, found {uid!r}")
        return None
    if kind not in UNIT_KINDS:
        r.fail((*path, "kind"), f"one of {', '.join(UNIT_KINDS)}, found {kind!r}")
        return None
    if not isinstance(profile, str):
        r.fail((*path, "profile"), "a bundled profile id (docs/modbus.md) or a YAML path")
        return None
    port = int(r.number(node, "port", path, 0, 0, 65535, integer=True))
    building = node.get("building")
    return ModbusUnit(str(uid), str(kind), profile, None if building is None else str(building),
                      port)


def _fault(r: Reader, raw: object, index: int) -> Fault | None:
    path: KeyPath = ("faults", index)
    node = r.keys(raw, path, {"type", "device", "at", "duration", "magnitude", "metric",
                              "variant"})
    kind, device = node.get("type"), node.get("device")
    if kind not in ALL_FAULTS:
        r.fail((*path, "type"), f"one of {', '.join(ALL_FAULTS)}, found {kind!r}")
        return None
    if not valid_device_id(device):
        r.fail((*path, "device"), f"a device id is required, found {device!r}")
        return None
    if "at" not in node:
        r.fail(path, "`at` is required (+15m, 12:10 or an ISO datetime)")
        return None
    at = r.parsed(_when, node["at"], (*path, "at"), None)
    duration = r.parsed(parse_duration, node.get("duration", "10m"), (*path, "duration"), 600.0)
    magnitude = node.get("magnitude")
    if magnitude is not None and (isinstance(magnitude, bool)
                                  or not isinstance(magnitude, int | float)):
        r.fail((*path, "magnitude"), f"a number, found {magnitude!r}")
        magnitude = None
    if at is None:
        return None
    return Fault(str(kind), str(device), at, float(duration), r.line(path),
                 None if magnitude is None else float(magnitude),
                 None if node.get("metric") is None else str(node["metric"]),
                 None if node.get("variant") is None else str(node["variant"]))


def _cross_check(r: Reader, spec: Spec) -> None:
    """Ids unique, and every fault aimed at a device of the kind it happens to."""
    from simulators.simulate.site import energy_devices

    ids: dict[str, str] = {}
    for gid, _ in spec.gates:
        ids[gid] = "gate"
    for b in spec.buildings:
        for e in b.elevator_ids():
            ids[e] = "elevator"
    for t in spec.canteen.terminals:
        ids[t] = "canteen"
    try:
        energy = energy_devices(spec)
    except ScenarioError as exc:
        r.fail(("buildings",), f"energy: {exc}")
        energy = {}
    for i, unit in enumerate(spec.modbus):
        if unit.id in ids or unit.id in energy:
            r.fail(("modbus", i, "id"), f"{unit.id} is already a device of the scenario")
        if unit.building is not None and unit.building not in {b.id for b in spec.buildings}:
            r.fail(("modbus", i, "building"), f"{unit.building} is not a building")
    modbus = {u.id for u in spec.modbus}
    for i, f in enumerate(spec.faults):
        where = ("faults", i, "device")
        if f.type in DOOR_FAULTS and ids.get(f.device) not in ("gate", "elevator"):
            r.fail(where, f"{f.type} happens at a gate or elevator reader; {f.device} is not one")
        elif f.type == "terminal_offline" and ids.get(f.device) != "canteen":
            r.fail(where, f"{f.device} is not a canteen terminal of the scenario")
        elif f.type == "modbus_offline" and f.device not in modbus:
            r.fail(where, f"{f.device} is not a Modbus unit of the scenario (modbus:)")
        elif f.type in FAULT_TYPES and f.device not in energy:
            r.fail(where, f"{f.device} is not an energy device of the scenario "
                   f"(they are: {', '.join(sorted(energy)) or 'none'})")


def loads_spec(text: str, source: str = "<scenario>") -> Spec:
    """Parse and check a scenario; raises SpecError listing every problem by line."""
    try:
        data = yaml.safe_load(text)
        lines = line_index(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise SpecError([f"{source}:{line}: not valid YAML: "
                         f"{getattr(exc, 'problem', None) or exc}"]) from None
    r = Reader(source, data if isinstance(data, Mapping) else {}, lines)
    if not isinstance(data, Mapping):
        r.fail((), "expected a mapping with buildings:, gates:, canteen: ...")
        raise SpecError([p for _, p in r.problems])
    r.keys(data, (), _TOP)
    tz_name = str(data.get("timezone", "UTC"))
    try:
        ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        r.fail(("timezone",), f"unknown time zone {tz_name!r}")
        tz_name = "UTC"
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        r.fail(("seed",), f"an integer, found {seed!r}")
        seed = 0
    duration = data.get("duration", "1d")
    buildings = [b for i, raw in enumerate(r.items(data.get("buildings"), ("buildings",)))
                 if (b := _building(r, raw, ("buildings", i))) is not None]
    if not buildings:
        r.fail(("buildings",), "at least one building")
    gates: list[tuple[str, str]] = []
    for i, raw in enumerate(r.items(data.get("gates", [{"id": "gate-main"}]), ("gates",))):
        node = r.keys(raw, ("gates", i), {"id", "name"})
        if valid_device_id(node.get("id")):
            gates.append((str(node["id"]), str(node.get("name", node["id"]))))
        else:
            r.fail(("gates", i, "id"), f"a device id is required, found {node.get('id')!r}")
    energy = r.keys(data.get("energy"), ("energy",), {"reporting", "weather", "holidays"})
    spec = Spec(
        name=str(data.get("name", Path(source).stem)), seed=seed, timezone=tz_name,
        start=r.parsed(_when, data.get("start", "-1h"), ("start",), When("offset", -3600.0)),
        duration_s=None if duration is None else r.parsed(
            parse_duration, duration, ("duration",), 86400.0),
        buildings=tuple(buildings), gates=tuple(gates),
        canteen=_canteen(r, data.get("canteen")), rhythm=_rhythm(r, data.get("rhythm")),
        modbus=tuple(u for i, raw in enumerate(r.items(data.get("modbus"), ("modbus",)))
                     if (u := _modbus(r, raw, i)) is not None),
        faults=tuple(f for i, raw in enumerate(r.items(data.get("faults"), ("faults",)))
                     if (f := _fault(r, raw, i)) is not None),
        energy=dict(energy), root=str(data.get("root", "scgw")), source=source)
    if not r.problems:
        _cross_check(r, spec)
    if r.problems:
        raise SpecError([p for _, p in sorted(r.problems, key=lambda p: p[0])])
    return spec


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}:1: cannot read the scenario: {exc}"]) from None
    return loads_spec(text, str(path))
