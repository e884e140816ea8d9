"""Canteen ledger benchmark: durable payments on SQLite (fsync on every commit).

    .venv/bin/python bench/bench_ledger.py [--seconds 8] [--kill-trials 0] [--no-mqtt]

Prints:
- sustained payments/s and the p50/p99 of one in-process `Ledger.pay()` (one transaction,
  one fsync per payment), sequentially and from 4 threads;
- the same with group commit (`pay_many`, 16 payments per transaction);
- the PaymentHandler path (stored-result lookup + credential resolution + pay);
- the MQTT round trip (terminal simulator -> Mosquitto -> PaymentHandler -> back) at
  100 payments/s, when Mosquitto is installed; the responder is a minimal stand-in for the
  gateway's MQTT shell (the same handler the runtime calls);
- optionally, extra kill -9 trials (`--kill-trials N`) on a fresh SQLite database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.canteen.ledger import Ledger
from gateway.canteen.payments import PaymentHandler
from gateway.canteen.policy import PaymentRequest
from gateway.store.db import make_engine, upgrade

ACCOUNTS = [f"bench-{i}" for i in range(50)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fresh_ledger(workdir: Path, name: str) -> Ledger:
    url = f"sqlite:///{workdir / name}.db"
    upgrade(url)
    ledger = Ledger(make_engine(url))
    for account in ACCOUNTS:
        ledger.topup(account, 9_000_000, f"bench-topup-{account}")
    ledger.warm_up()
    with ledger.engine.connect() as conn:
        sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert (sync, mode) == (2, "wal"), (sync, mode)  # 2 = FULL: fsync at every commit
    return ledger


def report(label: str, count: int, elapsed: float, latencies: list[float]) -> None:
    line = f"{label:<44} {count / elapsed:8.0f} payments/s"
    if latencies:
        line += (f"   p50 {percentile(latencies, 0.5) * 1e3:6.2f} ms"
                 f"   p99 {percentile(latencies, 0.99) * 1e3:6.2f} ms")
    print(line, flush=True)


def run_for(seconds: float, threads: int, one: Callable[[int], None]) -> tuple[int, float,
                                                                              list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        mine: list[float] = []
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter)
            started = time.perf_counter()
            one(i)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(worker)
    return len(latencies), time.perf_counter() - started, latencies


def bench_pay(workdir: Path, seconds: float) -> None:
    for threads in (1, 4):
        ledger = fresh_ledger(workdir, f"pay{threads}")

        def one(i: int, ledger: Ledger = ledger) -> None:
            assert ledger.pay("pos-1", f"t-{i}", 1200, ACCOUNTS[i % 50], time.time()).approved

        count, elapsed, latencies = run_for(seconds, threads, one)
        report(f"pay(), one fsync per payment, {threads} thread(s)", count, elapsed, latencies)
        assert ledger.audit() == []
        ledger.engine.dispose()


def bench_group(workdir: Path, seconds: float, group: int = 16) -> None:
    ledger = fresh_ledger(workdir, "group")

    def one(i: int) -> None:
        batch = [PaymentRequest("pos-1", f"t-{i}-{j}", 1200, ACCOUNTS[(i + j) % 50], 0.0)
                 for j in range(group)]
        assert all(r.approved for r in ledger.pay_many(batch))

    count, elapsed, latencies = run_for(seconds, 1, one)
    report(f"pay_many(), {group} payments per fsync", count * group, elapsed, [])
    print(f"{'':<44} p99 of one group commit {percentile(latencies, 0.99) * 1e3:.2f} ms")
    ledger.engine.dispose()


def bench_handler(workdir: Path, seconds: float) -> None:
    ledger = fresh_ledger(workdir, "handler")
    handler = PaymentHandler(ledger, lambda kind, value, now, ref: value)

    def one(i: int) -> None:
        payload = json.dumps({"txn_id": f"t-{i}", "amount_cents": 1200, "ts": time.time(),
                              "credential": {"type": "card", "value": ACCOUNTS[i % 50]}})
        assert b'"approved":true' in (handler.handle_request("pos-1", payload.encode()) or b"")

    count, elapsed, latencies = run_for(seconds, 1, one)
    report("PaymentHandler.handle_request (lookup+pay)", count, elapsed, latencies)
    ledger.engine.dispose()


async def bench_mqtt(workdir: Path, seconds: float, rate: float = 100.0) -> None:
    import aiomqtt

    from device_drivers.mqtt import NO_DELAY
    from simulators.canteen import CanteenTerminal, card_credential, lunch_hour
    from simulators.demo.broker import Mosquitto, mosquitto_binary

    if mosquitto_binary() is None:
        print("MQTT round trip: skipped (mosquitto is not installed)")
        return
    ledger = fresh_ledger(workdir, "mqtt")
    handler = PaymentHandler(ledger, lambda kind, value, now, ref: value)
    with Mosquitto() as broker:
        async with aiomqtt.Client(broker.host, broker.port, socket_options=NO_DELAY) as client:
            await client.subscribe("bench/devices/+/payment/request", qos=1)

            async def serve() -> None:
                async for message in client.messages:
                    device = message.topic.value.split("/")[2]
                    reply = await asyncio.to_thread(handler.handle, device, "payment/request",
                                                    bytes(message.payload))
                    if reply is not None:
                        await client.publish(f"bench/devices/{device}/{reply.channel}",
                                             reply.payload, qos=1)

            task = asyncio.create_task(serve())
            terminals = [CanteenTerminal(broker.host, broker.port, f"pos-{i}", root="bench")
                         for i in range(4)]
            for terminal in terminals:
                await terminal.__aenter__()
            try:
                stats = await lunch_hour(terminals, [card_credential(a) for a in ACCOUNTS],
                                         rate_per_s=rate, duration_s=seconds)
            finally:
                for terminal in terminals:
                    await terminal.__aexit__(None, None, None)
                task.cancel()
    lat = stats.latencies_s
    p50, p99 = statistics.median(lat) * 1e3, percentile(lat, 0.99) * 1e3
    print(f"MQTT round trip at {rate:.0f}/s offered, {len(lat)} payments"
          f"   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   outcomes {dict(stats.outcomes)}")
    ledger.engine.dispose()


def bench_kill(workdir: Path, trials: int) -> None:
    from tests.ledger_stress_worker import run_kill_trials, verify_kill_run

    url = f"sqlite:///{workdir / 'kill'}.db"
    upgrade(url)
    started = time.perf_counter()
    result = run_kill_trials(url, trials, seed=99, workdir=workdir)
    engine = make_engine(url)
    problems = verify_kill_run(engine, result)
    engine.dispose()
    print(f"kill -9 trials: {result.trials} in {time.perf_counter() - started:.1f} s, "
          f"{len(result.amounts)} payments, {result.partial_trials} mid-burst kills, "
          f"problems: {len(problems)}")
    if problems:
        print("\n".join(problems[:20]))
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--kill-trials", type=int, default=0)
    parser.add_argument("--no-mqtt", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scgw-bench-ledger-") as tmp:
        workdir = Path(tmp)
        print(f"SQLite WAL, synchronous=FULL, database in {tmp}")
        bench_pay(workdir, args.seconds)
        bench_group(workdir, args.seconds / 2)
        bench_handler(workdir, args.seconds / 2)
        if not args.no_mqtt:
            asyncio.run(bench_mqtt(workdir, args.seconds))
        if args.kill_trials:
            bench_kill(workdir, args.kill_trials)


if __name__ == "__main__":
    main()
