"""`scgw simulate` against a real Mosquitto running `scgw mqtt-config`'s logins and ACL, and
a running gateway: an hour and a half of a small community's morning at 600x.

The gate rush gets granted decisions, lunch is paid for (online, and offline while the
terminal is off the network, uploaded as a batch), staff top purses up, readings land in
the store, the scheduled faults raise their alerts,
and the same seed publishes the same messages. A bad scenario file is refused with every
problem at its line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
from sqlalchemy import Engine
from typer.testing import CliRunner

from gateway.app.cli import app
from gateway.app.mqtt_config import Written
from gateway.app.runtime import Gateway
from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.store import db
from gateway.store.users import Role, create_user
from simulators.demo.broker import Mosquitto, free_port, mosquitto_binary
from simulators.demo.community import broker_files, with_gateway_login
from simulators.demo.seed import DemoPeople, seed_community
from simulators.phone import SimulatedPhone
from simulators.simulate.devices import Logins
from simulators.simulate.plan import resolve_start
from simulators.simulate.runner import Simulation, Stats
from simulators.simulate.site import residents, site_dict
from simulators.simulate.spec import Spec, SpecError, loads_spec
from simulators.simulate.staff import staff_topups
from tests.servers import require

SCENARIO = """\
name: morning
seed: {seed}
timezone: Asia/Shanghai
start: "07:00"
duration: 90m
root: {root}
buildings:
  - id: b1
    floors: 6
    basements: 1
    units_per_floor: 2
    residents_per_unit: 2
    elevators: 1
    energy: {{households: 10, residential_submeters: 1, hvac: [lobby], fresh_air: 1,
             air_purifiers: 0}}
gates: [{{id: gate-north}}, {{id: gate-south}}]
canteen:
  terminals: 1
  meals: ["07:10-07:30", "07:44-07:56"]
  diners: 0.6
  opening_balance_cents: 3000
  topup_below_cents: 2000
  topup_cents: 5000
rhythm: {{morning_rush: "07:05-08:30", outings_per_day: 0, phone_share: 0.5}}
energy: {{reporting: {{interval: 60s, jitter: 2s, loss: 0}}}}
faults:
  - {{type: door_forced, device: gate-north, at: "+10m"}}
  - {{type: spike, device: hvac-b1-lobby, at: "+30m", duration: 10m, magnitude: 6}}
  - {{type: terminal_offline, device: canteen-1, at: "07:40", duration: 18m}}
"""
DEVICE_CHANNELS = ("status", "access/request", "payment/request", "payment/batch",
                   "telemetry", "event")


@dataclass
class Site:
    spec: Spec
    config: SiteConfig
    files: Written
    gateway: Gateway
    people: DemoPeople
    phones: dict[str, SimulatedPhone]
    engine: Engine

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.gateway.api_port}"

    def logins(self) -> Logins:
        return Logins.from_json(json.loads(self.files.credentials.to_json()))


def _staff_logins(engine: Engine) -> DemoPeople:
    """A staff member (top-ups) and an engineer (readings, alerts), random passwords."""
    logins = []
    with engine.begin() as conn:
        for username, role in (("staff", Role.STAFF), ("engineer", Role.ENGINEER)):
            password = secrets.token_urlsafe(12)
            create_user(conn, username, password, role)
            logins.append({"username": username, "password": password, "role": role.value})
    return DemoPeople([], logins)


@contextlib.asynccontextmanager
async def running_site(tmp_path: Path) -> AsyncIterator[Site]:
    """Broker with the generated logins, the scenario's residents seeded, the gateway up."""
    require(mosquitto_binary() is not None, "mosquitto")
    root = f"t{secrets.token_hex(4)}"
    spec = loads_spec(SCENARIO.format(seed=5, root=root), "morning")
    port, db_url = free_port(), f"sqlite:///{tmp_path / 'gw.db'}"
    config = SiteConfig.model_validate({
        "site": {"id": "sim", "timezone": spec.timezone},
        "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "root": root, "username": "gw-sim",
                 "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
        "database": {"url": db_url},
        "api": {"port": 0, "jwt_secret": secrets.token_hex(32)},
        **site_dict(spec),
    })
    files = await asyncio.to_thread(broker_files, config, tmp_path / "mqtt")
    config = with_gateway_login(config, files.credentials.gateway)
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    people = _staff_logins(engine)
    phones = seed_community(engine, config, residents(spec),
                            spec.canteen.opening_balance_cents)
    broker = Mosquitto(port, conf_path=files.conf)
    broker.start()
    gateway = Gateway(config)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        started = asyncio.create_task(gateway.started.wait())
        await asyncio.wait({task, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        deadline = time.monotonic() + 30
        while not gateway.telemetry_health.report.get("mqtt", {}).get("subscribed"):
            assert not task.done() and time.monotonic() < deadline, "telemetry not subscribed"
            await asyncio.sleep(0.05)
        yield Site(spec, config, files, gateway, people, phones, engine)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        engine.dispose()
        broker.close()


def _normalised(topic: str, payload: bytes) -> str:
    """A published message without what must differ between runs: ids chosen per session,
    the one-time QR codes, and the wall-clock time of offline sales."""
    data: Any = json.loads(payload)

    def scrub(item: Any) -> Any:
        if isinstance(item, dict):
            out = {k: scrub(v) for k, v in item.items()
                   if k not in ("request_id", "txn_id", "batch_id")}
            if item.get("type") == "qr":
                out["value"] = "<qr>"
            return out
        if isinstance(item, list):
            return [scrub(i) for i in item]
        return item

    data = scrub(data)
    if topic.endswith("/payment/batch"):
        for item in data["payments"]:
            item.pop("ts")
    return f"{topic} {json.dumps(data, sort_keys=True)}"


async def _recorded_run(site: Site, start: float, topup: Any) -> tuple[Stats, Counter[str]]:
    """One run, with every message the devices publish recorded by the monitor login."""
    root = site.spec.root
    user, password = site.logins().monitor or ("", "")
    seen: Counter[str] = Counter()
    async with aiomqtt.Client("127.0.0.1", site.config.mqtt.port, username=user,
                              password=password) as monitor:
        await monitor.subscribe(f"{root}/devices/#", qos=1)

        async def record() -> None:
            async for message in monitor.messages:
                channel = message.topic.value.split("/", 3)[3]
                if channel in DEVICE_CHANNELS and not message.retain:
                    assert isinstance(message.payload, bytes)
                    seen[_normalised(message.topic.value, message.payload)] += 1

        recorder = asyncio.create_task(record())
        sim = Simulation(site.spec, "127.0.0.1", site.config.mqtt.port, site.logins(),
                         speed=600.0, start=start, phones=site.phones, topup=topup)
        stats = await asyncio.wait_for(sim.run(), 120)
        await asyncio.sleep(1.0)  # the broker's last deliveries to the recorder
        recorder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recorder
    return stats, seen


async def _engineer(http: httpx.AsyncClient, people: DemoPeople) -> dict[str, str]:
    user = next(u for u in people.logins if u["role"] == "engineer")
    answer = await http.post("/api/v1/auth/token", data={"username": user["username"],
                                                         "password": user["password"]})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


async def _eventually(http: httpx.AsyncClient, auth: dict[str, str], path: str,
                      check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await http.get(path, headers=auth)
        if answer.status_code == 200 and check(answer.json()):
            return answer.json()
        assert time.monotonic() < deadline, (path, answer.status_code, answer.text[:2000])
        await asyncio.sleep(0.5)


async def test_a_simulated_morning_against_a_gateway(tmp_path: Path) -> None:
    async with running_site(tmp_path) as site:
        staff = next(u for u in site.people.logins if u["role"] == "staff")
        start = resolve_start(site.spec, time.time(), site.spec.duration_s)
        async with staff_topups(site.api, staff["username"], staff["password"]) as topup:
            first, seen_first = await _recorded_run(site, start, topup)

            # the morning rush: residents through gates and elevators, all of them let in
            assert first.decisions["granted"] >= 20, first
            assert first.decisions["denied"] == 0, first.denials
            assert first.published["access/request"] == first.decisions["granted"]
            # lunch: paid online, sold offline while the terminal was away and uploaded
            assert first.payments["approved"] >= 5, first.payments
            assert first.payments["offline_accepted"] >= 1, first.payments
            assert first.batch["approved"] >= 1, first.batch
            assert first.topups >= 1 and not first.errors, (first.topups, first.errors)
            crowd = residents(site.spec)
            ledger = Ledger(site.engine)
            debited = (len(crowd) * site.spec.canteen.opening_balance_cents + first.topup_cents
                       - sum(ledger.balance(r.resident_id) for r in crowd))
            assert debited >= first.spent_cents > 0

            async with httpx.AsyncClient(base_url=site.api, timeout=15) as http:
                auth = await _engineer(http, site.people)
                for device in ("meter-b1-main", "hvac-b1-lobby", "fa-b1-1"):
                    await _eventually(http, auth, f"/api/v1/devices/{device}/latest",
                                      lambda body: bool(body.get("metrics")))
                rules = {"gate-north": "door-forced", "hvac-b1-lobby": "hvac-power-implausible"}
                for device, rule in rules.items():
                    await _eventually(http, auth, f"/api/v1/alerts?device_id={device}",
                                      lambda alerts, rule=rule: any(
                                          a["rule_id"] == rule for a in alerts))

            # the same seed again: the same messages, in the same simulated time
            second, seen_second = await _recorded_run(site, start, topup)
        assert first.events == second.events
        # a request the gateway was slow to answer is sent again with the same txn_id (the
        # terminal's protocol, not the scenario): compare the distinct messages
        assert set(seen_first) == set(seen_second)
        assert sum(seen_first.values()) > 500


def test_a_bad_scenario_is_refused_with_every_problem_at_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "seed: 1\n"
        "timezone: Mars/Olympus\n"  # 2
        "buildings:\n"
        "  - id: b1\n"
        "    floors: many\n"  # 5
        "    elevators: 1\n"
        "gates: [{id: gate-north}]\n"
        "canteen: {meals: [\"25:00-26:00\"]}\n"  # 8
        "faults:\n"
        "  - {type: door_forced, device: gate-north, at: soon}\n"  # 10
        "  - {type: lightning, device: gate-north, at: +5m}\n"  # 11
        "colour: blue\n")  # 12
    try:
        loads_spec(bad.read_text(), str(bad))
    except SpecError as exc:
        problems = exc.problems
    else:
        raise AssertionError("the scenario was accepted")
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == [2, 5, 8, 10, 11, 12], problems
    assert all(p.startswith(f"{bad}:") for p in problems)
    assert "Mars/Olympus" in problems[0] and "floors" in problems[1]
    assert "lightning" in problems[4] and "colour" in problems[5]

    # a fault aimed at a device the scenario does not have
    with contextlib.suppress(SpecError):
        loads_spec("buildings: [{id: b1}]\ngates: [{id: g1}]\nfaults:\n"
                   "  - {type: spike, device: hvac-x, at: +1m}\n", "x.yaml")
        raise AssertionError("accepted a spike on a device that does not exist")

    result = CliRunner().invoke(app, ["simulate", "--scenario", str(bad), "--check"])
    assert result.exit_code == 2
    assert f"{bad}:5: buildings[0].floors" in result.output


def test_the_timeline_is_the_seeds() -> None:
    """Same seed, same events and readings; another seed, another day (no broker needed)."""
    from dataclasses import replace

    from simulators.faults import generate
    from simulators.simulate.plan import Planner, fault_starts
    from simulators.simulate.site import energy_scenario

    spec = loads_spec(SCENARIO.format(seed=5, root="t"), "morning")
    start = resolve_start(spec, time.time(), spec.duration_s)
    end = start + (spec.duration_s or 0.0)

    def timeline(s: Spec) -> tuple[list[Any], list[Any]]:
        events = [e.describe() for e in Planner(s, residents(s), True).events(start, end)]
        scenario = energy_scenario(s, start, end - start, fault_starts(s, start))
        assert scenario is not None
        readings = [(r.device_id, r.ts, r.seq, dict(r.metrics)) for r in generate(scenario)]
        return events, readings

    first, again = timeline(spec), timeline(spec)
    assert first == again and len(first[0]) > 30 and len(first[1]) > 300
    other = timeline(replace(spec, seed=6))
    assert other[0] != first[0] and other[1] != first[1]
    assert all(start <= e[0] < end for e in first[0])
