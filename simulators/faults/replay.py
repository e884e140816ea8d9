"""Scenario output on disk and the site around it.

`write_jsonl` writes the replay format of CONTRACT.md section 6, one reading per line:
`{"device_id", "kind", "ts", "seq", "metrics"}`, so `scgw rules replay --readings FILE`
runs a scenario's output through the same engine as the live gateway. Labels are JSON:
`{"scenario", "span": [t0, t1], "devices": {id: kind}, "faults": [{type, device_id, start,
end, related}]}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from device_drivers.vocabulary import Reading
from rules.model import DeviceInfo, SiteContext
from rules.scoring import Fault
from simulators.faults.placement import labels
from simulators.faults.scenario import Scenario

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def reading_to_json(reading: Reading) -> str:
    return _ENCODE({"device_id": reading.device_id, "kind": reading.kind, "ts": reading.ts,
                    "seq": reading.seq, "metrics": reading.metrics
                    if isinstance(reading.metrics, dict) else dict(reading.metrics)})


def write_jsonl(readings: Iterable[Reading], path: str | Path) -> int:
    """Write readings as JSON lines (CONTRACT.md section 6); returns how many."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as out:
        batch: list[str] = []
        for reading in readings:
            batch.append(reading_to_json(reading))
            if len(batch) >= 4096:
                out.write("\n".join(batch) + "\n")
                count += len(batch)
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
            count += len(batch)
    return count


def read_jsonl(path: str | Path) -> Iterator[Reading]:
    """The readings of a JSON-lines file written by `write_jsonl` (or recorded)."""
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            data = json.loads(line)
            seq = data.get("seq")
            yield Reading(device_id=str(data["device_id"]), kind=str(data["kind"]),
                          ts=float(data["ts"]),
                          metrics={str(k): float(v) for k, v in data["metrics"].items()},
                          seq=None if seq is None else int(seq))


def labels_document(scenario: Scenario) -> dict[str, Any]:
    return {"scenario": scenario.name, "span": [scenario.t0, scenario.t1],
            "timezone": scenario.timezone, "devices": scenario.device_kinds(),
            "faults": [f.to_dict() for f in labels(scenario)]}


def write_labels(scenario: Scenario, path: str | Path) -> None:
    Path(path).write_text(json.dumps(labels_document(scenario), indent=1) + "\n",
                          encoding="utf-8")


def read_labels(path: str | Path) -> tuple[list[Fault], dict[str, str], tuple[float, float]]:
    """Faults, devices (id -> kind) and span of a labels file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    faults = [Fault.from_dict(f) for f in data["faults"]]
    span = (float(data["span"][0]), float(data["span"][1]))
    return faults, {str(k): str(v) for k, v in data["devices"].items()}, span


def site_context(scenario: Scenario) -> SiteContext:
    """What the rules engine needs to know about the scenario's site."""
    devices = {dev: DeviceInfo(dev, kind, building)
               for (dev, kind), building in zip(scenario.device_kinds().items(),
                                                scenario.device_building().values(),
                                                strict=True)}
    calendars = {b.id: b.calendar for b in scenario.buildings if b.calendar is not None}
    return SiteContext(timezone=scenario.timezone, default_calendar=scenario.default_calendar,
                       calendars=calendars, devices=devices)


def site_yaml(scenario: Scenario) -> str:
    """A fragment listing the scenario's buildings and devices (for a site file)."""
    lines = ["buildings:"]
    for b in scenario.buildings:
        lines.append(f"  - id: {b.id}")
    lines.append("devices:")
    for dev, kind in scenario.device_kinds().items():
        lines.append(f"  - {{device_id: {dev}, kind: {kind}, "
                     f"building: {scenario.device_building()[dev]}}}")
    return "\n".join(lines) + "\n"
