"""The local telemetry store on both databases: 1-minute rollups equal a brute-force
recomputation from the raw readings however the readings are cut into batches; a replayed
batch never counts twice because the spool position is committed with the rollups; series
sums over buildings and kinds; pruning by age; the latest-values cache."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, inspect, select
from sqlalchemy.exc import OperationalError

from device_drivers.vocabulary import Reading
from gateway.store.db import make_engine, read_engine, upgrade
from gateway.store.metadata import metadata
from gateway.telemetry.latest_store import LatestCache
from gateway.telemetry.local_db import LocalDb
from gateway.telemetry.rollups import RollupStore
from gateway.telemetry.series import InvalidRange, SeriesResult, UnknownSeries, series
from gateway.telemetry.tables import telemetry_cursor, telemetry_latest, telemetry_rollups

BASE = 1_763_800_050.0  # not on a minute boundary: the first minute starts 30 s earlier
DEVICES = {"m-1": ("meter", "b1"), "m-2": ("meter", "b2"), "ahu-1": ("hvac", "b1"),
           "gate-1": ("gate", None)}


@dataclass
class Db:
    engine: Engine
    store: RollupStore

    def clear(self) -> None:
        with self.engine.begin() as conn:
            for table in (telemetry_rollups, telemetry_latest, telemetry_cursor):
                conn.execute(delete(table))

    def rollups(self) -> dict[tuple[str, str, int], tuple[float, float, float, int, float]]:
        r = telemetry_rollups.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(r.device_id, r.metric, r.minute, r.min, r.max, r.sum,
                                       r.count, r.last))
            return {(d, m, int(mi)): (lo, hi, s, int(n), last)
                    for d, m, mi, lo, hi, s, n, last in rows}


@pytest.fixture
def db(database_url: str) -> Iterator[Db]:
    upgrade(database_url)
    engine = make_engine(database_url)
    local = LocalDb(database_url)
    yield Db(engine, RollupStore(local, retention_days=1))
    local.close()
    engine.dispose()


def brute_cells(readings: list[Reading]) -> dict[tuple[str, str, int], list[float]]:
    """Raw values per (device, metric, minute), in arrival order, with their timestamps."""
    cells: dict[tuple[str, str, int], list[float]] = {}
    for r in readings:
        for metric, value in r.metrics.items():
            cells.setdefault((r.device_id, metric, int(r.ts // 60) * 60), []).extend(
                [r.ts, value])
    return cells


def last_of(pairs: list[float]) -> float:
    """The value with the greatest timestamp; on a tie the later one in arrival order."""
    best_ts, best = -math.inf, math.nan
    for ts, value in zip(pairs[::2], pairs[1::2], strict=True):
        if ts >= best_ts:
            best_ts, best = ts, value
    return best


readings_strategy = st.lists(
    st.builds(
        lambda device, ms, metrics: Reading(device, DEVICES[device][0], BASE + ms / 1000,
                                            metrics),
        st.sampled_from(sorted(DEVICES)),
        st.integers(0, 600_000),  # ten minutes, millisecond precision as in the spool
        st.dictionaries(st.sampled_from(["power_w", "energy_wh", "vendor_x"]),
                        st.integers(-10**6, 10**6).map(lambda v: v / 8), min_size=1),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(readings=readings_strategy, cuts=st.lists(st.integers(0, 60), max_size=4),
       step=st.sampled_from([60, 120, 300]))
def test_rollups_and_series_equal_a_brute_force_recomputation(
        db: Db, readings: list[Reading], cuts: list[int], step: int) -> None:
    db.clear()
    bounds = sorted({0, len(readings), *(c for c in cuts if c < len(readings))})
    for recno, (lo, hi) in enumerate(pairwise(bounds)):
        db.store.apply(readings[lo:hi], end_recno=recno)
    stored = db.rollups()
    expected = brute_cells(readings)
    assert set(stored) == set(expected)
    for key, pairs in expected.items():
        values = pairs[1::2]
        lo_, hi_, total, count, last = stored[key]
        assert (lo_, hi_, count) == (min(values), max(values), len(values))
        assert total == pytest.approx(math.fsum(values))
        assert last == last_of(pairs)
    # The series of one device, and of building b1 (m-1 + ahu-1), per step from raw values.
    for selector, members in [("m-1", ["m-1"]), ("building:b1", ["m-1", "ahu-1"])]:
        got = series(db.engine, device_id=selector, metric="power_w", start=BASE - 600,
                     end=BASE + 1200, step=step, devices=DEVICES)
        want: dict[float, list[tuple[float, float, float, float, int]]] = {}
        for device in members:
            steps: dict[float, list[float]] = {}
            for r in readings:
                if r.device_id == device and "power_w" in r.metrics:
                    steps.setdefault(r.ts // step * step, []).extend([r.ts, r.metrics["power_w"]])
            for ts, pairs in steps.items():
                vals = pairs[1::2]
                want.setdefault(ts, []).append(
                    (min(vals), max(vals), math.fsum(vals) / len(vals), last_of(pairs),
                     len(vals)))
        assert [p.ts for p in got.points] == sorted(want)
        for p in got.points:
            parts = want[p.ts]
            assert p.min == pytest.approx(sum(x[0] for x in parts))
            assert p.max == pytest.approx(sum(x[1] for x in parts))
            assert p.mean == pytest.approx(sum(x[2] for x in parts))
            assert p.last == pytest.approx(sum(x[3] for x in parts))
            assert p.count == sum(x[4] for x in parts)
    # The latest values: each device's newest timestamp.
    cache = LatestCache(db.engine, DEVICES).load()
    for device in DEVICES:
        mine = [r for r in readings if r.device_id == device]
        if not mine:
            assert device not in cache
            continue
        newest = max(r.ts for r in mine)
        assert cache[device].ts == newest
        at_newest = [r for r in mine if r.ts == newest]
        assert set(at_newest[-1].metrics) <= set(cache[device].metrics)


def _batch(device: str, start: float, n: int, value: float = 1.0) -> list[Reading]:
    return [Reading(device, DEVICES[device][0], start + i, {"power_w": value}, i)
            for i in range(n)]


def test_a_replayed_batch_is_not_counted_twice(db: Db) -> None:
    assert db.store.applied_recno() == -1
    first, second = _batch("m-1", BASE, 30), _batch("m-1", BASE + 30, 30)
    db.store.apply(first, end_recno=29)
    db.store.apply(second, end_recno=59)
    # A crash before the spool cursor was saved: the worker replays from its old position.
    # It skips records <= applied_recno; a whole batch that slips through is ignored.
    assert db.store.applied_recno() == 59
    db.store.apply(second, end_recno=59)
    db.store.apply(first, end_recno=29)
    assert sum(row[3] for row in db.rollups().values()) == 60
    # Consumers are independent.
    assert db.store.applied_recno("other") == -1


def test_the_position_moves_in_the_same_transaction_as_the_rollups(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    db.store.apply(_batch("m-1", BASE, 10), end_recno=9)
    before = db.rollups()

    def crash(*args: object) -> None:
        raise RuntimeError("killed")

    # Killed after the rollups were written but before the position: nothing of it stays.
    monkeypatch.setattr(RollupStore, "_set_recno", crash)
    with pytest.raises(RuntimeError, match="killed"):
        db.store.apply(_batch("m-1", BASE + 10, 10, value=5.0), end_recno=19)
    monkeypatch.undo()
    assert db.rollups() == before and db.store.applied_recno() == 9
    assert LatestCache(db.engine, DEVICES).load()["m-1"].ts == BASE + 9
    # The replay after the restart applies it exactly once.
    db.store.apply(_batch("m-1", BASE + 10, 10, value=5.0), end_recno=19)
    assert sum(row[3] for row in db.rollups().values()) == 20
    assert db.store.applied_recno() == 19
    db.store.reset_cursor(recno=-1)  # a recreated spool numbers from 0 again
    assert db.store.applied_recno() == -1


def test_latest_merges_metrics_and_never_moves_back_in_time(db: Db) -> None:
    db.store.apply([Reading("m-1", "meter", BASE + 10, {"power_w": 5.0, "energy_wh": 1.0}, 7)],
                   end_recno=0)
    db.store.apply([Reading("m-1", "meter", BASE + 20, {"power_w": 6.0}, 8),
                    Reading("m-1", "meter", BASE + 15, {"voltage_v": 230.0}, 9)], end_recno=1)
    db.store.apply([Reading("m-1", "meter", BASE + 5, {"power_w": 1.0, "current_a": 2.0})],
                   end_recno=2)
    latest = LatestCache(db.engine, DEVICES).load()["m-1"]
    assert (latest.ts, latest.seq) == (BASE + 20, 8)
    assert latest.metrics == {"power_w": 6.0, "energy_wh": 1.0, "voltage_v": 230.0}
    # The late reading still counts in its minute's rollup.
    assert sum(row[3] for row in db.rollups().values()) == 6


def test_values_that_cannot_be_stored_are_skipped_and_counted(db: Db) -> None:
    db.store.apply([Reading("m-1", "meter", BASE, {"power_w": math.nan, "x" * 200: 1.0,
                                                    "energy_wh": 3.0})], end_recno=0)
    assert [k[1] for k in db.rollups()] == ["energy_wh"]
    assert db.store.skipped_values == 2
    # Nothing in a batch may make the database refuse it (the worker would retry forever).
    db.store.apply([Reading("d" * 65, "meter", BASE, {"power_w": 1.0, "energy_wh": 2.0}),
                    Reading("m-1", "meter\x00", BASE, {"power_w": 1.0}),
                    Reading("m-2", "meter", BASE, {"power\x00w": 1.0, "power_w": 4.0}),
                    Reading("m-2", "meter", 1e300, {"power_w": 1.0}),
                    Reading("m-2", "meter", math.inf, {"power_w": 1.0}),
                    Reading("m-2", "meter", BASE, {"power_w": 1.0}, seq=2**64)],
                   end_recno=1)
    assert db.store.skipped_values == 9 and db.store.applied_recno() == 1
    assert sorted(k[:2] for k in db.rollups()) == [("m-1", "energy_wh"), ("m-2", "power_w")]


def test_reading_the_store_never_takes_the_sqlite_write_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'scgw.db'}"
    upgrade(url)
    engine = make_engine(url)
    reader = read_engine(engine)
    try:
        with reader.connect() as conn:  # a long series query, still in its transaction
            conn.execute(select(func.count()).select_from(telemetry_rollups)).scalar()
            started = time.monotonic()  # a held write lock would make this wait 30 s
            RollupStore(LocalDb(url)).apply(_batch("m-1", BASE, 5), end_recno=0)
            assert time.monotonic() - started < 5
        assert reader is not engine
    finally:
        reader.dispose()
        engine.dispose()


def test_prune_deletes_rollups_beyond_retention(db: Db) -> None:
    now = BASE + 3 * 86_400
    db.store.apply([Reading("m-1", "meter", 5.0, {"power_w": 1.0}),  # a device's clock at 1970
                    Reading("m-1", "meter", now - 86_400 - 61, {"power_w": 1.0}),
                    Reading("m-1", "meter", now - 86_400 + 60, {"power_w": 1.0}),
                    Reading("m-1", "meter", now, {"power_w": 1.0})], end_recno=0)
    assert db.store.prune(now) == 2
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(telemetry_rollups)).scalar() == 2
    assert db.store.prune(now) == 0


def test_series_sums_and_refusals(db: Db) -> None:
    db.store.apply([*_batch("m-1", BASE, 120, 100.0), *_batch("m-2", BASE, 120, 50.0),
                    *_batch("ahu-1", BASE, 60, 10.0)], end_recno=0)

    def day(selector: str, step: int, metric: str = "power_w") -> SeriesResult:
        return series(db.engine, device_id=selector, metric=metric, start=BASE - 86_400,
                      end=BASE + 200, step=step, devices=DEVICES, site_id="s")

    site, meters = day("site:s", 3600), day("kind:meter", 3600)
    assert (site.unit, site.step, len(site.points)) == ("W", 3600, 1)
    assert site.points[0].mean == 160.0 and site.points[0].count == 300
    assert meters.points[0].mean == 150.0 and meters.points[0].last == 150.0
    # ahu-1 stopped after 60 s: its absence adds nothing to the last minute
    assert [p.mean for p in day("building:b1", 60).points] == [110.0, 110.0, 100.0]
    vendor = day("m-1", 60, "vendor_x")
    assert (vendor.unit, vendor.points) == ("", [])
    for selector, message in [("nope", "no device 'nope'"), ("gate-9", "no device 'gate-9'"),
                              ("building:b9", "no devices in building 'b9'"),
                              ("kind:lamp", "no device kind 'lamp'"),
                              ("kind:canteen", "no devices of kind 'canteen'"),
                              ("site:other", "no site 'other'"), ("x:y", "no device 'x:y'")]:
        with pytest.raises(UnknownSeries, match=message):
            day(selector, 60)
    for start, end, step in [(BASE, BASE, 60), (BASE, BASE - 1, 60), (BASE, BASE + 60, 90),
                             (BASE, BASE + 60, 0), (BASE - 10**6, BASE, 60),
                             (math.nan, BASE, 60)]:
        with pytest.raises(InvalidRange):
            series(db.engine, device_id="m-1", metric="power_w", start=start, end=end,
                   step=step, devices=DEVICES)


async def test_latest_cache_refreshes_from_the_store(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    db.store.apply(_batch("m-1", BASE, 1), end_recno=0)
    async with LatestCache(db.engine, {"m-1", "m-2"}, interval_s=0.05) as cache:
        first = cache.get("m-1")
        assert first is not None and first.metrics == {"power_w": 1.0}
        await asyncio.to_thread(db.store.apply, [*_batch("m-2", BASE, 2, 7.0),
                                                 *_batch("ahu-1", BASE, 1)], end_recno=1)
        for _ in range(100):
            if cache.get("m-2") is not None:
                break
            await asyncio.sleep(0.02)
        m2 = cache.get("m-2")
        assert m2 is not None and (m2.ts, m2.seq, m2.kind) == (BASE + 1, 1, "meter")
        assert cache.get("ahu-1") is None  # not in this cache's registry

        def down() -> dict[str, Reading]:
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))

        monkeypatch.setattr(cache, "load", down)
        assert await cache.refresh() is False
        assert cache.get("m-2") == m2  # the last values read are still served


def test_migration_0006_creates_exactly_these_tables(db: Db) -> None:
    mine = {"telemetry_rollups", "telemetry_latest", "telemetry_cursor"}

    def about_mine(diff: object) -> bool:
        text = repr(diff)
        return any(name in text for name in mine)

    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        assert [x for x in diffs if about_mine(x)] == []
        assert mine <= set(inspect(conn).get_table_names())
