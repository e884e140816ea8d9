"""What a gateway must know before a scenario can be played against it.

Device ids and residents are derived from the scenario and its seed alone, so the site file
(`site_dict`), the resident import (`residents_csv`, for `scgw import residents`) and the
simulator agree without talking to each other. The energy devices are the rule scenarios'
(`simulators.faults`): the same `standard` building template, the same ids.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from rules.scoring import FAULT_TYPES
from simulators.faults import Scenario
from simulators.faults.scenario import FaultSpec, scenario_from_dict
from simulators.simulate.spec import Spec

CARD_KINDS: Final = ("gate", "elevator", "canteen")
_SURNAMES: Final = ("Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou",
                    "Xu", "Sun", "Ma", "Zhu", "Hu", "Guo", "He", "Lin", "Gao", "Luo")
_GIVEN: Final = ("Wei", "Fang", "Min", "Jing", "Lei", "Yan", "Jun", "Hui", "Qiang", "Li",
                 "Ping", "Tao", "Xin", "Yu", "Hao", "Ning", "Bo", "Lan", "Kai", "Mei")


@dataclass(frozen=True, slots=True)
class Resident:
    resident_id: str
    name: str
    building: str
    floor: int
    unit_id: str
    role: str
    cards: dict[str, str]  # kind -> card number


def residents(spec: Spec) -> list[Resident]:
    """Every resident of the scenario, in a stable order (buildings, floors, units)."""
    rng = random.Random(f"{spec.seed}/residents")
    out: list[Resident] = []
    for b in spec.buildings:
        lo, hi = b.residents_per_unit
        for floor in range(2, b.floors + 1):
            if floor in b.public_floors:
                continue
            for u in range(1, b.units_per_floor + 1):
                unit = f"{b.id}-{floor:02d}{u:02d}"
                surname = rng.choice(_SURNAMES)
                for k in range(rng.randint(lo, hi)):
                    rid = f"r-{unit}-{k + 1}"
                    cards = {kind: f"{kind[0].upper()}-{unit}-{k + 1}" for kind in CARD_KINDS}
                    out.append(Resident(rid, f"{surname} {rng.choice(_GIVEN)}", b.id, floor,
                                        unit, ("owner", "family", "tenant")[min(k, 2)], cards))
    return out


def _energy_dict(spec: Spec, start: float, duration_s: float,
                 faults: list[dict[str, Any]]) -> dict[str, Any]:
    tz = spec.tz
    return {
        "name": spec.name, "seed": spec.seed,
        "start": datetime.fromtimestamp(start, tz).isoformat(),
        "duration": max(duration_s, 60.0), "timezone": spec.timezone,
        **{k: v for k, v in spec.energy.items() if k in ("reporting", "weather", "holidays")},
        "buildings": [{"id": b.id, "template": "standard", **b.energy}
                      for b in spec.buildings if b.energy],
        "faults": faults,
    }


def energy_scenario(spec: Spec, start: float, duration_s: float,
                    fault_starts: dict[int, float]) -> Scenario | None:
    """The rule scenarios' generator set up for this community's buildings and weather;
    `fault_starts`: index of each energy fault in `spec.faults` -> its resolved start."""
    if not any(b.energy for b in spec.buildings):
        return None
    faults = []
    for i, f in enumerate(spec.faults):
        if f.type not in FAULT_TYPES or i not in fault_starts:
            continue
        if not start <= fault_starts[i] < start + duration_s:
            continue  # outside this run (a shortened --duration)
        item: dict[str, Any] = {"type": f.type, "device": f.device, "duration": f.duration_s,
                                "start": datetime.fromtimestamp(fault_starts[i],
                                                                spec.tz).isoformat()}
        for key in ("magnitude", "metric", "variant"):
            if getattr(f, key) is not None:
                item[key] = getattr(f, key)
        faults.append(item)
    return scenario_from_dict(_energy_dict(spec, start, duration_s, faults), spec.source)


def energy_devices(spec: Spec) -> dict[str, tuple[str, str]]:
    """device id -> (kind, building) of the telemetry devices (meters and units)."""
    if not any(b.energy for b in spec.buildings):
        return {}
    scenario = scenario_from_dict(_energy_dict(spec, 1.7e9, 86400.0, []), spec.source)
    where = scenario.device_building()
    return {dev: (kind, where[dev]) for dev, kind in scenario.device_kinds().items()}


def energy_faults(scenario: Scenario | None) -> tuple[FaultSpec, ...]:
    return () if scenario is None else scenario.faults


def site_dict(spec: Spec, modbus_ports: dict[str, int] | None = None,
              modbus_host: str = "127.0.0.1") -> dict[str, Any]:
    """The `buildings:` and `devices:` of a site file for this scenario."""
    ports = modbus_ports or {}
    buildings = []
    for b in spec.buildings:
        floors: list[dict[str, Any]] = []
        for n in b.floor_numbers():
            floor: dict[str, Any] = {"number": n}
            if n < 0:
                floor.update(name="Garage", public=True)
            elif n == 1:
                floor.update(name="Lobby", public=True)
            elif n in b.public_floors:
                floor.update(public=True)
            floors.append(floor)
        buildings.append({"id": b.id, "name": b.name, "floors": floors})
    devices: list[dict[str, Any]] = [{"device_id": g, "kind": "gate", "name": name}
                                     for g, name in spec.gates]
    devices += [{"device_id": e, "kind": "elevator", "building": b.id}
                for b in spec.buildings for e in b.elevator_ids()]
    devices += [{"device_id": t, "kind": "canteen"} for t in spec.canteen.terminals]
    devices += [{"device_id": dev, "kind": kind, "building": building}
                for dev, (kind, building) in energy_devices(spec).items()]
    for unit in spec.modbus:
        entry: dict[str, Any] = {
            "device_id": unit.id, "kind": unit.kind, "host": modbus_host,
            "port": ports.get(unit.id, unit.port), "unit_id": 1, "profile": unit.profile,
            "poll_interval_s": 2.0}
        if unit.building is not None:
            entry["building"] = unit.building
        devices.append(entry)
    return {"buildings": buildings, "devices": devices}


def residents_csv(spec: Spec) -> str:
    """The scenario's residents in the format of `scgw import residents` (docs/import.md)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["unit_id", "building_id", "floor", "resident_id", "name", "role",
                     "gate_card", "elevator_card", "canteen_card"])
    for r in residents(spec):
        writer.writerow([r.unit_id, r.building, r.floor, r.resident_id, r.name, r.role,
                         r.cards["gate"], r.cards["elevator"], r.cards["canteen"]])
    return out.getvalue()
