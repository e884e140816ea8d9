"""Several gateways on one PostgreSQL database and one VictoriaMetrics (issue 13,
docs/scale.md "Shared PostgreSQL", "Central telemetry", "Uplink down").

The store has no site column: one database is one community's directory and ledger. What a
shared database gives is one community split over several gateways (here building b1 at
gateway "north", b2 at "south", each with its own broker bridged to a central one): the
same residents, cards and purses everywhere, each door still keeping to its own building's
people, and a purse debited exactly once whichever gateway takes the payment. With the
central broker down, each site keeps deciding and serving its own energy series. Both
gateways also write their telemetry, each through its own spool, into one VictoriaMetrics
(the InfluxDB v2 write API), where every reading of both arrives tagged with its site.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.store import db
from simulators.demo.broker import free_port
from simulators.demo.community import BUILDINGS
from simulators.demo.seed import DemoPeople, seed_demo
from tests.influx_servers import VictoriaMetrics, victoria_metrics_server
from tests.servers import Postgres
from tests.test_scale_bridge import (
    ROOT,
    Site,
    central_broker,
    collect,
    make_site,
    started,
)

PURSE_CENTS = 2500


def body(tag: str, building: str, database_url: str, api_port: int, spool: Path,
         influx_url: str) -> str:
    devices = [
        {"device_id": f"door-{building}", "kind": "gate", "building": building},
        {"device_id": f"canteen-{tag}", "kind": "canteen"},
        {"device_id": f"meter-{tag}", "kind": "meter", "building": building},
    ]
    return "\n".join([
        f"buildings: {json.dumps(BUILDINGS)}",
        f"devices: {json.dumps(devices)}",
        f"database: {json.dumps({'url': database_url})}",
        f"api: {json.dumps({'port': api_port})}",
        f"telemetry: {json.dumps({'spool_dir': str(spool)})}",
        "influxdb: " + json.dumps({"url": influx_url, "api": "v2", "org": "group",
                                   "bucket": "scgw"}),
    ]) + "\n"


@contextmanager
def scgw_run(site: Site, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "SCGW__MQTT__PASSWORD": site.logins["gateway"]["password"],
           "SCGW__API__JWT_SECRET": secrets.token_hex(32)}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.app.cli", "run", "--config",
                                 str(site.config_path)], env=env, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def wait_ready(api: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300  # two gateways and their workers start on 2 cores
    async with httpx.AsyncClient(base_url=api, timeout=5) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"scgw run ended ({proc.returncode}): {log.read_text()[-3000:]}")
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    pytest.fail(f"{api} not ready after 300 s: {log.read_text()[-3000:]}")


async def ask(site: Site, device: str, channel: str, payload: dict[str, Any],
              key: str, answer: str, timeout_s: float = 90) -> dict[str, Any]:
    """Publish as `device` and return the gateway's answer on `answer`, retrying (with a new
    id) until the gateway is subscribed; fails at the deadline."""
    base = f"{ROOT}/devices/{device}"
    deadline = time.monotonic() + timeout_s
    async with site.client(device) as client:
        await client.subscribe(f"{base}/{answer}", qos=1)
        while time.monotonic() < deadline:
            await client.publish(f"{base}/{channel}", json.dumps(payload), qos=1)
            try:
                async with asyncio.timeout(5):
                    async for message in client.messages:
                        reply: dict[str, Any] = json.loads(message.payload)
                        if reply.get(key) == payload[key]:
                            return reply
            except TimeoutError:
                if key == "request_id":  # a fresh id; a payment keeps its txn_id (idempotent)
                    payload = {**payload, key: f"r-{secrets.token_hex(4)}"}
    pytest.fail(f"no {answer} from the gateway for {device} within {timeout_s} s")


async def card_at(site: Site, door: str, card: str) -> dict[str, Any]:
    return await ask(site, door, "access/request", {
        "request_id": f"r-{secrets.token_hex(4)}", "ts": time.time(),
        "credential": {"type": "card", "value": card}}, "request_id", "access/decision")


async def pay(site: Site, till: str, txn: str, cents: int, card: str) -> dict[str, Any]:
    return await ask(site, till, "payment/request", {
        "txn_id": txn, "amount_cents": cents, "ts": time.time(),
        "credential": {"type": "card", "value": card}}, "txn_id", "payment/result")


def seed(url: str, site: Site) -> DemoPeople:
    """Migrated and seeded once, before the gateways start (docs/scale.md says why)."""
    db.upgrade(url)
    engine = db.make_engine(url)
    try:

        config = SiteConfig.model_validate(yaml.safe_load(site.config_path.read_text()))
        people = seed_demo(engine, config)
        Ledger(engine).topup("r-alice", PURSE_CENTS, "scale-test-topup")
    finally:
        engine.dispose()
    return people


async def test_two_gateways_one_postgres_one_community(
    tmp_path: Path, postgres: Postgres,
) -> None:
    url = postgres.create_database()
    with central_broker(tmp_path, ["north", "south"]) as central, \
            victoria_metrics_server() as vm:
        ports = {"north": free_port(), "south": free_port()}
        north, south = (
            make_site(tmp_path, tag, central, body=body(
                tag, building, url, ports[tag], tmp_path / f"spool-{tag}", vm.url))
            for tag, building in (("north", "b1"), ("south", "b2")))
        people = seed(url, north)
        alice, bob = people.residents[0], people.residents[1]
        assert (alice.building, bob.building) == ("b1", "b2")
        logs = {tag: tmp_path / f"scgw-{tag}.log" for tag in ports}
        async with started(north, south):
            with scgw_run(north, logs["north"]) as p_north, \
                    scgw_run(south, logs["south"]) as p_south:
                async with central.reader() as reader:
                    await reader.subscribe("sites/+/gateway/+/status", qos=1)
                    await wait_ready(f"http://127.0.0.1:{ports['north']}", p_north,
                                     logs["north"])
                    await wait_ready(f"http://127.0.0.1:{ports['south']}", p_south,
                                     logs["south"])
                    # Both gateways' own status reaches the centre under their prefix.
                    await collect(reader, lambda seen: {
                        "sites/north/gateway/north/status", "sites/south/gateway/south/status"}
                        <= {m.topic.value for m in seen}, 90, "both gateways' status")
                await shared_directory_and_purse(north, south, alice, bob, url)
                await central_telemetry(vm, north, south)
                await uplink_down(central, north, alice, ports["north"], people)


async def shared_directory_and_purse(north: Site, south: Site, alice: Any, bob: Any,
                                     url: str) -> None:
    # One directory: each door admits its building's residents, whichever gateway asks.
    granted = await card_at(north, "door-b1", alice.cards["gate"])
    assert granted["granted"] is True and granted["action"] == "unlock"
    refused = await card_at(south, "door-b2", alice.cards["gate"])
    assert (refused["granted"], refused["reason"]) == (False, "not_permitted")
    assert (await card_at(south, "door-b2", bob.cards["gate"]))["granted"] is True
    # One purse, debited once per payment whichever gateway takes it.
    card = alice.cards["canteen"]
    first = await pay(north, "canteen-north", "t-1", 1000, card)
    assert (first["approved"], first["balance_cents"]) == (True, 1500)
    other = await pay(south, "canteen-south", "t-1", 1000, card)  # another till's t-1
    assert (other["approved"], other["balance_cents"]) == (True, 500)
    again = await pay(north, "canteen-north", "t-1", 1000, card)  # a retry: no new debit
    assert (again["approved"], again["balance_cents"]) == (True, 1500)
    # Both tills at once for more than is left: exactly one is approved.
    both = await asyncio.gather(pay(north, "canteen-north", "t-2", 400, card),
                                pay(south, "canteen-south", "t-2", 400, card))
    assert sorted(r["approved"] for r in both) == [False, True]
    assert [r["reason"] for r in both if not r["approved"]] == ["insufficient_funds"]
    engine = db.make_engine(url)
    try:
        ledger = Ledger(engine)
        assert ledger.balance("r-alice") == 100
        assert ledger.audit() == []
    finally:
        engine.dispose()


async def central_telemetry(vm: VictoriaMetrics, north: Site, south: Site) -> None:
    """Both gateways' readings in one VictoriaMetrics, every one of them, by site."""
    count, start = 300, time.time() - 3600
    for site in (north, south):
        device = f"meter-{site.site_id}"
        async with site.client(device) as meter:
            for first in range(0, count, 50):
                await meter.publish(f"{ROOT}/devices/{device}/telemetry", json.dumps(
                    {"readings": [{"ts": start + seq, "seq": seq,
                                   "metrics": {"power_w": 100.0 + seq}}
                                  for seq in range(first + 1, first + 51)]}), qos=1)

    def seqs() -> dict[tuple[str, str], list[int]]:
        found: dict[tuple[str, str], set[int]] = {}
        for series in vm.export('{__name__="telemetry_seq"}'):
            labels = series["metric"]
            found.setdefault((labels["site"], labels["device_id"]), set()).update(
                int(v) for v in series["values"])
        return {key: sorted(values) for key, values in found.items()}

    expected = {("north", "meter-north"): list(range(1, count + 1)),
                ("south", "meter-south"): list(range(1, count + 1))}
    deadline = time.monotonic() + 120
    while (found := await asyncio.to_thread(seqs)) != expected:
        assert time.monotonic() < deadline, f"VictoriaMetrics has {found}, not every reading"
        await asyncio.sleep(0.5)


async def uplink_down(central: Any, north: Site, alice: Any, api_port: int,
                      people: DemoPeople) -> None:
    """The central broker stopped: access and the local energy series carry on."""
    central.broker.stop()
    granted = await card_at(north, "door-b1", alice.cards["gate"])
    assert granted["granted"] is True
    minute = (time.time() // 60) * 60
    async with north.client("meter-north") as meter:
        await meter.publish(f"{ROOT}/devices/meter-north/telemetry", json.dumps(
            {"readings": [{"ts": minute + i, "seq": 10_001 + i,
                           "metrics": {"power_w": 500.0 + i}} for i in range(3)]}), qos=1)
    engineer = next(u for u in people.logins if u["role"] == "engineer")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
        token = (await http.post("/api/v1/auth/token", data={
            "username": engineer["username"], "password": engineer["password"]})).json()
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        params = {"device_id": "meter-north", "metric": "power_w", "start": minute,
                  "end": minute + 60, "step": 60}
        deadline = time.monotonic() + 60
        while True:
            answer = await http.get("/api/v1/energy/series", headers=auth, params=params)
            assert answer.status_code == 200, answer.text
            points = answer.json()["points"]
            if points and points[0]["count"] == 3:
                break
            assert time.monotonic() < deadline, f"local series never showed 3 readings: {points}"
            await asyncio.sleep(0.2)
        assert points[0]["max"] == 502.0
    # What the bridge queued meanwhile arrives once the centre is back: test_scale_bridge.py.
