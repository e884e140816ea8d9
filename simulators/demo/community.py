"""`scgw demo`: a whole virtual community on one machine, with no set-up.

A broker (Mosquitto when installed, else embedded amqtt) running the files of
`scgw mqtt-config` (per-device logins and ACL, no anonymous clients), simulated Modbus
units, the gateway with its API, simulated readers and canteen terminals logged in as their
devices, and residents whose phones
open gates, call elevators and pay for lunch every few seconds, so a newcomer sees the
product work within seconds and can then drive it through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import random
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine

from device_drivers.vocabulary import Credential
from gateway.app.mqtt_config import (
    DEFAULT_GATEWAY_USER,
    BrokerSettings,
    Login,
    Written,
    write_mqtt_files,
)
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
    kind: str  # mosquitto | amqtt


def broker_files(config: SiteConfig, directory: Path) -> Written:
    """`scgw mqtt-config` for a broker on loopback (the demo's, or a test's): listener on
    the site URL's host and port, persistence in `directory/data`, run as this user (as
    root, Mosquitto would otherwise drop to `mosquitto`, which cannot read the files).
    Fresh passwords every time."""
    settings = BrokerSettings(
        port=config.mqtt.port, bind=config.mqtt.host, persistence_dir=directory / "data",
        run_as=pwd.getpwuid(os.getuid()).pw_name)
    written = write_mqtt_files(config, directory, settings, rotate=True)
    (directory / "data").mkdir(exist_ok=True)
    return written


def with_gateway_login(config: SiteConfig, login: Login) -> SiteConfig:
    """The site config with the gateway's broker login (in production: the site file's
    `mqtt.username` and SCGW__MQTT__PASSWORD)."""
    mqtt = config.mqtt.model_copy(
        update={"username": login.username, "password": SecretStr(login.password)})
    return config.model_copy(update={"mqtt": mqtt})


@contextlib.asynccontextmanager
async def start_broker(broker: Broker, files: Written) -> AsyncIterator[Broker]:
    """The demo's broker on `broker.host:port` with the generated files: logins required,
    each device confined to its own topics, whichever broker runs."""
    if broker.kind == "mosquitto":
        with Mosquitto(broker.port, broker.host, conf_path=files.conf):
            yield broker
    else:
        log.warning("using the embedded amqtt broker (much slower than Mosquitto; the same "
                    "logins and ACL)")
        async with EmbeddedBroker(files.passwd, files.acl, broker.port, broker.host):
            yield broker


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
            "mqtt": {"url": f"mqtt://{broker.host}:{broker.port}", "root": ROOT,
                     "username": DEFAULT_GATEWAY_USER},
            "database": {"url": db_url},
            "api": {"port": api_port, "jwt_secret": secrets.token_urlsafe(48)},
            "buildings": BUILDINGS,
            "devices": [*READERS, *modbus_devices],
        }
    )


def demo_json(
    api_url: str, broker: Broker, people: DemoPeople, config: SiteConfig, files: Written
) -> str:
    """CONTRACT.md section 6. Polled (Modbus) units have no broker login: null."""
    logins = files.credentials.devices
    monitor = files.credentials.monitor
    return json.dumps(
        {
            "api": api_url,
            "mqtt": {"host": broker.host, "port": broker.port, "root": ROOT,
                     "username": monitor.username, "password": monitor.password},
            "users": people.logins,
            "devices": [
                {"device_id": d.device_id, "kind": d.kind,
                 "mqtt_username": logins[d.device_id].username if d.device_id in logins
                 else None,
                 "mqtt_password": logins[d.device_id].password if d.device_id in logins
                 else None}
                for d in config.devices
            ],
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
    broker_kind: str = "auto",
) -> None:
    if broker_kind == "auto":
        broker_kind = "mosquitto" if mosquitto_binary() is not None else "amqtt"
    elif broker_kind == "mosquitto" and mosquitto_binary() is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    db_url = await asyncio.to_thread(_fresh_data_dir, data_dir)
    stop = asyncio.Event()
    remove_handlers = install_signal_handlers(stop)
    if duration_s is not None:
        asyncio.get_running_loop().call_later(duration_s, stop.set)
    try:
        async with AsyncExitStack() as stack:
            modbus_devices = await stack.enter_async_context(_modbus_units())
            broker = Broker("127.0.0.1", free_port(), broker_kind)
            config = demo_config(broker, db_url, api_port, modbus_devices, influxdb_url)
            files = await asyncio.to_thread(broker_files, config, data_dir / "mqtt")
            config = with_gateway_login(config, files.credentials.gateway)
            await stack.enter_async_context(start_broker(broker, files))
            logins = files.credentials.devices
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
                text = demo_json(api_url, broker, people, config, files)
                await asyncio.to_thread(_write_private, data_dir / "demo.json", text)
                announce(f"scgw demo is up ({broker.kind} broker on {broker.host}:"
                         f"{broker.port}: logins required, anonymous clients refused, each "
                         f"device confined to its own topics; broker files in {files.out_dir})."
                         f" {data_dir / 'demo.json'}:")
                announce(text)
                async with AsyncExitStack() as sims:
                    readers = {
                        r["device_id"]: await sims.enter_async_context(
                            ReaderSimulator(broker.host, broker.port, r["device_id"], r["kind"],
                                            ROOT, username=logins[r["device_id"]].username,
                                            password=logins[r["device_id"]].password)
                        )
                        for r in READERS if r["kind"] in ("gate", "elevator")
                    }
                    till = await sims.enter_async_context(
                        CanteenTerminal(broker.host, broker.port, "canteen-1", root=ROOT,
                                        username=logins["canteen-1"].username,
                                        password=logins["canteen-1"].password)
                    )
                    life = [
                        tasks.create_task(resident_life(r, readers, 6.0), name=f"life-{r.name}")
                        for r in people.residents
                    ] + [
                        tasks.create_task(lunch(r, till, 8.0), name=f"lunch-{r.name}")
                        for r in people.residents
                    ] + [tasks.create_task(incidents(readers, 45.0), name="incidents")]
                    await stop.wait()
                    for task in life:
                        task.cancel()
    finally:
        remove_handlers()
    announce("scgw demo stopped")


async def incidents(readers: dict[str, ReaderSimulator], period_s: float) -> None:
    """Injected faults, so the demo shows alerts: now and then a gate is forced open, held
    open or tampered with (the bundled event rules raise them; they clear by themselves)."""
    gates = [r for r in readers.values() if r.kind == "gate"]
    while True:
        await asyncio.sleep(period_s * random.uniform(0.5, 1.5))
        gate = random.choice(gates)
        event = random.choice(("door_forced", "door_held_open", "tamper"))
        log.info("injected fault: %s reports %s", gate.device_id, event)
        await gate.report_event(event)


def _fresh_data_dir(data_dir: Path) -> str:
    """Each demo run starts from an empty database and broker (new people, new passwords)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("demo.db*"):
        stale.unlink()
    shutil.rmtree(data_dir / "mqtt", ignore_errors=True)
    return f"sqlite:///{data_dir / 'demo.db'}"


def _write_private(path: Path, text: str) -> None:
    """demo.json holds every login of the run: readable by this user only."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


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
