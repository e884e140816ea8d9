"""`scgw rules replay` end to end (issue 10 target: >= 100,000 readings/s).

Writes a recording of 1,000 devices (meters with power and energy, hvac units with power,
temperature, fan speed and filter pressure drop), one reading each per minute, and times the
CLI exactly as an operator runs it (a separate process: start-up, JSON parsing, the engine
with the bundled default rules, transitions printed), against `wc -l` of the same file as a
floor. Reports readings per wall second and per CPU second of the CLI process (start-up
included); on a shared machine the second is the one that does not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = 1000


def recording(path: Path, readings: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    minutes = readings // DEVICES
    start = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    energy = [rng.uniform(1e5, 1e7) for _ in range(DEVICES)]
    with path.open("w") as out:
        for minute in range(minutes):
            for d in range(DEVICES):
                ts = start + minute * 60 + d * 0.05
                if d % 2:
                    power = 800 + 400 * rng.random()
                    energy[d] += power / 60
                    line = {"device_id": f"m-{d:04d}", "kind": "meter", "ts": ts,
                            "seq": minute, "metrics": {"power_w": round(power, 1),
                                                       "energy_wh": round(energy[d], 1)}}
                else:
                    line = {"device_id": f"ahu-{d:04d}", "kind": "hvac", "ts": ts,
                            "seq": minute, "metrics": {
                                "power_w": round(1500 + 300 * rng.random(), 1),
                                "temperature_c": round(22 + rng.random(), 1),
                                "fan_speed_pct": 60.0,
                                "filter_dp_pa": round(80 + 5 * rng.random(), 1)}}
                out.write(json.dumps(line) + "\n")


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of finished child processes: the figure that does not
    depend on what else a shared machine runs (wall time does, several-fold under load)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(readings: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scgw-bench-rules-") as tmp:
        path = Path(tmp) / "readings.jsonl"
        recording(path, readings)
        lines = sum(1 for _ in path.open())
        started = time.perf_counter()
        subprocess.run(["wc", "-l", str(path)], check=True, capture_output=True)
        wc_s = time.perf_counter() - started
        started = time.perf_counter()
        cpu_before = _children_cpu_s()
        done = subprocess.run([sys.executable, "-m", "gateway.app.cli", "rules", "replay",
                               "--readings", str(path)], capture_output=True, text=True)
        replay_s = time.perf_counter() - started
        replay_cpu_s = _children_cpu_s() - cpu_before
        if done.returncode != 0:
            raise SystemExit(f"replay failed: {done.stderr[-2000:]}")
        transitions = sum(1 for line in done.stdout.splitlines() if line.strip())
    return {"readings": lines, "replay_s": round(replay_s, 2),
            "replay_readings_per_s": round(lines / replay_s),
            "replay_cpu_s": round(replay_cpu_s, 2),
            "replay_readings_per_cpu_s": round(lines / replay_cpu_s),
            "target_readings_per_s": 100_000, "transitions": transitions,
            "wc_l_s": round(wc_s, 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=1_000_000)
    print(json.dumps(main(parser.parse_args().readings), indent=2))
