"""Issue 11, finding 1: nobody speaks for a device. A broker started with the files of
`scgw mqtt-config` (real Mosquitto, and the embedded amqtt fallback enforcing the same
files) refuses anonymous clients, drops what a device publishes outside its own channels,
delivers a device nothing but its own inbound channels, keeps the monitor read-only; and
the real gateway works end to end with its generated login.

"Never delivered" is proved against a later message: the observer (the gateway's login,
subscribed to the whole root) waits for a legitimate message sent after the forged ones
and, a moment later, has seen none of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from gateway.app.mqtt_config import BrokerSettings, Login, TlsFiles, Written, write_mqtt_files
from gateway.app.runtime import Gateway
from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.store import db
from simulators.canteen import CanteenTerminal, card_credential
from simulators.demo.broker import EmbeddedBroker, Mosquitto, free_port, mosquitto_binary
from simulators.demo.community import BUILDINGS, READERS, broker_files, with_gateway_login
from simulators.demo.seed import DemoPeople, seed_demo
from simulators.modbus_units import SimulatedUnits, UnitSpec
from simulators.readers import ReaderSimulator
from tests.servers import require
from tests.test_mqtt_config import self_signed

FORGED = b'{"forged": true, "action": "unlock", "duration_s": 3600}'


@dataclass
class Site:
    host: str
    port: int
    root: str
    config: SiteConfig
    files: Written
    kind: str
    polled_port: int

    @property
    def gateway(self) -> Login:
        return self.files.credentials.gateway

    @property
    def monitor(self) -> Login:
        return self.files.credentials.monitor

    def device(self, device_id: str) -> Login:
        return self.files.credentials.devices[device_id]

    def topic(self, device_id: str, channel: str) -> str:
        return f"{self.root}/devices/{device_id}/{channel}"

    def client(self, login: Login | None, **kwargs: Any) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host, self.port, username=login.username if login else None,
            password=login.password if login else None, timeout=5, **kwargs)


def site_config(port: int, root: str, db_url: str, polled_port: int) -> SiteConfig:
    return SiteConfig.model_validate({
        "site": {"id": "edge"},
        "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "root": root, "username": "gw-edge",
                 "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
        "database": {"url": db_url},
        "api": {"port": 0, "jwt_secret": secrets.token_hex(32)},
        "buildings": BUILDINGS,
        "devices": [
            *READERS,
            {"device_id": "meter-mqtt", "kind": "meter", "building": "b1"},
            {"device_id": "meter-polled", "kind": "meter", "host": "127.0.0.1",
             "port": polled_port, "profile": "eastron-sdm630", "poll_interval_s": 0.5},
        ],
    })


@asynccontextmanager
async def secured_broker(kind: str, tmp_path: Path) -> AsyncIterator[Site]:
    """A broker of `kind` running the files `scgw mqtt-config` wrote for a fresh site."""
    if kind == "mosquitto":
        require(mosquitto_binary() is not None, "mosquitto")
    port, polled_port, root = free_port(), free_port(), f"t{secrets.token_hex(4)}"
    config = site_config(port, root, f"sqlite:///{tmp_path / 'gw.db'}", polled_port)
    files = await asyncio.to_thread(broker_files, config, tmp_path / "mqtt")
    site = Site("127.0.0.1", port, root, config, files, kind, polled_port)
    if kind == "mosquitto":
        broker = Mosquitto(port, conf_path=files.conf)
        broker.start()
        try:
            yield site
        finally:
            broker.close()
    else:
        async with EmbeddedBroker(files.passwd, files.acl, port):
            yield site


@pytest.fixture(params=["mosquitto", "amqtt"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Site]:
    async with secured_broker(request.param, tmp_path) as running:
        yield running


class Observer:
    """A subscriber collecting everything it is delivered."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Event()

    async def __aenter__(self) -> Observer:
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _collect(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self.seen.append((message.topic.value, payload))
            self._new.set()

    async def wait_for(self, payload: bytes, timeout_s: float = 5.0) -> None:
        """Until `payload` arrived, then a further moment for anything still in flight."""
        async with asyncio.timeout(timeout_s):
            while not any(p == payload for _, p in self.seen):
                self._new.clear()
                await self._new.wait()
        await asyncio.sleep(0.2)

    def forged(self) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.seen if b"forged" in p]


def marker() -> bytes:
    return json.dumps({"marker": secrets.token_hex(4)}).encode()


# ---- logins ---------------------------------------------------------------------------

async def test_anonymous_and_wrong_logins_are_refused(site: Site) -> None:
    wrong = [None, Login("gate-north", "guess"), Login("gate-north", site.device("gate-south")
                                                       .password),
             Login("nobody", site.gateway.password), Login(site.gateway.username, "")]
    for login in wrong:
        with pytest.raises(aiomqtt.MqttError):
            async with site.client(login):
                pass
    for login in (site.gateway, site.monitor, site.device("gate-north")):
        async with site.client(login):
            pass
    assert "meter-polled" not in site.files.credentials.devices  # polled: no login at all


# ---- publishing -----------------------------------------------------------------------

async def test_a_device_cannot_speak_for_another_device_or_for_the_gateway(site: Site) -> None:
    forged_topics = [
        site.topic("gate-north", "command"),  # the finding: opened a gate for an hour
        site.topic("gate-north", "access/decision"),
        site.topic("gate-north", "access/request"),
        site.topic("gate-north", "status"),
        site.topic("hvac-x", "command"),
        site.topic("gate-south", "command"),  # its own inbound channels: the gateway's words
        site.topic("gate-south", "access/decision"),
        site.topic("gate-south", "payment/result"),
        site.topic("gate-south", "payment/batch_result"),
        site.topic("gate-south", "payment/request"),  # a gate never pays
        site.topic("gate-south", "payment/batch"),
        site.topic("canteen-1", "payment/batch"),  # finding 2: a forged batch
        site.topic("meter-polled", "telemetry"),  # finding 6: nobody speaks for a polled unit
        f"{site.root}/gateway/edge/status",
        f"{site.root}/alerts/rule/gate-north",
    ]
    legit = marker()
    async with (
        site.client(site.gateway) as watching,
        site.client(site.device("gate-south")) as device,
        Observer(watching) as observer,
    ):
        await watching.subscribe(f"{site.root}/#", qos=1)
        for topic in forged_topics:
            await device.publish(topic, FORGED, qos=1)
            await device.publish(topic, FORGED, qos=0)
        await device.publish(site.topic("gate-south", "telemetry"), legit, qos=1)
        await observer.wait_for(legit)
    assert observer.forged() == []
    assert (site.topic("gate-south", "telemetry"), legit) in observer.seen


async def test_a_last_will_cannot_speak_for_another_device(site: Site) -> None:
    legit = marker()
    async with (
        site.client(site.gateway) as watching,
        Observer(watching) as observer,
    ):
        await watching.subscribe(f"{site.root}/#", qos=1)
        # Mosquitto accepts the connection and drops the will when it would fire; the
        # embedded broker refuses the connection outright. Either way, nothing arrives.
        await asyncio.to_thread(connect_with_will_then_drop, site, "gate-south",
                                site.topic("gate-north", "command"), FORGED)
        await asyncio.sleep(0.3)
        async with site.client(site.device("gate-south")) as device:
            await device.publish(site.topic("gate-south", "telemetry"), legit, qos=1)
        await observer.wait_for(legit)
    assert observer.forged() == []


def connect_with_will_then_drop(
    site: Site, device_id: str, will_topic: str, will: bytes
) -> int:
    """An MQTT 3.1.1 CONNECT with a last will, then the socket closed without DISCONNECT
    (which is what makes a broker publish the will). Returns the CONNACK code."""
    login = site.device(device_id)

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02  # username, password, will QoS 1, will, clean
    body = (field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
            + field(f"will-{secrets.token_hex(3)}".encode()) + field(will_topic.encode())
            + field(will) + field(login.username.encode()) + field(login.password.encode()))
    length, remaining = b"", len(body)
    while True:  # the remaining length, as a varint
        remaining, digit = divmod(remaining, 128)
        length += bytes([digit | (0x80 if remaining else 0)])
        if not remaining:
            break
    with socket.create_connection((site.host, site.port), timeout=5) as sock:
        sock.sendall(b"\x10" + length + body)
        connack = sock.recv(4)
        time.sleep(0.1)
    return connack[3] if len(connack) == 4 else -1


# ---- receiving ------------------------------------------------------------------------

async def test_a_device_receives_only_its_own_inbound_channels(site: Site) -> None:
    legit = marker()
    async with site.client(site.gateway) as gateway:
        # A retained message, and a broad subscription of someone else's: neither a broad
        # subscription of the device nor its mere connecting may fetch it.
        await gateway.subscribe(f"{site.root}/#", qos=1)
        await gateway.publish(site.topic("gate-north", "access/decision"), b'{"forged": "r"}',
                              qos=1, retain=True)
        async with (
            site.client(site.device("gate-south")) as device,
            Observer(device) as observer,
        ):
            for pattern in ("#", f"{site.root}/#", site.topic("gate-north", "#"),
                            f"{site.root}/devices/+/command", site.topic("gate-south", "#")):
                # Mosquitto grants the subscription and filters every delivery by `read`;
                # the embedded broker refuses it (0x80). Nothing of another device arrives.
                await device.subscribe(pattern, qos=1)
            await device.subscribe(site.topic("gate-south", "command"), qos=1)
            for channel in ("command", "access/decision", "payment/result", "status"):
                await gateway.publish(site.topic("gate-north", channel), b'{"forged": 1}', qos=1)
            await gateway.publish(f"{site.root}/alerts/r/gate-north", b'{"forged": 2}', qos=1)
            await gateway.publish(site.topic("gate-south", "command"), legit, qos=1)
            await observer.wait_for(legit)
        await gateway.publish(site.topic("gate-north", "access/decision"), b"", retain=True)
    assert observer.forged() == []
    assert {t for t, _ in observer.seen} == {site.topic("gate-south", "command")}


async def test_the_monitor_reads_everything_and_publishes_nothing(site: Site) -> None:
    reading = json.dumps({"ts": time.time(), "seq": 1, "metrics": {"power_w": 5.0}}).encode()
    legit = marker()
    async with (
        site.client(site.monitor) as monitor,
        site.client(site.gateway) as gateway,
        site.client(site.device("meter-mqtt")) as meter,
        Observer(monitor) as monitor_saw,
        Observer(gateway) as gateway_saw,
    ):
        await monitor.subscribe(f"{site.root}/#", qos=1)
        await gateway.subscribe(f"{site.root}/#", qos=1)
        await meter.publish(site.topic("meter-mqtt", "telemetry"), reading, qos=1)
        await gateway.publish(site.topic("gate-north", "command"), legit, qos=1)
        await monitor_saw.wait_for(legit)
        assert (site.topic("meter-mqtt", "telemetry"), reading) in monitor_saw.seen
        for topic in (site.topic("gate-north", "command"), site.topic("gate-north", "status"),
                      f"{site.root}/gateway/edge/status"):
            await monitor.publish(topic, FORGED, qos=1, retain=True)
        last = marker()
        await gateway.publish(site.topic("gate-north", "command"), last, qos=1)
        await gateway_saw.wait_for(last)
    assert gateway_saw.forged() == [] and monitor_saw.forged() == []


# ---- the real gateway with its generated login ----------------------------------------

@asynccontextmanager
async def secured_gateway(site: Site) -> AsyncIterator[tuple[Gateway, DemoPeople]]:
    """The real gateway, logged in with the generated credentials (in production: the
    site file's `mqtt.username` and SCGW__MQTT__PASSWORD)."""
    config = with_gateway_login(site.config, site.gateway)
    db.upgrade(config.database.url)
    engine = db.make_engine(config.database.url)
    people = seed_demo(engine, config)
    for resident in people.residents:
        Ledger(engine).topup(resident.resident_id, 10_000, f"topup-{resident.resident_id}")
    engine.dispose()
    gateway = Gateway(config)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    started = asyncio.create_task(gateway.started.wait())
    await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert gateway.link is not None
    await asyncio.wait_for(gateway.link.connected.wait(), 10)
    deadline = time.monotonic() + 20
    while not gateway.telemetry_health.report.get("mqtt", {}).get("subscribed"):
        assert not task.done() and time.monotonic() < deadline, "telemetry worker not subscribed"
        await asyncio.sleep(0.05)
    try:
        yield gateway, people
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _token(http: httpx.AsyncClient, people: DemoPeople, role: str) -> dict[str, str]:
    user = next(u for u in people.logins if u["role"] == role)
    answer = await http.post("/api/v1/auth/token", data={"username": user["username"],
                                                         "password": user["password"]})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


async def _latest(http: httpx.AsyncClient, auth: dict[str, str], device_id: str,
                  timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await http.get(f"/api/v1/devices/{device_id}/latest", headers=auth)
        if answer.status_code == 200 and answer.json().get("metrics"):
            body: dict[str, Any] = answer.json()
            return body
        assert time.monotonic() < deadline, (device_id, answer.status_code, answer.text)
        await asyncio.sleep(0.2)


async def test_the_gateway_works_end_to_end_with_its_generated_login(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        site = await stack.enter_async_context(secured_broker("mosquitto", tmp_path))
        await stack.enter_async_context(
            SimulatedUnits([UnitSpec("eastron-sdm630", site.polled_port)]))
        gateway, people = await stack.enter_async_context(secured_gateway(site))
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.api_port}", timeout=10))
        north, south = [
            await stack.enter_async_context(ReaderSimulator(
                site.host, site.port, device, "gate", site.root,
                username=site.device(device).username, password=site.device(device).password))
            for device in ("gate-north", "gate-south")]
        till = await stack.enter_async_context(CanteenTerminal(
            site.host, site.port, "canteen-1", root=site.root,
            username=site.device("canteen-1").username,
            password=site.device("canteen-1").password))
        alice = people.residents[0]

        decision = await north.present("card", alice.cards["gate"])
        assert decision["granted"] and decision["action"] == "unlock", decision
        sale = await till.sell(1500, card_credential(alice.cards["canteen"]))
        assert sale.outcome == "approved", sale

        # The finding: another device forges an unlock and a decision for gate-north.
        assert south._client is not None
        await south._client.publish(site.topic("gate-north", "command"), FORGED, qos=1)
        await south._client.publish(site.topic("gate-north", "access/decision"),
                                    json.dumps({"request_id": "x", "granted": True,
                                                "action": "unlock", "duration_s": 3600}),
                                    qos=1)
        resident = await _token(http, people, "resident")
        unlock = await http.post("/api/v1/gates/gate-north/unlock", headers=resident)
        assert unlock.status_code == 202, unlock.text
        async with asyncio.timeout(5):
            while not any(a.source == "command" for a in north.actuations):
                await asyncio.sleep(0.02)
        assert [(a.source, a.duration_s) for a in north.actuations] == [
            ("decision", decision["duration_s"]), ("command", 5.0)]  # the forged ones: none

        # Telemetry: an MQTT meter's own reading arrives; the polled unit's readings come
        # from the gateway's poller, and a reading forged on its topic never lands.
        engineer = await _token(http, people, "engineer")
        async with site.client(site.device("meter-mqtt")) as meter:
            await meter.publish(site.topic("meter-polled", "telemetry"), json.dumps(
                {"ts": time.time(), "seq": 10**6, "metrics": {"power_w": 9.9e6}}), qos=1)
            await meter.publish(site.topic("meter-mqtt", "telemetry"), json.dumps(
                {"ts": time.time(), "seq": 1, "metrics": {"power_w": 432.1}}), qos=1)
        mqtt_meter = await _latest(http, engineer, "meter-mqtt")
        assert mqtt_meter["metrics"]["power_w"] == 432.1
        polled = await _latest(http, engineer, "meter-polled")
        assert polled["metrics"].get("power_w") != 9.9e6

        # The monitor sees the gateway's own retained status (published with its login).
        async with site.client(site.monitor) as monitor:
            await monitor.subscribe(f"{site.root}/gateway/edge/status", qos=1)
            async with asyncio.timeout(5):
                async for message in monitor.messages:
                    assert isinstance(message.payload, bytes)
                    assert json.loads(message.payload)["online"] is True
                    break


async def test_the_gateway_logs_in_over_tls_with_a_private_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `mqtts://` site: the broker's TLS listener on the site URL's port (certificate of
    a private CA, trusted by the gateway through SSL_CERT_FILE as docs/deploy-mqtt.md says)
    and a plain listener for the simulated readers."""
    require(mosquitto_binary() is not None, "mosquitto")
    require(shutil.which("openssl") is not None, "openssl")
    ca, crt, key = self_signed(tmp_path)
    tls_port, plain_port, root = free_port(), free_port(), f"t{secrets.token_hex(4)}"
    plain = site_config(plain_port, root, f"sqlite:///{tmp_path / 'gw.db'}", free_port())
    config = plain.model_copy(update={"mqtt": plain.mqtt.model_copy(
        update={"url": f"mqtts://127.0.0.1:{tls_port}"})})
    config = config.model_copy(update={"devices": [d for d in config.devices
                                                   if d.profile is None]})
    (tmp_path / "mqtt" / "data").mkdir(parents=True)
    files = write_mqtt_files(config, tmp_path / "mqtt", BrokerSettings(
        port=plain_port, bind="127.0.0.1", tls=TlsFiles(crt, key), tls_port=tls_port,
        persistence_dir=tmp_path / "mqtt" / "data", run_as=pwd.getpwuid(os.getuid()).pw_name))
    site = Site("127.0.0.1", plain_port, root, config, files, "mosquitto", 0)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the gateway and its telemetry worker
    broker = Mosquitto(plain_port, conf_path=files.conf)
    broker.start()
    try:
        async with (
            secured_gateway(site) as (gateway, people),
            ReaderSimulator(site.host, plain_port, "gate-north", "gate", root,
                            username=site.device("gate-north").username,
                            password=site.device("gate-north").password) as reader,
        ):
            assert gateway.link is not None and gateway.link.connected.is_set()
            decision = await reader.present("card", people.residents[0].cards["gate"])
            assert decision["granted"], decision
    finally:
        broker.close()
    log = (files.conf.parent / "mosquitto.log").read_text()
    # The gateway's control session and its telemetry worker both came in through TLS.
    assert log.count(f"on port {tls_port}.") >= 2, log
