"""Modbus TCP polling benchmark: 200 units x 10 registers at 1 Hz from one process.

Run:  .venv/bin/python bench/bench_modbus.py [--units 200] [--seconds 20] [--rounds 4]

The simulated units run in a separate process (simulators.modbus_units), so the CPU figure
is the gateway side only. Three phases:
  1. poll: ModbusFleet polls every unit at 1 Hz; poll-cycle start jitter (actual start minus
     scheduled start) p50/p99/max and this process's CPU as % of one core.
  2. raw: one pymodbus AsyncModbusTcpClient per unit, each reading 10 registers back to back;
     aggregate requests/s (the ceiling for this machine and server).
  3. driver: the same units through ModbusFleet with poll_interval_s=0 (back to back);
     aggregate requests/s, and the ratio to the raw figure (target >= 0.8).
Targets: jitter p99 <= 50 ms, CPU <= 15 % of one core, ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_drivers.modbus import CycleStats, ModbusDeviceSpec, ModbusFleet  # noqa: E402
from device_drivers.vocabulary import Reading  # noqa: E402

HOST = "127.0.0.1"
PROFILE = """\
profile: bench-10
kind: hvac
registers:
""" + "".join(
    f"  - {{name: {name}, input_type: input, address: {i}, data_type: uint16}}\n"
    for i, name in enumerate(["temperature_c", "outdoor_temperature_c", "humidity_pct",
                              "power_w", "fan_speed_pct", "setpoint_c", "running",
                              "compressor_hz", "fault_code", "filter_dp_pa"])
)


@dataclass(frozen=True)
class Rate:
    per_s: float  # requests (raw) or readings of one request each (driver) per second
    cpu_us: float  # this process's CPU per request


def free_range(count: int) -> int:
    """A base port with `count` consecutive free ports above it."""
    for _ in range(50):
        base = random.randint(20000, 60000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind((HOST, port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def start_simulator(profile: Path, count: int, base: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.modbus_units", "--profile", str(profile),
         "--count", str(count), "--base-port", str(base)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        proc.kill()
        raise RuntimeError("simulator did not start")
    return proc


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def specs(profile: Path, count: int, base: int, interval: float) -> list[ModbusDeviceSpec]:
    return [ModbusDeviceSpec(f"unit-{i:03d}", "hvac", str(profile), HOST, base + i,
                             poll_interval_s=interval, timeout_s=1.0, retries=1)
            for i in range(count)]


async def phase_poll(profile: Path, count: int, base: int, seconds: float, sim_pid: int
                     ) -> dict[str, float]:
    cycles: list[CycleStats] = []
    readings = 0

    def on_reading(_: Reading) -> None:
        nonlocal readings
        readings += 1

    async with ModbusFleet(specs(profile, count, base, 1.0), on_reading,
                           on_cycle=cycles.append) as fleet:
        await asyncio.sleep(3.0)  # connect and settle
        cycles.clear()
        readings = 0
        cpu0, sim0, wall0 = time.process_time(), proc_cpu_s(sim_pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, sim1, wall1 = time.process_time(), proc_cpu_s(sim_pid), time.monotonic()
        health = fleet.health()
    jitter = [(c.started - c.scheduled) * 1000 for c in cycles]
    duration = [(c.finished - c.started) * 1000 for c in cycles]
    return {
        "cycles": len(cycles),
        "failed_cycles": sum(not c.ok for c in cycles),
        "readings_per_s": readings / (wall1 - wall0),
        "jitter_p50_ms": pct(jitter, 0.50),
        "jitter_p99_ms": pct(jitter, 0.99),
        "jitter_max_ms": max(jitter),
        "cycle_p50_ms": pct(duration, 0.50),
        "cycle_p99_ms": pct(duration, 0.99),
        "cpu_pct_one_core": 100 * (cpu1 - cpu0) / (wall1 - wall0),
        "simulator_cpu_pct": 100 * (sim1 - sim0) / (wall1 - wall0),
        "online": sum(h.online for h in health.values()),
    }


async def phase_raw(count: int, base: int, seconds: float) -> Rate:
    clients = [AsyncModbusTcpClient(HOST, port=base + i, timeout=1.0, retries=0,
                                    reconnect_delay=0) for i in range(count)]
    await asyncio.gather(*(c.connect() for c in clients))
    done = 0
    stop_at = time.monotonic() + seconds

    async def hammer(client: AsyncModbusTcpClient) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            response = await client.read_input_registers(0, count=10, device_id=1)
            assert len(response.registers) == 10
            done += 1

    start, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(hammer(c) for c in clients))
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
    for client in clients:
        client.close()
    return Rate(done / elapsed, 1e6 * cpu / done)


async def phase_driver(profile: Path, count: int, base: int, seconds: float) -> Rate:
    readings = 0

    def on_reading(_: Reading) -> None:
        nonlocal readings
        readings += 1

    async with ModbusFleet(specs(profile, count, base, 0.0), on_reading):
        await asyncio.sleep(1.0)
        readings, start, cpu = 0, time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
        return Rate(readings / elapsed, 1e6 * cpu / max(1, readings))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0, help="1 Hz polling window")
    parser.add_argument("--rate-seconds", type=float, default=2.5, help="each rate phase")
    parser.add_argument("--rounds", type=int, default=4, help="raw/driver rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "bench-10.yaml"
        profile.write_text(PROFILE)
        base = free_range(args.units)
        sim = start_simulator(profile, args.units, base)
        try:
            poll = await phase_poll(profile, args.units, base, args.seconds, sim.pid)
            # Short alternating rounds (order swapped every round), so that load from other
            # processes on this shared machine and drift during the run hit both sides alike.
            raw_rates, driver_rates = [], []
            for index in range(args.rounds):
                if index % 2:
                    driver_rates.append(
                        await phase_driver(profile, args.units, base, args.rate_seconds))
                raw_rates.append(await phase_raw(args.units, base, args.rate_seconds))
                if not index % 2:
                    driver_rates.append(
                        await phase_driver(profile, args.units, base, args.rate_seconds))
        finally:
            sim.terminate()
            sim.wait(timeout=10)
    raw = statistics.mean(r.per_s for r in raw_rates)
    driver = statistics.mean(r.per_s for r in driver_rates)
    # each raw round is paired with the driver round next to it in time
    ratio = statistics.median(d.per_s / r.per_s for r, d in zip(raw_rates, driver_rates,
                                                                 strict=True))
    print(f"units={args.units} registers/unit=10 interval=1.0s window={args.seconds:g}s")
    for key, value in poll.items():
        print(f"  {key:<22} {value:10.2f}")
    rounds = ", ".join(f"{r.per_s:.0f}" for r in raw_rates)
    print(f"raw pymodbus requests/s  {raw:10.1f}  ({args.units} connections back to back;"
          f" rounds {rounds}; {statistics.mean(r.cpu_us for r in raw_rates):.0f} us CPU/req)")
    rounds = ", ".join(f"{r.per_s:.0f}" for r in driver_rates)
    print(f"driver requests/s        {driver:10.1f}  (ModbusFleet, poll_interval_s=0;"
          f" rounds {rounds}; {statistics.mean(r.cpu_us for r in driver_rates):.0f} us CPU/req)")
    print(f"driver / raw             {ratio:10.2f}  (median of paired rounds; target >= 0.80)")
    ok = (poll["jitter_p99_ms"] <= 50 and poll["cpu_pct_one_core"] <= 15
          and ratio >= 0.8 and poll["failed_cycles"] == 0)
    print("targets: " + ("met" if ok else "NOT met"))


if __name__ == "__main__":
    asyncio.run(main())
