"""Issue 11 through real `scgw run` processes: a token opens once, everywhere, for good.

Each test runs the gateway as the operator does (`python -m gateway.app.cli run`), kills it
with SIGKILL (its whole process group, the telemetry worker included, as systemd would) or
runs two of them on one PostgreSQL, and talks to it over a real Mosquitto as readers and
canteen terminals do:

- a QR used at a gate, an elevator or the canteen is refused on every other path (gate,
  elevator, canteen online, offline batch) after a kill -9 and by the other process;
- a visitor pass with `max_uses` is granted exactly that often, across a kill -9 and with
  two processes racing for it;
- every decision a reader was answered before the kill -9 is in the audit log, and
  `scgw audit verify` finds no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from device_drivers.mqtt import NO_DELAY
from device_drivers.tokens import mint_qr
from device_drivers.vocabulary import Credential
from gateway.access.audit import audit_log
from gateway.app.cli_audit import app as audit_app
from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.store import db
from gateway.store import directory as d
from simulators.canteen import CanteenTerminal
from simulators.demo.broker import Mosquitto
from simulators.demo.community import BUILDINGS, READERS
from simulators.demo.seed import DemoPeople, DemoResident, seed_demo
from simulators.readers import ReaderSimulator
from tests.servers import Postgres

ROOT_DIR = Path(__file__).resolve().parents[1]


@dataclass
class Community:
    broker: Mosquitto
    work: Path
    db_url: str
    people: DemoPeople

    @property
    def alice(self) -> DemoResident:
        return self.people.residents[0]

    def qr(self, now: float | None = None) -> str:
        return mint_qr(self.alice.credential_id, self.alice.secret,
                       time.time() if now is None else now)

    def site(self, root: str, name: str) -> dict[str, Any]:
        return {
            "site": {"id": "trust"},
            "mqtt": {"url": self.broker.url, "root": root, "reconnect_min_s": 0.05,
                     "reconnect_max_s": 0.5},
            "database": {"url": self.db_url},
            "api": {"enabled": False},
            "telemetry": {"spool_dir": str(self.work / f"spool-{name}")},
            "buildings": BUILDINGS,
            "devices": READERS,
        }

    def visitor_pass(self, max_uses: int) -> tuple[str, bytes]:
        """A pass for the perimeter gates: (credential id, secret) to mint its QR codes."""
        engine = db.make_engine(self.db_url)
        try:
            with engine.begin() as conn:
                now = time.time()
                issued = d.issue_visitor_pass(conn, self.alice.resident_id, "Dana", now - 60,
                                              now + 3600, max_uses=max_uses)
        finally:
            engine.dispose()
        return issued.visitor_pass.credential_id, issued.secret


def community(broker: Mosquitto, work: Path, db_url: str) -> Community:
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    try:
        site = SiteConfig.model_validate({"site": {"id": "trust"}, "database": {"url": db_url},
                                          "buildings": BUILDINGS, "devices": READERS})
        people = seed_demo(engine, site)
        Ledger(engine).topup(people.residents[0].resident_id, 50_000, "trust-topup-1")
    finally:
        engine.dispose()
    return Community(broker, work, db_url, people)


class GatewayProcess:
    """`scgw run` in its own process group, so a kill -9 takes its telemetry worker too."""

    def __init__(self, town: Community, root: str, name: str) -> None:
        self.town, self.root, self.name = town, root, name
        self.config_path = town.work / f"site-{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(town.site(root, name)))
        self.log_path = town.work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.answered: list[str] = []  # request ids of the decisions readers got

    async def start(self) -> None:
        env = {**os.environ, "SCGW__API__JWT_SECRET": secrets.token_hex(32)}
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.app.cli", "run", "--config",
                 str(self.config_path)],
                env=env, cwd=ROOT_DIR, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 30
        card = self.town.alice.cards["gate"]
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_tail()}")
            try:
                decision = await self.present("gate-north", "gate", "card", card, timeout=0.3)
                assert decision["granted"], decision
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{self.name} never answered: {self.log_tail()}") from None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def present(self, device: str, kind: str, ctype: str, value: str,
                      timeout: float = 5.0) -> dict[str, Any]:
        broker = self.town.broker
        async with ReaderSimulator(broker.host, broker.port, device, kind, self.root) as reader:
            decision = await reader.present(ctype, value, timeout_s=timeout)
        self.answered.append(str(decision["request_id"]))
        return decision

    async def pay(self, qr: str, amount: int = 500) -> dict[str, Any]:
        broker = self.town.broker
        async with CanteenTerminal(broker.host, broker.port, "canteen-1", root=self.root,
                                   timeout_s=5.0, attempts=1) as till:
            sale = await till.sell(amount, lambda: Credential("qr", qr))
        assert sale.result is not None, f"no answer: {self.log_tail()}"
        return sale.result

    async def upload(self, items: Sequence[tuple[str, str, float]],
                     amount: int = 300) -> dict[str, dict[str, Any]]:
        """An offline batch from canteen-1: (txn_id, qr, ts) each; the results by txn_id."""
        return await upload(self.town.broker, self.root, items, amount)

    def kill9(self) -> None:
        assert self.proc is not None
        workers = _children(self.proc.pid)
        assert workers, "the gateway runs a telemetry worker"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        # The worker runs in a process group of its own (a terminal's Ctrl-C is the gateway's), so
        # the kill above missed it: Linux tells it its gateway died, and it ends.
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"orphaned telemetry worker {workers}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


async def upload(broker: Mosquitto, root: str, items: Sequence[tuple[str, str, float]],
                 amount: int = 300, terminal: str = "canteen-1") -> dict[str, dict[str, Any]]:
    batch_id = f"b-{secrets.token_hex(4)}"
    payload = {"batch_id": batch_id, "payments": [
        {"txn_id": txn, "amount_cents": amount, "credential": {"type": "qr", "value": qr},
         "ts": ts} for txn, qr, ts in items]}
    topic = f"{root}/devices/{terminal}/payment"
    async with aiomqtt.Client(broker.host, broker.port, socket_options=NO_DELAY) as client:
        await client.subscribe(f"{topic}/batch_result", qos=1)
        await client.publish(f"{topic}/batch", json.dumps(payload), qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                answer = json.loads(message.payload)
                if answer.get("batch_id") == batch_id:
                    return {r["txn_id"]: r for r in answer["results"]}
    raise AssertionError("no batch result")


async def say_offline(broker: Mosquitto, root: str, terminal: str = "canteen-1") -> None:
    """The terminal's last will, as the broker publishes it when the terminal's link drops."""
    async with aiomqtt.Client(broker.host, broker.port) as will:
        await will.publish(f"{root}/devices/{terminal}/status", b'{"online": false}', qos=1,
                           retain=True)


@contextlib.asynccontextmanager
async def running(town: Community, root: str, name: str) -> AsyncIterator[GatewayProcess]:
    gateway = GatewayProcess(town, root, name)
    try:
        await gateway.start()
        yield gateway
    finally:
        gateway.stop()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def audited_request_ids(db_url: str) -> set[str]:
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(audit_log.c.request_id)).scalars())
    finally:
        engine.dispose()


def verify_cli(config_path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(audit_app, ["verify", "--config", str(config_path)])
    return result.exit_code, result.output


async def test_after_kill_9_a_spent_token_is_refused_on_every_path_and_nothing_is_unaudited(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    town = community(mosquitto, tmp_path, f"sqlite:///{tmp_path / 'gw.db'}")
    root = f"k{secrets.token_hex(3)}"
    pass_id, pass_secret = town.visitor_pass(max_uses=2)
    at_gate, at_till, at_car = town.qr(), town.qr(), town.qr()
    first = GatewayProcess(town, root, "first")
    try:
        await first.start()
        assert (await first.present("gate-north", "gate", "qr", at_gate))["granted"]
        assert (await first.pay(at_till))["approved"]
        assert (await first.present("elev-b1-1", "elevator", "qr", at_car))["granted"]
        visitor = await first.present("gate-north", "gate", "qr",
                                      mint_qr(pass_id, pass_secret, time.time()))
        assert visitor["granted"]
        first.kill9()  # at once: nothing gets a chance to be flushed on the way out
    finally:
        first.stop()
    answered = set(first.answered)
    # Every decision a reader was told is in the log, written before it was sent.
    assert answered <= audited_request_ids(town.db_url)

    async with running(town, root, "second") as second:
        for device, kind in (("gate-south", "gate"), ("elev-b1-1", "elevator")):
            again = await second.present(device, kind, "qr", at_gate)
            assert (again["granted"], again["reason"]) == (False, "replayed_token")
        assert (await second.pay(at_gate))["reason"] == "replayed_token"
        # Spent at the till before the crash: it does not open a gate after it.
        assert (await second.present("gate-north", "gate", "qr", at_till))["reason"] == (
            "replayed_token")
        # An offline upload dated while no gateway was up (a believable window) brings the
        # spent tokens back under new txn ids: refused, not debited.
        sold = time.time() - 5
        results = await second.upload([("o-gate", at_gate, sold), ("o-car", at_car, sold)])
        assert {t: (r["approved"], r["reason"]) for t, r in results.items()} == {
            "o-gate": (False, "replayed_token"), "o-car": (False, "replayed_token")}
        # The visitor pass had 2 uses; one was spent before the kill.
        grants = [(await second.present("gate-south", "gate", "qr",
                                        mint_qr(pass_id, pass_secret, time.time())))["granted"]
                  for _ in range(3)]
        assert grants == [True, False, False]
    code, output = verify_cli(second.config_path)
    assert code == 0, output


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    return postgres.create_database()


async def test_two_gateways_on_one_postgresql_grant_a_token_once(
    mosquitto: Mosquitto, tmp_path: Path, pg_url: str
) -> None:
    town = community(mosquitto, tmp_path, pg_url)
    pass_id, pass_secret = town.visitor_pass(max_uses=3)
    one_root, two_root = f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"
    one, two = GatewayProcess(town, one_root, "one"), GatewayProcess(town, two_root, "two")
    try:
        await asyncio.gather(one.start(), two.start())
        at_gate, at_till, at_car, raced = town.qr(), town.qr(), town.qr(), town.qr()
        opened = await one.present("gate-north", "gate", "qr", at_gate)
        assert opened["granted"], opened["reason"]
        for device, kind in (("gate-north", "gate"), ("elev-b1-1", "elevator")):
            assert (await two.present(device, kind, "qr", at_gate))["reason"] == (
                "replayed_token")
        assert (await two.pay(at_gate))["reason"] == "replayed_token"
        assert (await two.pay(at_till))["approved"]
        assert (await one.present("gate-north", "gate", "qr", at_till))["reason"] == (
            "replayed_token")
        assert (await two.present("elev-b1-1", "elevator", "qr", at_car))["granted"]
        # canteen-1 drops off gateway one's broker view; its upload is believed, the spent
        # tokens in it are not.
        await say_offline(mosquitto, one_root)
        await asyncio.sleep(0.3)
        sold = time.time() - 2
        results = await one.upload([("o-car", at_car, sold), ("o-till", at_till, sold)])
        assert {t: r["reason"] for t, r in results.items()} == {
            "o-car": "replayed_token", "o-till": "replayed_token"}
        # One fresh token shown to both at once: exactly one grant.
        both = await asyncio.gather(one.present("gate-north", "gate", "qr", raced),
                                    two.present("gate-north", "gate", "qr", raced))
        assert sorted(b["granted"] for b in both) == [False, True]
        # A pass with 3 uses, fresh visitor codes shown to both gateways in parallel.
        grants = 0
        for _ in range(4):
            pair = await asyncio.gather(*(
                gw.present("gate-south", "gate", "qr", mint_qr(pass_id, pass_secret, time.time()))
                for gw in (one, two)))
            grants += sum(bool(p["granted"]) for p in pair)
        assert grants == 3
    finally:
        one.stop()
        two.stop()
    engine = db.make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert d.get_visitor_pass(conn, d.list_visitor_passes(conn)[0].pass_id).uses == 3
    finally:
        engine.dispose()
    code, output = verify_cli(one.config_path)
    assert code == 0, output


def _nice(pid: int, tid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_telemetry_yields_the_cpu_to_access_and_its_sinks_yield_to_its_ingest(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A telemetry flood must not take CPU from a resident at a gate (docs/benchmarks.md).
    The worker shares the gateway's session (a session of its own is an autogroup of its own,
    where its nice would rank it only against itself) in a process group of its own (a
    terminal's Ctrl-C is the gateway's); its sinks run below its ingest."""
    town = community(mosquitto, tmp_path, f"sqlite:///{tmp_path / 'gw.db'}")
    async with running(town, f"p{secrets.token_hex(3)}", "priority") as gateway:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        deadline = time.monotonic() + 30
        while not (workers := _children(pid)) or len(
                list(Path(f"/proc/{workers[0]}/task").iterdir())) < 5:
            assert time.monotonic() < deadline, "no telemetry worker with its threads"
            await asyncio.sleep(0.1)
        worker = workers[0]
        assert os.getsid(worker) == os.getsid(pid)
        assert os.getpgid(worker) != os.getpgid(pid)
        base = _nice(pid, pid)
        tasks = [int(t.name) for t in Path(f"/proc/{worker}/task").iterdir()]
        nices = sorted(_nice(worker, tid) for tid in tasks)
        assert _nice(worker, worker) == base + 10  # the main thread, and ingest with it
        assert nices.count(min(19, base + 19)) >= 2, nices  # local store and rules sinks
