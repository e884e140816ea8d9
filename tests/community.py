"""A small seeded community and a running in-process gateway for end-to-end tests."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bleak.backends.scanner import BaseBleakScanner

from gateway.app.runtime import Gateway
from gateway.config import SiteConfig
from gateway.store import db
from simulators.demo.broker import Mosquitto
from simulators.demo.community import BUILDINGS, READERS
from simulators.demo.seed import DemoPeople, seed_demo


@dataclass
class Running:
    gateway: Gateway
    config: SiteConfig
    people: DemoPeople
    root: str

    def login(self, role: str) -> dict[str, Any]:
        return next(u for u in self.people.logins if u["role"] == role)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.gateway.api_port}"


def site_config(
    broker: Mosquitto,
    db_url: str,
    root: str,
    ble_readers: tuple[str, ...] = (),
    extra_devices: Sequence[dict[str, Any]] = (),
    site_extra: dict[str, Any] | None = None,
) -> SiteConfig:
    return SiteConfig.model_validate(
        {
            **(site_extra or {}),
            "site": {"id": "test"},
            "mqtt": {"url": broker.url, "root": root, "reconnect_min_s": 0.05,
                     "reconnect_max_s": 0.5},
            "database": {"url": db_url},
            "api": {"port": 0, "jwt_secret": secrets.token_hex(32)},
            "buildings": BUILDINGS,
            "devices": [
                {**r, "ble": {"rssi_threshold_dbm": -80}} if r["device_id"] in ble_readers else r
                for r in READERS
            ] + list(extra_devices),
        }
    )


@asynccontextmanager
async def running_gateway(
    broker: Mosquitto,
    tmp_path: Path,
    ble_readers: tuple[str, ...] = (),
    ble_backend: type[BaseBleakScanner] | None = None,
    extra_devices: Sequence[dict[str, Any]] = (),
    site_extra: dict[str, Any] | None = None,
    again: Running | None = None,
) -> AsyncIterator[Running]:
    """`again`: restart the gateway of an earlier run (same root, database and spool)."""
    root = again.root if again is not None else f"t{secrets.token_hex(4)}"  # isolates tests
    db_url = f"sqlite:///{tmp_path / 'gw.db'}"
    config = site_config(broker, db_url, root, ble_readers, extra_devices, site_extra)
    if again is None:
        db.upgrade(db_url)
        engine = db.make_engine(db_url)
        people = seed_demo(engine, config)
        engine.dispose()
    else:
        people = again.people
    gateway = Gateway(config, ble_backend=ble_backend)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    started = asyncio.create_task(gateway.started.wait())
    await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert gateway.link is not None
    await asyncio.wait_for(gateway.link.connected.wait(), 10)
    # Readings published before the telemetry worker subscribed would be lost to a new
    # session: wait for its health report to say it is subscribed.
    deadline = time.monotonic() + 20
    while not gateway.telemetry_health.report.get("mqtt", {}).get("subscribed"):
        if task.done():
            task.result()  # the gateway ended: raise what ended it
        if time.monotonic() > deadline:
            raise AssertionError("the telemetry worker never reported itself subscribed")
        await asyncio.sleep(0.05)
    try:
        yield Running(gateway, config, people, root)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
