"""Canteen payments over MQTT while the API is flooded with sign-ins (issue 11, point 7).

`scgw run` as its own process (SQLite, API on, default limits). One canteen terminal pays
for the whole run like a till: the next payment 20 ms after the answer to the last (closed
loop, so a slow moment shows as latency, not as a queue that snowballs). Its round trips are
measured idle and during each of three sign-in floods, in `--cycles` rounds of idle, then
each flood, so load from outside the bench falls on idle and flood alike:

- one-user: 100 wrong passwords for one user name from one address at once (issue 11's
  report); the rate limits answer most of them.
- many-users: 100 sign-ins for 100 unknown user names from 10 addresses at once, each
  address within its limit, so every one reaches the password check; the hashing queue
  answers the overflow.
- sustained: 10 clients on 10 addresses signing in as fast as they are answered for
  `--seconds`, keeping the hashing thread busy all along.

The floods run in a child process, so their client work never delays the terminal's
event loop here. During each flood a real user signs in from another address; its latency
is reported.
Also measured: the per-request session check (the user and resident re-read on every
request), in this process on a copy of the gateway's SQLite store.

Target (issue 11): payment p99 during a 100-login flood within 2x of idle, same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi.concurrency import run_in_threadpool

from bench.harness import gateway_process, percentile
from gateway.store import db
from gateway.store import directory as d
from gateway.store.users import Role, create_user, get_user, users
from simulators.canteen import CanteenTerminal, card_credential
from simulators.demo.broker import Mosquitto, free_port

PAYMENT_TIMEOUT_S = 3.0  # a terminal with no answer by then goes offline (issue 11)
FLOODS = ("one-user", "many-users", "sustained")


@dataclass
class Payments:
    """Round trips of payments started at a fixed rate, each as its own task."""

    samples: list[tuple[float, float, str]] = field(default_factory=list)  # start, s, outcome

    async def run(self, terminal: CanteenTerminal, customer: Any, pause_s: float,
                  stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            sale = await terminal.sell(100, customer)
            terminal.online = True  # a timeout is recorded, not an offline terminal
            self.samples.append((started, time.monotonic() - started, sale.outcome))
            await asyncio.sleep(pause_s)

    def within(self, windows: list[tuple[float, float]]) -> dict[str, Any]:
        chosen = [(s, o) for t, s, o in self.samples
                  if any(start <= t <= end for start, end in windows)]
        ms = [s * 1000 for s, _ in chosen]
        if not ms:
            return {"payments": 0}
        return {"payments": len(ms), "p50_ms": round(statistics.median(ms), 2),
                "p99_ms": round(percentile(ms, 0.99), 2), "max_ms": round(max(ms), 2),
                "outcomes": dict(Counter(o for _, o in chosen))}


def _client(api: str, address: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=api, transport=transport, timeout=120)


async def _sign_in(http: httpx.AsyncClient, username: str, password: str
                   ) -> tuple[int, float]:
    started = time.monotonic()
    answer = await http.post("/api/v1/auth/token",
                             data={"username": username, "password": password})
    return answer.status_code, time.monotonic() - started


async def _flood_process(kind: str, api: str, cycle: int, seconds: float
                         ) -> tuple[asyncio.subprocess.Process, Awaitable[dict[str, int]]]:
    """Start the flood's process; it floods when told to go (its start-up, a second of
    imports, stays outside the measured window)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bench_login_flood", "--flood", kind, "--api", api,
        "--cycle", str(cycle), "--seconds", str(seconds), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    assert (await child.stdout.readline()).strip() == b"ready"

    async def answers() -> dict[str, int]:
        out, _ = await child.communicate(b"go\n")
        found: dict[str, int] = json.loads(out)
        return found

    return child, answers()


async def _during(kind: str, api: str, cycle: int, seconds: float,
                  real: dict[str, str], address: str) -> dict[str, Any]:
    """Run the flood; a real sign-in starts 0.5 s into it."""
    async def real_sign_in() -> tuple[int, float]:
        await asyncio.sleep(0.5)
        async with _client(api, address) as http:
            return await _sign_in(http, real["username"], real["password"])

    _, flooding = await _flood_process(kind, api, cycle, seconds)
    start = time.monotonic()
    statuses, (real_status, real_s) = await asyncio.gather(flooding, real_sign_in())
    end = time.monotonic()
    return {"start": start, "end": end, "flood_s": round(end - start, 2),
            "answers": statuses,
            "real_sign_in": {"status": real_status, "seconds": round(real_s, 2)}}


async def flood(kind: str, api: str, cycle: int, seconds: float) -> Counter[int]:
    """Fresh addresses and names each cycle: the limits of the last one still hold."""
    if kind == "one-user":  # an unknown name costs the same check as a known one
        return await _burst(api, [f"victim-{cycle}"] * 100, [f"127.1.{cycle}.1"])
    if kind == "many-users":
        return await _burst(api, [f"nobody-{cycle}-{i}" for i in range(100)],
                            [f"127.2.{cycle}.{10 + i}" for i in range(10)])
    return await _sustained(api, [f"127.3.{cycle}.{10 + i}" for i in range(10)], seconds)


async def _burst(api: str, names: list[str], addresses: list[str]) -> Counter[int]:
    clients = [_client(api, a) for a in addresses]
    try:
        answers = await asyncio.gather(*(
            _sign_in(clients[i % len(clients)], name, "wrong password " + name)
            for i, name in enumerate(names)))
    finally:
        for client in clients:
            await client.aclose()
    return Counter(status for status, _ in answers)


async def _sustained(api: str, addresses: list[str], seconds: float) -> Counter[int]:
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds

    async def client(address: str) -> None:
        async with _client(api, address) as http:
            while time.monotonic() < deadline:
                status, _ = await _sign_in(http, f"nobody-{secrets.token_hex(4)}", "x" * 12)
                statuses[status] += 1
                if status in (429, 503):
                    await asyncio.sleep(0.05)

    await asyncio.gather(*(client(a) for a in addresses))
    return statuses


async def _wait_for_api(api: str) -> None:
    async with httpx.AsyncClient(base_url=api, timeout=2) as http:
        for _ in range(300):
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the gateway's API never became ready")


def _session_check_cost(db_url: str, user_id: str, rounds: int) -> dict[str, Any]:
    """The work every authenticated request adds: a worker-thread hop and one read."""
    engine = db.make_engine(db_url)
    reader = db.read_engine(engine)

    def load() -> None:
        with reader.connect() as conn:
            assert get_user(conn, user_id) is not None

    async def rounds_us() -> list[float]:
        out = []
        for _ in range(rounds):
            started = time.perf_counter()
            await run_in_threadpool(load)
            out.append((time.perf_counter() - started) * 1e6)
        return out

    try:
        us = asyncio.run(rounds_us())
    finally:
        reader.dispose()
        engine.dispose()
    return {"rounds": rounds, "p50_us": round(statistics.median(us)),
            "p99_us": round(percentile(us, 0.99))}


async def measure(cycles: int, idle_s: float, sustained_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {"cycles": cycles}
    windows: dict[str, list[tuple[float, float]]] = {"idle": [], **{f: [] for f in FLOODS}}
    floods: dict[str, list[dict[str, Any]]] = {f: [] for f in FLOODS}
    with tempfile.TemporaryDirectory() as tmp, Mosquitto() as broker:
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        site = {"api": {"enabled": True, "host": "127.0.0.1", "port": port}}
        with gateway_process(broker, Path(tmp), purse_cents=10_000_000,
                             site_extra=site) as people:
            await _wait_for_api(api)
            real = [u for u in people.logins if u["role"] == "resident"][1]
            terminal = CanteenTerminal(broker.host, broker.port, "canteen-1", root="scgw",
                                       timeout_s=PAYMENT_TIMEOUT_S, attempts=1)
            customer = card_credential(people.residents[2].cards["canteen"])
            async with terminal:
                for _ in range(100):  # wait until the gateway answers payments
                    if (await terminal.sell(1, customer)).outcome == "approved":
                        break
                    terminal.online = True
                    await asyncio.sleep(0.2)
                async with _client(api, "127.0.0.1") as http:
                    idle_login = await _sign_in(http, real["username"], real["password"])
                payments, stop = Payments(), asyncio.Event()
                paying = asyncio.create_task(payments.run(terminal, customer, 0.02, stop))
                for cycle in range(cycles):
                    start = time.monotonic()
                    await asyncio.sleep(idle_s)
                    windows["idle"].append((start, time.monotonic()))
                    for n, name in enumerate(FLOODS):
                        seen = await _during(name, api, cycle, sustained_s, real,
                                             f"127.4.{cycle}.{n + 1}")
                        windows[name].append((seen.pop("start"), seen.pop("end")))
                        floods[name].append(seen)
                        await asyncio.sleep(1.0)
                stop.set()
                await paying
    result["idle"] = {**payments.within(windows["idle"]),
                      "real_sign_in_s": round(idle_login[1], 2)}
    idle_p99 = result["idle"]["p99_ms"]
    for name in FLOODS:
        answers: Counter[str] = Counter()
        for seen in floods[name]:
            answers.update(seen["answers"])
        result[name] = {
            **payments.within(windows[name]),
            "flood_s": [seen["flood_s"] for seen in floods[name]],
            "answers_per_flood": {k: v / cycles for k, v in sorted(answers.items())},
            "real_sign_in": [(seen["real_sign_in"]["status"], seen["real_sign_in"]["seconds"])
                             for seen in floods[name]],
        }
        result[name]["p99_vs_idle"] = round(result[name]["p99_ms"] / idle_p99, 2)
    result["session_check"] = await asyncio.to_thread(_session_check_on_a_fresh_store)
    return result


def _session_check_on_a_fresh_store() -> dict[str, Any]:
    """SQLite (WAL) with one resident user among 2,000 others."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'session.db'}"
        db.upgrade(url)
        engine = db.make_engine(url)
        with engine.begin() as conn:
            d.upsert_building(conn, d.Building("b1", "One"), [d.Floor("b1", 1)])
            d.create_unit(conn, "b1-0101", "b1", 1)
            d.create_resident(conn, "b1-0101", "Ann", "owner", resident_id="r-1")
            user = create_user(conn, "ann", "correct horse battery", Role.RESIDENT, "r-1")
            for i in range(2000):  # a community's worth of other users
                conn.execute(users.insert().values(
                    user_id=f"u-{i}", username=f"user-{i}", password_hash="x", role="staff",
                    resident_id=None, disabled=False, created_at=0.0))
        engine.dispose()
        return _session_check_cost(url, user.user_id, 2000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=3, help="rounds of idle and floods")
    parser.add_argument("--idle", type=float, default=6.0, help="idle seconds per round")
    parser.add_argument("--seconds", type=float, default=8.0, help="sustained flood seconds")
    parser.add_argument("--flood", choices=FLOODS, help=argparse.SUPPRESS)  # the child
    parser.add_argument("--api", help=argparse.SUPPRESS)
    parser.add_argument("--cycle", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        print("ready", flush=True)
        sys.stdin.readline()
        answers = asyncio.run(flood(args.flood, args.api, args.cycle, args.seconds))
        print(json.dumps({str(k): v for k, v in sorted(answers.items())}))
        return
    result = asyncio.run(measure(args.cycles, args.idle, args.seconds))
    print(json.dumps({"bench": "login_flood", **result}, indent=2))


if __name__ == "__main__":
    main()
