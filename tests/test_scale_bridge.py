"""Past one machine (issue 13, docs/scale.md): two site Mosquittos running the files of
`scgw mqtt-config --bridge-to` (logins and ACL on) bridged to a third, central Mosquitto.

The centre sees both sites' alerts, telemetry and status under `sites/{site}/`, never an
access request, a decision, a payment or a command; with the central broker stopped the
sites keep working and their messages wait, arriving once it is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from typer.testing import CliRunner

from gateway.app.cli import app
from gateway.app.mqtt_config import hash_password
from simulators.demo.broker import Mosquitto, free_port, mosquitto_binary
from tests.servers import require

ROOT = "scgw"  # every site keeps the default root: the prefix tells them apart centrally
SITE = """\
site: {{id: {site}}}
mqtt: {{url: "mqtt://127.0.0.1:{port}", root: {root}, username: gw}}
{body}"""
BODY = """\
buildings:
  - {id: b1, floors: [{number: 1}, {number: 2}]}
devices:
  - {device_id: gate-1, kind: gate}
  - {device_id: canteen-1, kind: canteen}
  - {device_id: meter-1, kind: meter}
"""
CENTRAL_SECRET = "central-reader-secret"  # test-only broker, loopback


def _run_as() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def mqtt_config(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["mqtt-config", *map(str, args)],
                                env={"SCGW__MQTT__PASSWORD": None,
                                     "SCGW_BRIDGE_PASSWORD": None})
    return result.exit_code, result.output


@dataclass
class Central:
    broker: Mosquitto
    passwords: dict[str, str]  # site id -> the site's central password

    @property
    def port(self) -> int:
        return self.broker.port

    def reader(self, identifier: str = "central-reader") -> aiomqtt.Client:
        """A persistent QoS 1 session: what arrives while it is away waits for it."""
        return aiomqtt.Client("127.0.0.1", self.port, username="central-reader",
                              password=CENTRAL_SECRET, identifier=identifier,
                              clean_session=False)


@contextmanager
def central_broker(tmp_path: Path, sites: list[str]) -> Iterator[Central]:
    """Any MQTT broker would do; a Mosquitto with logins, each site confined to its prefix."""
    require(mosquitto_binary() is not None, "mosquitto")
    work = tmp_path / "central"
    (work / "data").mkdir(parents=True)
    passwords = {site: f"pw-{site}-{os.urandom(6).hex()}" for site in sites}
    (work / "passwd").write_text(
        "".join(f"site-{s}:{hash_password(p)}\n" for s, p in passwords.items())
        + f"central-reader:{hash_password(CENTRAL_SECRET)}\n")
    (work / "acl").write_text(
        "".join(f"user site-{s}\ntopic write sites/{s}/#\n" for s in sites)
        + "user central-reader\ntopic read sites/#\n")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {work / 'passwd'}\nacl_file {work / 'acl'}\n"
                    "set_tcp_nodelay true\npersistence true\n"
                    f"persistence_location {work / 'data'}/\nuser {_run_as()}\n"
                    "log_dest stderr\nlog_type error\nlog_type warning\n")
    broker = Mosquitto(port, conf_path=conf)
    broker.start()
    try:
        yield Central(broker, passwords)
    finally:
        broker.close()


@dataclass
class Site:
    site_id: str
    broker: Mosquitto
    out: Path
    config_path: Path
    logins: dict[str, Any]

    def client(self, who: str, **kwargs: Any) -> aiomqtt.Client:
        login = (self.logins["gateway"] if who == "gateway"
                 else self.logins["monitor"] if who == "monitor"
                 else self.logins["devices"][who])
        return aiomqtt.Client("127.0.0.1", self.broker.port, username=login["username"],
                              password=login["password"], **kwargs)


def make_site(tmp_path: Path, site_id: str, central: Central | tuple[int, str], *,
              body: str = BODY, port: int | None = None) -> Site:
    """`scgw mqtt-config --bridge-to` for one site; its broker not yet started."""
    require(mosquitto_binary() is not None, "mosquitto")
    work = tmp_path / site_id
    (work / "data").mkdir(parents=True)
    port = port or free_port()
    config_path = work / "site.yaml"
    config_path.write_text(SITE.format(site=site_id, port=port, root=ROOT, body=body))
    central_port, password = ((central.port, central.passwords[site_id])
                              if isinstance(central, Central) else central)
    secret = work / "central-password"
    secret.write_text(password + "\n")
    out = work / "mqtt"
    code, output = mqtt_config(
        "--config", config_path, "--out", out, "--bind", "127.0.0.1",
        "--persistence-dir", work / "data", "--bridge-to", f"127.0.0.1:{central_port}",
        "--bridge-username", f"site-{site_id}", "--bridge-password-file", secret,
        "--bridge-backoff", "1:2")
    assert code == 0, output
    assert password not in output  # never on the terminal
    conf = out / "mosquitto.conf"
    conf.write_text(f"user {_run_as()}\n" + conf.read_text())  # tests run as root
    logins = json.loads((out / "credentials.json").read_text())
    return Site(site_id, Mosquitto(port, conf_path=conf), out, config_path, logins)


@asynccontextmanager
async def started(*sites: Site) -> AsyncIterator[None]:
    for site in sites:
        site.broker.start()
    try:
        yield
    finally:
        for site in sites:
            site.broker.close()


async def collect(client: aiomqtt.Client, until: Any, timeout_s: float,
                  what: str) -> list[aiomqtt.Message]:
    """Messages on `client` until `until(seen)` is true; fails naming `what` at the deadline."""
    seen: list[aiomqtt.Message] = []
    try:
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                seen.append(message)
                if until(seen):
                    return seen
    except TimeoutError:
        pass
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}; saw "
                f"{sorted({m.topic.value for m in seen})}")


def topics(seen: list[aiomqtt.Message]) -> set[str]:
    return {m.topic.value for m in seen}


def bridges_up(*site_ids: str) -> Any:
    wanted = {f"sites/{s}/bridge/state" for s in site_ids}
    return lambda seen: wanted <= {m.topic.value for m in seen if m.payload == b"1"}


def test_the_generated_bridge_file(tmp_path: Path) -> None:
    """Out only, per-site prefix, persistent session, password kept out of mosquitto.conf,
    and the site's ACL lets the bridge read exactly what it forwards."""
    site = make_site(tmp_path, "north", (18830, "pw-north"))
    site.broker.close()  # never started: only its files are looked at
    bridge = (site.out / "bridge.d" / "bridge.conf").read_text()
    assert stat.S_IMODE((site.out / "bridge.d" / "bridge.conf").stat().st_mode) == 0o640
    assert "pw-north" not in (site.out / "mosquitto.conf").read_text()
    assert f"include_dir {site.out / 'bridge.d'}" in (site.out / "mosquitto.conf").read_text()
    lines = bridge.splitlines()
    assert "address 127.0.0.1:18830" in lines and "remote_password pw-north" in lines
    assert "cleansession false" in lines and "remote_username site-north" in lines
    bridged = [line.split() for line in lines if line.startswith("topic ")]
    assert all(t[2:] == ["out", "1", "scgw/", "sites/north/"] for t in bridged)
    assert {t[1] for t in bridged} == {
        "alerts/#", "devices/+/telemetry", "devices/+/status", "gateway/north/status",
        "gateway/north/telemetry", "gateway/north/polled/+"}
    acl = (site.out / "acl").read_text()
    assert "user scgw-bridge\ntopic read scgw/alerts/#\n" in acl
    assert "access" not in acl.split("user scgw-bridge")[1]
    # Regenerating without a bridge removes it; bad options are refused with exit 2.
    code, output = mqtt_config("--config", site.config_path, "--out", site.out)
    assert code == 0 and "no longer bridges" in output, output
    assert not (site.out / "bridge.d" / "bridge.conf").exists()
    assert "include_dir" not in (site.out / "mosquitto.conf").read_text()
    for bad in (["--bridge-to", "nowhere"], ["--bridge-to", "h:1883"],
                ["--bridge-username", "x"],
                ["--bridge-to", "h:1883", "--bridge-username", "x",
                 "--bridge-password-file", tmp_path / "missing"]):
        code, output = mqtt_config("--config", site.config_path, "--out", site.out, *bad)
        assert code == 2 and "bridge" in output, (bad, output)


async def test_two_sites_bridge_alerts_and_telemetry_but_no_access_or_payments(
    tmp_path: Path,
) -> None:
    with central_broker(tmp_path, ["north", "south"]) as central:
        north = make_site(tmp_path, "north", central)
        south = make_site(tmp_path, "south", central)
        async with central.reader("reader-1") as reader:
            await reader.subscribe("sites/#", qos=1)
            async with started(north, south):
                await collect(reader, bridges_up("north", "south"), 60, "both bridges up")
                for site in (north, south):
                    await publish_a_bit_of_everything(site)
                wanted = {f"sites/{s}/{t}" for s in ("north", "south") for t in (
                    "alerts/after_hours/meter-1", "devices/meter-1/telemetry",
                    "devices/gate-1/status", f"gateway/{s}/status")}
                # Telemetry seq 2 is published last at each site: once it is here, anything
                # that was going to leak has had its chance (one bridge, in order).
                last = {f"sites/{s}/devices/meter-1/telemetry" for s in ("north", "south")}
                seen = await collect(
                    reader, lambda seen: wanted <= topics(seen) and all(
                        any(m.topic.value == t and json.loads(m.payload)["seq"] == 2
                            for m in seen) for t in last),
                    60, "both sites' alerts, telemetry and status")
        leaked = [t for t in topics(seen) if any(word in t for word in (
            "access", "payment", "command", "event"))]
        assert leaked == []
        by_topic = {m.topic.value: json.loads(m.payload) for m in seen
                    if m.topic.value.endswith("alerts/after_hours/meter-1")}
        assert by_topic["sites/north/alerts/after_hours/meter-1"]["site"] == "north"
        assert by_topic["sites/south/alerts/after_hours/meter-1"]["site"] == "south"


async def publish_a_bit_of_everything(site: Site) -> None:
    """What a site's devices and gateway say, secrets included; telemetry seq 2 goes last."""
    async with (site.client("gateway") as gateway, site.client("gate-1") as gate,
                site.client("canteen-1") as till, site.client("meter-1") as meter):
        base = f"{ROOT}/devices"
        await gate.publish(f"{base}/gate-1/status", b'{"online": true}', qos=1, retain=True)
        await meter.publish(f"{base}/meter-1/telemetry", json.dumps(
            {"ts": 1.0, "seq": 1, "metrics": {"power_w": 10.0}}), qos=1)
        await gate.publish(f"{base}/gate-1/access/request", json.dumps(
            {"request_id": "r-1", "credential": {"type": "card", "value": "CARD-SECRET"},
             "ts": 1.0}), qos=1)
        await till.publish(f"{base}/canteen-1/payment/request", json.dumps(
            {"txn_id": "t-1", "amount_cents": 100,
             "credential": {"type": "qr", "value": "QR-SECRET"}, "ts": 1.0}), qos=1)
        await meter.publish(f"{base}/meter-1/event", b'{"type": "tamper", "ts": 1.0}', qos=1)
        await gateway.publish(f"{base}/gate-1/access/decision", b'{"request_id": "r-1"}', qos=1)
        await gateway.publish(f"{base}/canteen-1/payment/result", b'{"txn_id": "t-1"}', qos=1)
        await gateway.publish(f"{base}/gate-1/command", b'{"action": "unlock"}', qos=1)
        await gateway.publish(f"{ROOT}/gateway/{site.site_id}/status", b'{"online": true}',
                              qos=1, retain=True)
        await gateway.publish(f"{ROOT}/alerts/after_hours/meter-1", json.dumps(
            {"rule_id": "after_hours", "device_id": "meter-1", "state": "firing",
             "site": site.site_id}), qos=1)
        await meter.publish(f"{base}/meter-1/telemetry", json.dumps(
            {"ts": 2.0, "seq": 2, "metrics": {"power_w": 11.0}}), qos=1)


async def test_with_the_central_broker_down_messages_wait_and_arrive_after(
    tmp_path: Path,
) -> None:
    """The uplink cut: the site broker keeps serving its devices, queues what the bridge
    could not send (persistent session, QoS 1), and delivers it when the centre returns."""
    count = 50
    with central_broker(tmp_path, ["north"]) as central:
        north = make_site(tmp_path, "north", central)
        async with started(north):
            async with central.reader() as reader:  # a persistent session, then away
                await reader.subscribe("sites/#", qos=1)
                await collect(reader, bridges_up("north"), 60, "the bridge up")
            central.broker.stop()  # the uplink is cut
            async with (north.client("meter-1") as meter, north.client("monitor") as local,
                        north.client("gateway") as gateway):
                await local.subscribe(f"{ROOT}/#", qos=1)
                for seq in range(1, count + 1):
                    await meter.publish(f"{ROOT}/devices/meter-1/telemetry", json.dumps(
                        {"ts": float(seq), "seq": seq, "metrics": {"power_w": 1.0}}), qos=1)
                await gateway.publish(f"{ROOT}/alerts/stuck/meter-1", b'{"state": "firing"}',
                                      qos=1)
                # Locally nothing changed: the site's own subscribers get everything at once.
                await collect(local, lambda seen: f"{ROOT}/alerts/stuck/meter-1" in topics(seen),
                              30, "local delivery with the uplink down")
            central.broker.start()
            async with central.reader() as reader:
                seen = await collect(reader, lambda seen: "sites/north/alerts/stuck/meter-1"
                                     in topics(seen) and len(readings(seen)) == count,
                                     120, f"the {count} queued readings and the alert")
    assert readings(seen) == list(range(1, count + 1))  # all of them, once, in order


def readings(seen: list[aiomqtt.Message]) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in seen
            if m.topic.value == "sites/north/devices/meter-1/telemetry"]
