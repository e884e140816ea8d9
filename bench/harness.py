"""Shared set-up for benchmarks that measure the real gateway process (`scgw run`)."""

from __future__ import annotations

import contextlib
import os
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
    """A seeded database and `scgw run` as a child process; yields the demo people."""
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.app.cli", "run", "--config", str(config_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if processes is not None:
        processes.append(proc)
    try:
        yield people
    finally:
        proc.terminate()
        proc.wait(10)
