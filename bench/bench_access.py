"""Access decisions at community scale: 20,000 residents, 60,000 cards, 200 readers.

    .venv/bin/python bench/bench_access.py [--database-url URL] [--decisions N]

The parent fills a fresh database (SQLite in a temp dir unless a URL is given); a child
process, which has imported nothing but the gateway, then measures what a gateway would
see: index build and rebuild time, RSS with the index loaded, in-process decision latency
through AccessService.decide (replay guard included), and how long a revocation written by
another engine takes to be enforced (the service polls every 0.3 s). Targets (issue 3):
p99 <= 0.2 ms, RSS <= 150 MB, rebuild <= 1 s. Results: docs/bench-access.md. Since issue 11
also `admit`, the decision recorded (audit row and spent token) before it returns: one at a
time, and 64 at once sharing transactions (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESIDENTS = 20_000
BUILDINGS = 10
FLOORS = 30  # per building: -1 garage and 1 lobby are public
ELEVATORS_PER_BUILDING = 15
DOORS_PER_BUILDING = 3
PERIMETER_GATES = 15
CANTEENS = 5  # 10 * (15 + 3) + 15 + 5 = 200 readers
GROUPS = 50
SEED = 7


def readers() -> list[Any]:
    from gateway.access.decision import Reader

    out = [Reader(f"gate-{g}", "gate") for g in range(PERIMETER_GATES)]
    out += [Reader(f"canteen-{t}", "canteen") for t in range(CANTEENS)]
    for b in range(BUILDINGS):
        out += [Reader(f"elev-b{b}-{e}", "elevator", building_id=f"b{b}")
                for e in range(ELEVATORS_PER_BUILDING)]
        out += [Reader(f"door-b{b}-{n}", "gate", building_id=f"b{b}")
                for n in range(DOORS_PER_BUILDING)]
    out[0] = Reader("gate-0", "gate", gate_ids=frozenset({"gym"}), restricted=True)
    return out


def populate(url: str) -> dict[str, Any]:
    """Bulk rows straight into the tables: the repository's per-row checks would take minutes."""
    from sqlalchemy import insert

    from device_drivers.tokens import new_credential_id, new_secret
    from gateway.store import db
    from gateway.store import directory as d

    rng = random.Random(SEED)
    db.upgrade(url)
    engine = db.make_engine(url)
    now = time.time()
    floors = [{"building_id": f"b{b}", "number": n, "label": "", "public": n in (-1, 1)}
              for b in range(BUILDINGS) for n in range(-1, FLOORS + 1) if n != 0]
    units, residents, cards, phones, members = [], [], [], [], []
    for i in range(RESIDENTS):
        building, floor = i % BUILDINGS, 2 + (i // BUILDINGS) % (FLOORS - 1)
        unit_id = f"u{i // 2}"  # two residents per household
        if i % 2 == 0:
            units.append({"unit_id": unit_id, "building_id": f"b{building}", "floor": floor,
                          "label": ""})
        else:
            building, floor = (i - 1) % BUILDINGS, 2 + ((i - 1) // BUILDINGS) % (FLOORS - 1)
        rid = f"r{i}"
        residents.append({"resident_id": rid, "unit_id": unit_id, "name": f"Resident {i}",
                          "role": "owner", "created_at": now, "moved_out_at": None})
        for kind in ("gate", "elevator", "canteen"):
            cards.append({"kind": kind, "card_number": f"{kind[0].upper()}{i:08d}",
                          "resident_id": rid, "issued_at": now,
                          "revoked_at": now if rng.random() < 0.02 else None})
        phones.append({"credential_id": new_credential_id(), "resident_id": rid,
                       "secret": new_secret(), "label": "phone", "enrolled_at": now,
                       "revoked_at": None})
        if rng.random() < 0.1:
            members.append({"group_id": f"g{rng.randrange(GROUPS)}", "resident_id": rid})
    with engine.begin() as conn:
        conn.execute(insert(d.buildings), [{"building_id": f"b{b}", "name": f"Building {b}"}
                                           for b in range(BUILDINGS)])
        conn.execute(insert(d.floors), floors)
        conn.execute(insert(d.units), units)
        for table, rows in ((d.residents, residents), (d.cards, cards),
                            (d.phone_credentials, phones)):
            for start in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[start:start + 5000])
        conn.execute(insert(d.access_groups), [{"group_id": f"g{g}", "name": f"group {g}"}
                                               for g in range(GROUPS)])
        conn.execute(insert(d.access_group_gates), [{"group_id": f"g{g}", "gate_id": "gym"}
                                                    for g in range(GROUPS)])
        conn.execute(insert(d.access_group_windows), [
            {"group_id": f"g{g}", "weekday": day, "start_minute": 360, "end_minute": 1320}
            for g in range(GROUPS) for day in range(7)])
        conn.execute(insert(d.access_group_members), [dict(m) for m in {
            (m["group_id"], m["resident_id"]): m for m in members}.values()])
        d.bump(conn, "bulk")
    engine.dispose()
    return {"residents": len(residents), "cards": len(cards), "phones": len(phones),
            "units": len(units), "readers": len(readers())}


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(url: str, decisions: int) -> dict[str, Any]:
    from device_drivers import tokens as c
    from gateway.access.index import build_index
    from gateway.access.service import AccessService
    from gateway.store import db
    from gateway.store import directory as d

    rss_start = rss_mb()
    engine, other = db.make_engine(url), db.make_engine(url)
    out: dict[str, Any] = {"rss_before_index_mb": round(rss_start, 1)}
    all_readers = readers()
    started = time.perf_counter()
    async with AccessService(engine, all_readers) as service:
        out["first_build_s"] = round(time.perf_counter() - started, 3)
        out["index_sizes"] = service.index.sizes
        out["rss_with_index_mb"] = round(rss_mb(), 1)

        rebuilds = []
        for i in range(5):
            with other.begin() as conn:
                d.revoke_card(conn, "gate", f"G{i:08d}")
            t0 = time.perf_counter()
            await service.refresh_now()
            rebuilds.append(time.perf_counter() - t0)
        full_rebuilds = []
        for _ in range(3):
            t0 = time.perf_counter()
            await service.refresh_now(full=True)
            full_rebuilds.append(time.perf_counter() - t0)
        # The gateway's own footprint: index built and rebuilt, before any bench data exists.
        out["rss_after_rebuilds_mb"] = round(rss_mb(), 1)
        out["rss_peak_mb"] = round(rss_mb("VmHWM"), 1)
        gc.disable()  # as AccessService does while it rebuilds
        with engine.connect() as conn:
            t0 = time.perf_counter()
            snapshot = d.load_snapshot(conn)
            t1 = time.perf_counter()
            build_index(snapshot)
            t2 = time.perf_counter()
        gc.enable()
        del snapshot
        out["rebuild_s"] = {
            "after_card_revocation_median": round(statistics.median(rebuilds), 3),
            "after_card_revocation_max": round(max(rebuilds), 3),
            "full_median": round(statistics.median(full_rebuilds), 3),
            "full_max": round(max(full_rebuilds), 3),
            "full_load_snapshot": round(t1 - t0, 3), "full_build_index": round(t2 - t1, 3)}

        rng = random.Random(SEED)
        index = service.index
        secrets_by_resident = {e.resident_id: (cid, e.secret)
                               for cid, e in index.credentials.items()}
        now = time.time()
        requests = []
        for _ in range(decisions):
            i = rng.randrange(RESIDENTS)
            building = (i - i % 2) % BUILDINGS
            reader = rng.choice(all_readers[:20] + [
                r for r in all_readers if r.building_id == f"b{building}"])
            roll = rng.random()
            if roll < 0.4:
                cid, secret = secrets_by_resident[f"r{i}"]
                request = ("qr", c.mint_qr(cid, secret, now))
            elif roll < 0.6:
                cid, secret = secrets_by_resident[f"r{i}"]
                request = ("ble", c.mint_ble(cid, secret, now).hex())
            else:
                kind = {"gate": "G", "elevator": "E", "canteen": "C"}[reader.kind]
                request = ("card", f"{kind}{i:08d}")
            requests.append((reader.device_id, *request))
        timings, granted = [], 0
        perf = time.perf_counter_ns
        for device_id, ctype, value in requests:
            t0 = perf()
            decision = service.decide(device_id, ctype, value, now)
            timings.append(perf() - t0)
            granted += decision.granted
        timings.sort()

        def pick(q: float) -> float:
            return round(timings[min(len(timings) - 1, int(q * len(timings)))] / 1000, 1)

        out["decision_us"] = {"n": len(timings), "granted": granted, "p50": pick(0.5),
                              "p99": pick(0.99), "p999": pick(0.999), "max": pick(1.0)}
        out["admit"] = await measure_admit(service, engine, secrets_by_resident, rng)

        async def enforced_after(resident: int, revoke: Any) -> float:
            cid, secret = secrets_by_resident[f"r{resident}"]
            with other.begin() as conn:
                revoke(conn, cid, f"r{resident}")
            t0 = time.perf_counter()
            while service.decide("gate-1", "qr", c.mint_qr(cid, secret, time.time())).granted:
                await asyncio.sleep(0.005)
            return time.perf_counter() - t0

        def lose_phone(conn: Any, cid: str, _resident_id: str) -> None:
            d.revoke_phone_credential(conn, cid)

        def move_out(conn: Any, _cid: str, resident_id: str) -> None:
            d.move_out(conn, resident_id)

        lost_phone = [await enforced_after(100 + i, lose_phone) for i in range(5)]
        moved_out = [await enforced_after(200 + i, move_out) for i in range(3)]
        out["enforced_after_other_engine_write_s"] = {
            "lost_phone_median": round(statistics.median(lost_phone), 3),
            "lost_phone_max": round(max(lost_phone), 3),
            "move_out_median": round(statistics.median(moved_out), 3),
            "move_out_max": round(max(moved_out), 3)}
    engine.dispose()
    other.dispose()
    return out


async def measure_admit(service: Any, engine: Any, secrets_by_resident: dict[str, Any],
                        rng: random.Random) -> dict[str, Any]:
    """Issue 11: `admit`, the decision as readers get it: recorded (audit row, spent token)
    before it returns. One at a time, then 64 at once (they share transactions)."""
    from device_drivers import tokens as c
    from gateway.access.audit import AuditLog

    def fresh() -> tuple[str, str]:
        cid, secret = secrets_by_resident[f"r{rng.randrange(RESIDENTS)}"]
        return "gate-1", c.mint_qr(cid, secret, time.time())

    async with AuditLog(engine) as journal:
        service.journal = journal
        one: list[float] = []
        for i in range(2000):
            device_id, qr = fresh()
            t0 = time.perf_counter()
            await service.admit(device_id, "qr", qr, request_id=f"b-{i}")
            one.append((time.perf_counter() - t0) * 1e6)
        one.sort()
        burst_started = time.perf_counter()
        admitted = 0
        for round_ in range(50):
            batch = [fresh() for _ in range(64)]
            await asyncio.gather(*(service.admit(dev, "qr", qr, request_id=f"c-{round_}-{j}")
                                   for j, (dev, qr) in enumerate(batch)))
            admitted += len(batch)
        elapsed = time.perf_counter() - burst_started
        service.journal = None
    return {"sequential_us": {"p50": round(one[len(one) // 2]), "p99": round(one[int(0.99 * len(
        one))]), "max": round(one[-1])}, "concurrent_64_per_s": round(admitted / elapsed),
            "fallbacks": journal.fallbacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url")
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(asyncio.run(measure(args.measure, args.decisions))))
        return
    with tempfile.TemporaryDirectory(prefix="scgw-bench-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        t0 = time.perf_counter()
        sizes = populate(url)
        print(f"populated {sizes} in {time.perf_counter() - t0:.1f} s ({url.split(':')[0]})")
        child = subprocess.run([sys.executable, __file__, "--measure", url, "--decisions",
                                str(args.decisions)], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            sys.exit(child.stderr)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    dec, reb = result["decision_us"], result["rebuild_s"]
    print(json.dumps(result, indent=2))
    print(f"decision p50 {dec['p50']} us, p99 {dec['p99']} us (target <= 200 us)")
    admit = result["admit"]
    print(f"admit (recorded before it returns): p50 {admit['sequential_us']['p50']} us, p99 "
          f"{admit['sequential_us']['p99']} us; {admit['concurrent_64_per_s']} decisions/s "
          "with 64 at a time")
    print(f"RSS with index {result['rss_with_index_mb']} MB, after rebuilds "
          f"{result['rss_after_rebuilds_mb']} MB, peak {result['rss_peak_mb']} MB"
          " (target <= 150 MB)")
    print(f"rebuild after a lost card: median {reb['after_card_revocation_median']} s; full "
          f"rebuild: median {reb['full_median']} s, max {reb['full_max']} s (target <= 1 s)")
    enforced = result["enforced_after_other_engine_write_s"]
    print(f"write by another engine enforced after at most {enforced['lost_phone_max']} s "
          f"(lost phone), {enforced['move_out_max']} s (move-out: residents reloaded)")


if __name__ == "__main__":
    main()
