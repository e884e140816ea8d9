"""Shared set-up for benchmarks that measure the real gateway process (`scgw run`), and
the machine description that goes beside every figure (bench/run_all.py)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.store import db
from simulators.demo.broker import Mosquitto
from simulators.demo.community import BUILDINGS, READERS
from simulators.demo.seed import DemoPeople, seed_demo


def machine() -> dict[str, str]:
    """What a figure was measured on: `nproc`, CPU model, RAM, load, date, commit."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gb = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = f"{int(line.split()[1]) / 1024 / 1024:.1f}"
                break
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False, cwd=Path(__file__).parent)
        if done.returncode == 0:
            commit = done.stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count()),
        "cpu": cpu, "ram_gb": ram_gb,
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "python": platform.python_version(), "commit": commit,
    }


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def gateway_process(
    broker: Mosquitto,
    work: Path,
    extra_devices: list[dict[str, Any]] | None = None,
    purse_cents: int = 0,
    site_extra: dict[str, Any] | None = None,
    processes: list[subprocess.Popen[bytes]] | None = None,
) -> Iterator[DemoPeople]:
    """A seeded database and `scgw run` as a child process; yields the demo people.
    The gateway's log goes to WORK/gateway-PORT.log: a bench that fails says why there."""
    db_url = f"sqlite:///{work / f'bench-{broker.port}.db'}"
    site = {
        "site": {"id": "bench"},
        "mqtt": {"url": broker.url, "root": "scgw"},
        "database": {"url": db_url},
        "api": {"enabled": False},
        "buildings": BUILDINGS,
        "devices": [*READERS, *(extra_devices or [])],
        **(site_extra or {}),
    }
    config_path = work / f"site-{broker.port}.yaml"
    config_path.write_text(yaml.safe_dump(site))
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    people = seed_demo(engine, SiteConfig.model_validate(site))
    if purse_cents:
        ledger = Ledger(engine)
        for resident in people.residents:
            ledger.topup(resident.resident_id, purse_cents, f"bench-{resident.resident_id}")
    engine.dispose()
    env = {**os.environ, "SCGW__API__JWT_SECRET": secrets.token_hex(32)}
    with (work / f"gateway-{broker.port}.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.app.cli", "run", "--config", str(config_path)],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
    if processes is not None:
        processes.append(proc)
    try:
        yield people
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # a stuck gateway must not hang `make bench`
            proc.kill()
            proc.wait(10)
