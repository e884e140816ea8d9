"""`scgw demo`: a whole virtual community on one machine, with no set-up.

A broker (Mosquitto when installed, else embedded amqtt) running the files of
`scgw mqtt-config` (per-device logins and ACL, no anonymous clients), the gateway with its
API, and the community of simulators/scenarios/community.yaml played by the same engine as
`scgw simulate` (simulators.simulate): two towers, gates, elevators, a canteen, meters and
HVAC / fresh-air / purifier units over MQTT and Modbus TCP, a crowd of residents on the
scenario's daily rhythm, and faults. The last eight minutes are played first at 16x, so
the dashboard's power chart has data within half a minute and the injected faults (a power
spike, a forced door) raise alerts in the first minute; then the community lives in real
time. The named demo residents (the logins of demo.json) also pass a gate and buy lunch
every few seconds, whatever the hour, and staff top their purses up before they run dry.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiomqtt
from pydantic import SecretStr
from sqlalchemy import Engine

from device_drivers.supervision import cancel_until_done
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
from simulators.demo.seed import DemoPeople, DemoResident, seed_community, seed_demo
from simulators.phone import SimulatedPhone
from simulators.readers import ReaderSimulator
from simulators.simulate.devices import Logins
from simulators.simulate.runner import Simulation
from simulators.simulate.site import residents, site_dict
from simulators.simulate.spec import Fault, Spec, When, load_spec
from simulators.simulate.staff import staff_topups

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


SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "community.yaml"
# Simulated history played first so the charts are not empty. At most a few minutes: the
# gateway stamps the Modbus units' readings with its own clock, and an MQTT meter whose
# readings trail those by more than the deadman's 10 minutes would look silent.
CATCH_UP_S = 8 * 60.0
CATCH_UP_SPEED = 16.0


def demo_spec() -> Spec:
    """The bundled community, starting a few minutes ago and running until stopped, with
    faults early enough to be seen: a power spike and a forced door within the first half
    minute, then a door, tamper, terminal or Modbus incident every five minutes for two
    hours."""
    spec = load_spec(SCENARIO)
    faults = [
        Fault("spike", "hvac-b1-gym", When("offset", 120.0), 600.0, 0, magnitude=5.0),
        Fault("door_forced", "gate-north", When("offset", 300.0), 0.0, 0),
    ]
    cycle = ("door_held_open", "tamper", "terminal_offline", "door_forced", "modbus_offline")
    for n in range(24):
        kind, at = cycle[n % len(cycle)], When("offset", CATCH_UP_S + (n + 1) * 300.0)
        device = {"terminal_offline": "canteen-1", "modbus_offline": "erv-b1"}.get(
            kind, ("gate-south", "gate-north")[n % 2])
        faults.append(Fault(kind, device, at, 120.0, 0))
    return replace(spec, root=ROOT, start=When("offset", -CATCH_UP_S), duration_s=None,
                   faults=tuple(faults))


def demo_config(
    broker: Broker, db_url: str, api_port: int, spec: Spec, modbus_ports: dict[str, int],
    influxdb_url: str | None = None,
) -> SiteConfig:
    extra: dict[str, Any] = {}
    if influxdb_url is not None:  # InfluxDB 1.x (/write); a v2 server needs a site file
        extra["influxdb"] = {"url": influxdb_url, "api": "v1", "database": "scgw"}
    site = site_dict(spec, modbus_ports)
    names = {r["device_id"]: r.get("name") for r in READERS}
    devices = [{**d, "name": names[d["device_id"]]} if names.get(d["device_id"]) else d
               for d in site["devices"]]
    return SiteConfig.model_validate(
        {
            **extra,
            "site": {"id": "demo", "name": "scgw demo community", "timezone": spec.timezone},
            "mqtt": {"url": f"mqtt://{broker.host}:{broker.port}", "root": ROOT,
                     "username": DEFAULT_GATEWAY_USER},
            "database": {"url": db_url},
            "api": {"port": api_port, "jwt_secret": secrets.token_urlsafe(48)},
            "buildings": BUILDINGS,
            "devices": devices,
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
    """A named demo resident coming home: phone QR at a gate, then the elevator of their
    building (the crowd follows the scenario's rhythm; these keep the demo lively at 3 am)."""
    phone = SimulatedPhone(resident.credential_id, resident.secret)
    gates = [r for r in readers.values() if r.kind == "gate"]
    elevator = readers[f"elev-{resident.building}-1"]
    while True:
        gate = random.choice(gates)
        try:
            decision = await gate.present("qr", phone.qr())
            log.info("%s shows a QR at %s: %s", resident.name, gate.device_id,
                     _brief(decision))
            decision = await elevator.present("card", resident.cards["elevator"])
            log.info("%s taps the elevator card in %s: %s", resident.name,
                     elevator.device_id, _brief(decision))
        except TimeoutError:  # a busy broker or gateway: a real reader says "try again"
            log.warning("%s got no answer in time; trying again later", resident.name)
        except aiomqtt.MqttError as exc:  # the reader lost its broker: the same, later
            log.warning("%s's reader is offline (%s); trying again later", resident.name, exc)
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
    spec = demo_spec()
    modbus_ports = {unit.id: free_port() for unit in spec.modbus}
    try:
        async with AsyncExitStack() as stack:
            broker = Broker("127.0.0.1", free_port(), broker_kind)
            config = demo_config(broker, db_url, api_port, spec, modbus_ports, influxdb_url)
            files = await asyncio.to_thread(broker_files, config, data_dir / "mqtt")
            config = with_gateway_login(config, files.credentials.gateway)
            await stack.enter_async_context(start_broker(broker, files))
            await asyncio.to_thread(db.upgrade, db_url)
            engine = db.make_engine(db_url)
            stack.callback(engine.dispose)
            people = await asyncio.to_thread(seed_demo, engine, config)
            await asyncio.to_thread(_prepare_canteen, engine, people)
            # the crowd moves in before the gateway starts: SQLite has one writer at a time
            phones = await asyncio.to_thread(seed_community, engine, config, residents(spec),
                                             spec.canteen.opening_balance_cents)
            sim = Simulation(
                spec, broker.host, broker.port,
                Logins.from_json(json.loads(files.credentials.to_json())),
                speed=CATCH_UP_SPEED, phones=phones, modbus_ports=modbus_ports)
            gateway = Gateway(config)
            async with asyncio.TaskGroup() as tasks:
                # the devices log in and the Modbus units listen; the clock starts later
                clock_starts = asyncio.Event()
                # the devices outlive the residents using them: a reader closed under a
                # resident's feet mid-request would end the demo with an MQTT error
                devices_stop = asyncio.Event()
                sim_task = tasks.create_task(sim.run(devices_stop, clock_starts),
                                             name="simulation")
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
                staff = next(u for u in people.logins if u["role"] == "staff")
                sim.topup = await stack.enter_async_context(
                    staff_topups(api_url, staff["username"], staff["password"]))
                life: list[asyncio.Task[None]] = []
                if await _first(sim.connected, stop, sim_task):
                    till = sim.terminals["canteen-1"]
                    life = [tasks.create_task(resident_life(r, sim.readers, 6.0),
                                              name=f"life-{r.name}") for r in people.residents]
                    life += [tasks.create_task(lunch(r, till, 8.0, sim), name=f"lunch-{r.name}")
                             for r in people.residents]
                clock_starts.set()
                await stop.wait()
                await asyncio.gather(*(cancel_until_done(task) for task in life))
                devices_stop.set()
    finally:
        remove_handlers()
    announce("scgw demo stopped")


async def _first(event: asyncio.Event, stop: asyncio.Event, task: asyncio.Task[Any]) -> bool:
    """Wait for `event`, unless the demo stops or `task` ends first (its error is raised)."""
    waiters = [asyncio.create_task(event.wait()), asyncio.create_task(stop.wait())]
    await asyncio.wait([*waiters, task], return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    if task.done() and not task.cancelled() and task.exception() is not None:
        await task
    return event.is_set()


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


def _prepare_canteen(engine: Engine, people: DemoPeople) -> None:
    """Every named demo resident starts with 200.00 on their canteen purse."""
    ledger = Ledger(engine)
    for resident in people.residents:
        ledger.topup(resident.resident_id, 20_000, f"demo-welcome-{resident.resident_id}")


async def lunch(resident: DemoResident, till: CanteenTerminal, period_s: float,
                sim: Simulation | None = None) -> None:
    """A resident buying lunch: the phone's payment QR one day, the old canteen card the
    next; staff top the purse up when it runs low (the scenario's rule, through the API)."""
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
        balance = answer.get("balance_cents")
        if sim is not None and (answer.get("reason") == "insufficient_funds" or (
                isinstance(balance, int) and balance < sim.spec.canteen.topup_below_cents)):
            await sim.top_up(resident.resident_id)
            log.info("staff top up %s's canteen purse", resident.name)
