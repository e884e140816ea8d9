"""Reader -> broker -> decision -> broker -> reader round trip over Mosquitto on loopback.

The gateway runs as its own process (`scgw run`), as in production, behind a Mosquitto
configured by `scgw mqtt-config` for the bench's site, as in production: no anonymous
clients, one login per device (the reader logs in as `gate-north`, the telemetry load as
each meter), the gateway's own login, and the generated per-device ACL checked on every
publish and delivery. A reader in this process presents credentials one at a time, while a
third process publishes telemetry load. Since issue 11 every decision is recorded before it
is sent: its audit row (and, for a QR, the spent token) is committed in one transaction,
group-committed with whatever else is waiting, before the answer is published; so this
measures that write too. Measured per credential:

- `qr`: a fresh QR token each time (audit row + spent-token row, one transaction);
- `card`: a gate card (audit row only).

Runs on SQLite (the default store; the decision's commit at `synchronous=NORMAL` in WAL
mode: durable against a kill -9 of the gateway, the WAL fsynced within 0.2 s) and, with
`--postgres`, on a PostgreSQL cluster this bench starts with fsync on (tests.servers), every
commit flushed. `--anonymous` measures the old anonymous test broker instead, `--nagle`
adds the issue-2 comparison with Mosquitto's default (Nagle on). `--baseline DIR` measures a
gateway from another source tree (e.g. `git archive HEAD~1 | tar -x -C DIR`) in the same
run, alternating rounds with this one, so a change's cost is measured under the same load:
on a shared machine the load moves the tails more than most changes do.

Target (issues 2 and 11): p50 <= 5 ms, p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.harness import percentile
from gateway.config import SiteConfig
from simulators.demo.broker import MOSQUITTO_CONF, Mosquitto, free_port
from simulators.demo.community import BUILDINGS, READERS, broker_files
from simulators.phone import SimulatedPhone
from simulators.readers import ReaderSimulator

METERS = 20
GATEWAY_USER = "scgw-gateway"
TELEMETRY_LOADER = """
import asyncio, contextlib, json, sys, time, aiomqtt
async def main(host, port, rate, logins):
    logins = json.loads(logins)  # meter id -> [username, password], or null: anonymous
    async with contextlib.AsyncExitStack() as stack:
        clients = [(m, await stack.enter_async_context(aiomqtt.Client(
            host, int(port), username=(login or [None, None])[0],
            password=(login or [None, None])[1]))) for m, login in sorted(logins.items())]
        seq = 0
        while True:
            t0 = time.monotonic()
            for i in range(int(rate) // 10):
                seq += 1
                meter, client = clients[i % len(clients)]
                await client.publish(f"scgw/devices/{meter}/telemetry", json.dumps(
                    {"ts": time.time(), "seq": seq, "metrics": {"power_w": 1000.0 + i}}), qos=0)
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
asyncio.run(main(*sys.argv[1:]))
"""


HERE = Path(__file__).resolve().parents[1]
SEEDER = """
import json, sys, yaml
from gateway.config import SiteConfig
from gateway.store import db
from simulators.demo.seed import seed_demo
site = yaml.safe_load(open(sys.argv[1]))
db.upgrade(site["database"]["url"])
engine = db.make_engine(site["database"]["url"])
people = seed_demo(engine, SiteConfig.model_validate(site))
engine.dispose()
r = people.residents[0]
print(json.dumps({"cid": r.credential_id, "secret": r.secret.hex(), "card": r.cards["gate"]}))
"""


@dataclass
class Resident:
    credential_id: str
    secret: bytes
    card: str


@dataclass
class Broker:
    """A running Mosquitto and the logins of the bench's site on it (None: anonymous)."""

    mosquitto: Mosquitto
    logins: dict[str, tuple[str, str]] | None  # login name -> (username, password)

    def login(self, name: str) -> tuple[str | None, str | None]:
        if self.logins is None:
            return None, None
        return self.logins[name]


def site_file(work: Path, port: int, db_url: str, secured: bool) -> Path:
    meters = [{"device_id": f"meter-{i}", "kind": "meter"} for i in range(METERS)]
    site: dict[str, Any] = {
        "site": {"id": "bench"},
        "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "root": "scgw",
                 **({"username": GATEWAY_USER} if secured else {})},
        "database": {"url": db_url},
        "api": {"enabled": False},
        "telemetry": {"spool_dir": str(work / f"spool-{secrets.token_hex(4)}")},
        "buildings": BUILDINGS,
        "devices": [*READERS, *meters],
    }
    path = work / f"site-{secrets.token_hex(4)}.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


@contextlib.contextmanager
def broker(work: Path, *, secured: bool = True, nodelay: bool = True) -> Iterator[Broker]:
    """Mosquitto as `scgw mqtt-config` configures it for the bench's site (or, not
    `secured`, the anonymous test broker)."""
    port = free_port()
    if not secured:
        mosquitto = Mosquitto(port)
        if not nodelay:
            mosquitto.conf_path.write_text(MOSQUITTO_CONF.replace(
                "set_tcp_nodelay true\n", "").format(port=port, host=mosquitto.host))
        with mosquitto:
            yield Broker(mosquitto, None)
        return
    # What `scgw mqtt-config --bind 127.0.0.1` writes (the same code), but running as this
    # user: as root, Mosquitto would drop to `mosquitto`, which cannot read a temp dir.
    config = SiteConfig.model_validate(yaml.safe_load(
        site_file(work, port, "sqlite://", True).read_text()))
    written = broker_files(config, work / f"mqtt-{port}")
    conf = written.conf
    if not nodelay:
        conf.write_text(conf.read_text().replace("set_tcp_nodelay true\n", ""))
    credentials = written.credentials
    logins = {device: (login.username, login.password)
              for device, login in credentials.devices.items()}
    logins["gateway"] = (credentials.gateway.username, credentials.gateway.password)
    mosquitto = Mosquitto(port, conf_path=conf)
    mosquitto.start()
    try:
        yield Broker(mosquitto, logins)
    finally:
        mosquitto.close()


@contextlib.contextmanager
def gateway(broker: Broker, work: Path, db_url: str,
            tree: Path = HERE) -> Iterator[Resident]:
    """A seeded store and `scgw run` from source tree `tree` as a child process."""
    config_path = site_file(work, broker.mosquitto.port, db_url, broker.logins is not None)
    # Seeded by the tree's own code: its migrations are the ones its gateway expects.
    env = {**os.environ, "PYTHONPATH": str(tree), "SCGW__API__JWT_SECRET": secrets.token_hex(32)}
    _, password = broker.login("gateway")
    if password is not None:
        env["SCGW__MQTT__PASSWORD"] = password
    seeded = json.loads(subprocess.run(
        [sys.executable, "-c", SEEDER, str(config_path)], cwd=tree, env=env, check=True,
        capture_output=True, text=True).stdout.splitlines()[-1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.app.cli", "run", "--config", str(config_path)],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield Resident(seeded["cid"], bytes.fromhex(seeded["secret"]), seeded["card"])
    finally:
        proc.terminate()
        proc.wait(15)


Samples = dict[str, list[float]]


async def measure(broker: Broker, work: Path, db_url: str, requests: int,
                  telemetry_rate: int, tree: Path = HERE) -> Samples:
    host, port = broker.mosquitto.host, broker.mosquitto.port
    meters = {f"meter-{i}": (list(broker.login(f"meter-{i}")) if broker.logins else None)
              for i in range(METERS)}
    loader = subprocess.Popen(
        [sys.executable, "-c", TELEMETRY_LOADER, host, str(port), str(telemetry_rate),
         json.dumps(meters)]
    )
    samples: Samples = {"qr": [], "card": []}
    username, password = broker.login("gate-north")
    try:
        with gateway(broker, work, db_url, tree) as resident:
            phone = SimulatedPhone(resident.credential_id, resident.secret)
            async with ReaderSimulator(host, port, "gate-north", "gate", username=username,
                                       password=password) as reader:
                for _ in range(200):  # wait for the gateway to answer
                    try:
                        await reader.present("card", resident.card, timeout_s=0.5)
                        break
                    except TimeoutError:
                        continue
                for i in range(2 * requests):
                    kind = "qr" if i % 2 == 0 else "card"
                    value = phone.qr() if kind == "qr" else resident.card
                    started = time.perf_counter()
                    decision = await reader.present(kind, value)
                    samples[kind].append((time.perf_counter() - started) * 1000)
                    assert decision["granted"], decision
                    await asyncio.sleep(0.005)
    finally:
        loader.terminate()
        loader.wait(10)
    return samples


def summary(samples: Samples) -> dict[str, dict[str, float]]:
    return {kind: {"p50_ms": statistics.median(xs), "p99_ms": percentile(xs, 0.99),
                   "max_ms": max(xs), "n": float(len(xs))} for kind, xs in samples.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="per credential kind")
    parser.add_argument("--telemetry-rate", type=int, default=500, help="messages/s of load")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds per store (with --baseline)")
    parser.add_argument("--postgres", action="store_true",
                        help="also measure on a PostgreSQL cluster (fsync on) started here")
    parser.add_argument("--nagle", action="store_true",
                        help="also measure with Mosquitto's default (Nagle on)")
    parser.add_argument("--anonymous", action="store_true",
                        help="the anonymous test broker instead of `scgw mqtt-config`'s")
    parser.add_argument("--baseline", type=Path,
                        help="source tree of another version to measure in the same run")
    args = parser.parse_args()
    trees = [("this", HERE)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    rounds = args.rounds if args.baseline else 1
    per_round = max(1, args.requests // rounds)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stores: list[tuple[str, Any]] = [("sqlite", None)]
        server = None
        if args.postgres:
            from tests.test_trust_pg_crash import DurablePostgres

            server = DurablePostgres()
            server.start()
            stores.append(("postgresql", server))
        try:
            for store, pg in stores:
                collected: dict[str, Samples] = {name: {"qr": [], "card": []} for name, _ in trees}
                with broker(work, secured=not args.anonymous) as running:
                    for _ in range(rounds):
                        for name, tree in trees:
                            url = (pg.create_database() if pg is not None
                                   else f"sqlite:///{work / f'{secrets.token_hex(4)}.db'}")
                            got = await measure(running, work, url, per_round,
                                                args.telemetry_rate, tree)
                            for kind, xs in got.items():
                                collected[name][kind].extend(xs)
                for name, samples in collected.items():
                    results[f"{store}" if name == "this" else f"{store}-{name}"] = summary(samples)
            if args.nagle:
                with broker(work, secured=not args.anonymous, nodelay=False) as running:
                    url = f"sqlite:///{work / 'nagle.db'}"
                    results["sqlite-nagle"] = summary(await measure(
                        running, work, url, args.requests, args.telemetry_rate))
        finally:
            if server is not None:
                server.stop()
    print(json.dumps({"bench": "roundtrip", "telemetry_rate": args.telemetry_rate,
                      "broker": "anonymous" if args.anonymous else "scgw mqtt-config",
                      **{label: {kind: {m: round(v, 3) for m, v in r.items()}
                                 for kind, r in by_kind.items()}
                         for label, by_kind in results.items()}}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
