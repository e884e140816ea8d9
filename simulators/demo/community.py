"""`scgw demo`: a whole virtual community on one machine, with no set-up.

A broker (Mosquitto when installed, else embedded amqtt), simulated Modbus units, the
gateway with its API, simulated readers and canteen terminals, and residents whose phones
open gates, call elevators and pay for lunch every few seconds, so a newcomer sees the
product work within seconds and can then drive it through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from device_drivers.vocabulary import Credential
from gateway.app.runtime import Gateway, install_signal_handlers
from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.store import db
from simulators.canteen import CanteenTerminal, card_credential
from simulators.demo.broker import EmbeddedBroker, Mosquitto, free_port, mosquitto_binary
from simulators.demo.seed import DemoPeople, DemoResident, seed_demo
from simulators.modbus_units import SimulatedUnits, UnitSpec
from simulators.phone import SimulatedPhone
from simulators.readers import ReaderSimulator

log = logging.getLogger(__name__)

ROOT = "scgw"
BUILDINGS = [
    {"id": "b1", "name": "Building 1", "floors": [
        {"number": -1, "name": "Garage", "public": True},
        {"number": 1, "name": "Lobby", "public": True},
        *({"number": n} for n in range(2, 13)),
    ]},
    {"id": "b2", "name": "Building 2", "floors": [
        {"number": 1, "name": "Lobby", "public": True},
        *({"number": n} for n in range(2, 18)),
        {"number": 18, "name": "Gym", "public": True},
    ]},
]
READERS = [
    {"device_id": "gate-north", "kind": "gate", "name": "North gate"},
    {"device_id": "gate-south", "kind": "gate", "name": "South gate"},
    {"device_id": "elev-b1-1", "kind": "elevator", "building": "b1", "name": "B1 car 1"},
    {"device_id": "elev-b2-1", "kind": "elevator", "building": "b2", "name": "B2 car 1"},
    {"device_id": "canteen-1", "kind": "canteen", "name": "Canteen till 1"},
]


@dataclass
class Broker:
    host: str
    port: int
    kind: str


@contextlib.asynccontextmanager
async def start_broker() -> AsyncIterator[Broker]:
    if mosquitto_binary() is not None:
        with Mosquitto() as mosquitto:
            yield Broker(mosquitto.host, mosquitto.port, "mosquitto")
    else:
        log.warning("mosquitto not installed: using the embedded amqtt broker (much slower)")
        async with EmbeddedBroker() as embedded:
            yield Broker(embedded.host, embedded.port, "amqtt")


def demo_config(
    broker: Broker, db_url: str, api_port: int, modbus_devices: list[dict[str, Any]],
    influxdb_url: str | None = None,
) -> SiteConfig:
    extra: dict[str, Any] = {}
    if influxdb_url is not None:  # InfluxDB 1.x (/write); a v2 server needs a site file
        extra["influxdb"] = {"url": influxdb_url, "api": "v1", "database": "scgw"}
    return SiteConfig.model_validate(
        {
            **extra,
            "site": {"id": "demo", "name": "scgw demo community"},
            "mqtt": {"url": f"mqtt://{broker.host}:{broker.port}", "root": ROOT},
            "database": {"url": db_url},
            "api": {"port": api_port, "jwt_secret": secrets.token_urlsafe(48)},
            "buildings": BUILDINGS,
            "devices": [*READERS, *modbus_devices],
        }
    )


def demo_json(api_url: str, broker: Broker, people: DemoPeople, config: SiteConfig) -> str:
    return json.dumps(
        {
            "api": api_url,
            "mqtt": {"host": broker.host, "port": broker.port, "root": ROOT},
            "users": people.logins,
            "devices": [{"device_id": d.device_id, "kind": d.kind} for d in config.devices],
        },
        indent=2,
    )


async def resident_life(
    resident: DemoResident, readers: dict[str, ReaderSimulator], period_s: float
) -> None:
    """A resident coming home: phone QR at a gate, then the elevator of their building."""
    phone = SimulatedPhone(resident.credential_id, resident.secret)
    gates = [r for r in readers.values() if r.kind == "gate"]
    elevator = readers[f"elev-{resident.building}-1"]
    while True:
        gate = random.choice(gates)
        decision = await gate.present("qr", phone.qr())
        log.info("%s shows a QR at %s: %s", resident.name, gate.device_id, _brief(decision))
        decision = await elevator.present("card", resident.cards["elevator"])
        log.info("%s taps the elevator card in %s: %s", resident.name, elevator.device_id,
                 _brief(decision))
        await asyncio.sleep(period_s * random.uniform(0.7, 1.3))


def _brief(decision: dict[str, Any]) -> str:
    if decision.get("granted"):
        floors = decision.get("floors")
        return f"{decision['action']}" + (f" floors {floors}" if floors else "")
    return f"denied ({decision.get('reason')})"


async def run_demo(
    data_dir: Path,
    api_port: int,
    duration_s: float | None,
    announce: Callable[[str], None] = log.info,
    influxdb_url: str | None = None,
) -> None:
    db_url = await asyncio.to_thread(_fresh_data_dir, data_dir)
    stop = asyncio.Event()
    remove_handlers = install_signal_handlers(stop)
    if duration_s is not None:
        asyncio.get_running_loop().call_later(duration_s, stop.set)
    try:
        async with AsyncExitStack() as stack:
            broker = await stack.enter_async_context(start_broker())
            modbus_devices = await stack.enter_async_context(_modbus_units())
            config = demo_config(broker, db_url, api_port, modbus_devices, influxdb_url)
            await asyncio.to_thread(db.upgrade, db_url)
            engine = db.make_engine(db_url)
            stack.callback(engine.dispose)
            people = await asyncio.to_thread(seed_demo, engine, config)
            await asyncio.to_thread(_prepare_canteen, engine, people)
            gateway = Gateway(config)
            async with asyncio.TaskGroup() as tasks:
                gateway_task = tasks.create_task(gateway.run(stop), name="gateway")
                await _wait_started(gateway, gateway_task)
                api_url = f"http://127.0.0.1:{gateway.api_port}"
                text = demo_json(api_url, broker, people, config)
                await asyncio.to_thread((data_dir / "demo.json").write_text, text)
                announce(f"scgw demo is up ({broker.kind} broker). {data_dir / 'demo.json'}:")
                announce(text)
                async with AsyncExitStack() as sims:
                    readers = {
                        r["device_id"]: await sims.enter_async_context(
                            ReaderSimulator(broker.host, broker.port, r["device_id"], r["kind"],
                                            ROOT)
                        )
                        for r in READERS if r["kind"] in ("gate", "elevator")
                    }
                    till = await sims.enter_async_context(
                        CanteenTerminal(broker.host, broker.port, "canteen-1", root=ROOT)
                    )
                    life = [
                        tasks.create_task(resident_life(r, readers, 6.0), name=f"life-{r.name}")
                        for r in people.residents
                    ] + [
                        tasks.create_task(lunch(r, till, 8.0), name=f"lunch-{r.name}")
                        for r in people.residents
                    ]
                    await stop.wait()
                    for task in life:
                        task.cancel()
    finally:
        remove_handlers()
    announce("scgw demo stopped")


def _fresh_data_dir(data_dir: Path) -> str:
    """Each demo run starts from an empty database (new people, new passwords)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("demo.db*"):
        stale.unlink()
    return f"sqlite:///{data_dir / 'demo.db'}"


async def _wait_started(gateway: Gateway, task: asyncio.Task[None]) -> None:
    started = asyncio.create_task(gateway.started.wait())
    await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
    if not gateway.started.is_set():
        started.cancel()
        await task  # raises what stopped the gateway


MODBUS_UNITS = [
    # device id, kind, bundled profile, building
    ("hvac-b1-lobby", "hvac", "heat-pump-split", "b1"),
    ("erv-b1", "fresh_air", "fresh-air-erv", "b1"),
    ("purifier-b2-gym", "air_purifier", "air-purifier", "b2"),
    ("meter-main", "meter", "eastron-sdm630", None),
]


@contextlib.asynccontextmanager
async def _modbus_units() -> AsyncIterator[list[dict[str, Any]]]:
    """Simulated units on loopback Modbus TCP ports, and their site-config entries."""
    ports = [free_port() for _ in MODBUS_UNITS]
    specs = [UnitSpec(profile, port, seed=i)
             for i, ((_, _, profile, _), port) in enumerate(zip(MODBUS_UNITS, ports, strict=True))]
    async with SimulatedUnits(specs):
        yield [
            {"device_id": device_id, "kind": kind, "building": building, "host": "127.0.0.1",
             "port": port, "unit_id": 1, "profile": profile, "poll_interval_s": 2.0}
            for (device_id, kind, profile, building), port in zip(MODBUS_UNITS, ports, strict=True)
        ]


def _prepare_canteen(engine: Engine, people: DemoPeople) -> None:
    """Every demo resident starts with 200.00 on their canteen purse."""
    ledger = Ledger(engine)
    for resident in people.residents:
        ledger.topup(resident.resident_id, 20_000, f"demo-welcome-{resident.resident_id}")


async def lunch(resident: DemoResident, till: CanteenTerminal, period_s: float) -> None:
    """A resident buying lunch: the phone's payment QR one day, the old canteen card the next."""
    phone = SimulatedPhone(resident.credential_id, resident.secret)

    def pay_by_phone() -> Credential:
        return Credential("qr", phone.qr())

    while True:
        await asyncio.sleep(period_s * random.uniform(0.5, 1.5))
        amount = random.choice([1200, 1500, 1800, 2200])
        by_phone = random.random() < 0.6
        sale = await till.sell(
            amount, pay_by_phone if by_phone else card_credential(resident.cards["canteen"])
        )
        answer = sale.result or {}
        log.info(
            "%s pays %.2f at %s by %s: %s (balance %.2f)", resident.name, amount / 100,
            till.device_id, "phone" if by_phone else "card",
            "approved" if answer.get("approved") else answer.get("reason", sale.outcome),
            (answer.get("balance_cents") or 0) / 100,
        )
