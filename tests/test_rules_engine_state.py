"""Rules engine state: snapshot and restore (unchanged, changed and removed rules; corrupt
input), the columns container, and the exactness of bucket sums under any split."""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers.vocabulary import Reading
from rules import snapshot as snap
from rules.columns import ReadingColumns
from rules.detectors.buckets import OpenBuckets, fixed
from rules.engine import Engine
from rules.model import Match, NoDataRule, SiteContext, ThresholdRule

T = 1_700_000_000.0
SLOW = ThresholdRule(id="slow", match=Match(), metric="power_w", above=100.0, for_s=300.0,
                     source="rules.yaml:3")
FAST = ThresholdRule(id="fast", match=Match(), metric="power_w", above=100.0, for_s=100.0)
SILENT = NoDataRule(id="silent", match=Match(), timeout_s=600.0)


def hot(ts: float, device: str = "d-1") -> Reading:
    return Reading(device, "hvac", T + ts, {"power_w": 500.0})


def test_restore_keeps_pending_timers_and_firing_alerts_of_unchanged_rules() -> None:
    engine = Engine([SLOW, FAST], SiteContext())
    (fast_fired,) = engine.process([hot(0), hot(100)])  # fast fires, slow is pending
    moved = dataclasses.replace(SLOW, source="elsewhere.yaml:40")  # provenance only
    changed = dataclasses.replace(FAST, above=50.0)
    restored = Engine.restore([moved, changed], SiteContext(), engine.snapshot())
    assert restored.active() == []  # `fast` changed: its alert and timer are gone
    got = restored.process([hot(300)])
    assert [(t.rule_id, t.state, t.started_at) for t in got] == [("slow", "firing", T)]
    assert fast_fired.alert_id not in {t.alert_id for t in restored.active()}


def test_restore_continues_a_firing_alert_with_the_same_id() -> None:
    engine = Engine([FAST], SiteContext())
    engine.process([hot(0), hot(100)])
    restored = Engine.restore([FAST], SiteContext(), engine.snapshot())
    assert restored.active() == engine.active()
    (resolved,) = restored.process([Reading("d-1", "hvac", T + 200, {"power_w": 1.0})])
    assert (resolved.state, resolved.alert_id) == ("resolved", engine.active()[0].alert_id)


def test_removed_rules_are_dropped_and_new_rules_start_fresh() -> None:
    engine = Engine([FAST, SILENT], SiteContext())
    engine.process([hot(0), hot(100)])
    restored = Engine.restore([SLOW], SiteContext(), engine.snapshot())
    assert restored.process([hot(300)]) == []  # slow's run starts after the restore
    assert restored.counters["readings"] == 3


def test_snapshots_are_deterministic_and_restore_round_trips_exactly() -> None:
    items = [hot(t, d) for t in range(0, 500, 50) for d in ("a", "b")]
    one, two = Engine([SLOW, SILENT], SiteContext()), Engine([SLOW, SILENT], SiteContext())
    one.process(items)
    two.process(items[:7])
    two.process(items[7:])
    assert one.snapshot() == two.snapshot()
    again = Engine.restore([SLOW, SILENT], SiteContext(), one.snapshot())
    assert again.snapshot() == one.snapshot()
    fresh = Engine([SLOW], SiteContext())
    assert Engine.restore([SLOW], SiteContext(), fresh.snapshot()).snapshot() == fresh.snapshot()


def _reframed(payload: bytes, version: int = snap.VERSION) -> bytes:
    body = zlib.compress(payload)
    return snap.MAGIC + snap._PREFIX.pack(version, zlib.crc32(body)) + body


@pytest.mark.parametrize("mangle", [
    lambda s: b"",
    lambda s: b"not a snapshot at all",
    lambda s: s[:-5],
    lambda s: s[:30] + bytes([s[30] ^ 1]) + s[31:],
    lambda s: s.replace(snap.MAGIC, b"SCGWRULEX", 1),
    lambda s: _reframed(b"\x05\x00\x00\x00{}{}"),
    lambda s: _reframed(b"\x02\x00\x00\x00{}"),
    lambda s: _reframed(zlib.decompress(s[len(snap.MAGIC) + snap._PREFIX.size:]), 99),
    lambda s: snap.encode({"wm": 1.0}, {}),
    lambda s: snap.encode({"meta": 1}, {"x": np.zeros(3)}),
])
def test_corrupt_or_incompatible_snapshots_raise_value_error(mangle: object) -> None:
    engine = Engine([SLOW, SILENT], SiteContext())
    engine.process([hot(0), hot(50, "b")])
    assert callable(mangle)
    with pytest.raises(ValueError):
        Engine.restore([SLOW, SILENT], SiteContext(), mangle(engine.snapshot()))


def test_snapshot_arrays_of_object_dtype_are_refused() -> None:
    good = snap.encode({"k": 1}, {"a": np.arange(3)})
    meta, arrays = snap.decode(good)
    assert meta == {"k": 1} and arrays["a"].tolist() == [0, 1, 2]
    raw = zlib.decompress(good[len(snap.MAGIC) + snap._PREFIX.size:])
    with pytest.raises(ValueError, match="dtype"):
        snap.decode(_reframed(raw.replace(b'"<i8"', b'"|O8"')))


# ---- columns -------------------------------------------------------------------------------


def test_columns_from_readings_keep_order_and_treat_non_finite_as_absent() -> None:
    columns = ReadingColumns.from_readings([
        Reading("a", "meter", 2.0, {"power_w": 1.0}),
        Reading("b", "hvac", 1.0, {"power_w": float("inf"), "temperature_c": 20.0}),
        Reading("a", "meter", 3.0, {"power_w": "bad", "running": True})])  # type: ignore[dict-item]
    assert columns.device_ids == ("a", "b") and columns.kinds == ("meter", "hvac")
    assert columns.device.tolist() == [0, 1, 0] and columns.ts.tolist() == [2.0, 1.0, 3.0]
    assert np.isnan(columns.metrics["power_w"][1:]).all()
    assert columns.metrics["running"].tolist()[2] == 1.0


@pytest.mark.parametrize("kwargs", [
    {"device": np.array([0, 1]), "ts": np.array([1.0])},
    {"device": np.array([0, 5]), "ts": np.array([1.0, 2.0])},
    {"device": np.array([0, 0]), "ts": np.array([1.0, np.nan])},
    {"device": np.array([0, 0]), "ts": np.array([1.0, 2.0]), "metrics": {"p": np.zeros(3)}},
])
def test_columns_validate_their_shape(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ReadingColumns(("a",), ("meter",), **kwargs)  # type: ignore[arg-type]


# ---- exact bucket sums ----------------------------------------------------------------------


finite = st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None)
@given(st.lists(finite, min_size=1, max_size=60), st.data())
def test_bucket_means_do_not_depend_on_how_the_stream_is_split(values: list[float],
                                                                data: st.DataObject) -> None:
    n = len(values)
    ts = (T + np.arange(n) * 7.0).astype(np.float64)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, n), max_size=5))))
    means = []
    for bounds in ([0, n], [0, *cuts, n]):
        buckets = OpenBuckets()
        buckets.resize(1)
        got = []
        for a, b in itertools.pairwise(bounds):
            part = np.array(values[a:b])
            dev = np.zeros(b - a, dtype=np.int64)
            closed = buckets.collect(dev, ts[a:b], fixed(part), ts[a:b], 60.0, float(ts[b - 1])
                                     if b > a else 0.0)
            got += closed.mean.tolist()
        closed = buckets.collect(np.zeros(0, np.int64), np.zeros(0), fixed(np.zeros(0)),
                                 np.zeros(0), 60.0, T + 1e9)
        means.append(got + closed.mean.tolist())
    assert means[0] == means[1]
    assert len(means[0]) == len(set(np.floor(ts / 60.0).tolist()))


@settings(max_examples=80, deadline=None)
@given(finite.filter(lambda v: v == 0 or abs(v) >= 2.0**-27))
def test_a_single_value_is_its_own_mean(value: float) -> None:
    buckets = OpenBuckets()
    buckets.resize(1)
    one = np.zeros(1, dtype=np.int64)
    closed = buckets.collect(one, np.array([T]), fixed(np.array([value])), np.array([T]), 60.0,
                             T + 60.0)
    assert closed.mean.tolist() == [value]


def test_restore_under_a_changed_registry_judges_with_the_new_members() -> None:
    """m-1 leaves the registry between snapshot and restore: its half-collected bucket no
    longer counts, the main meter's building is judged with the members it has now."""
    from rules.model import DeviceInfo, GroupRule

    def site(*devices: str) -> SiteContext:
        return SiteContext(devices={d: DeviceInfo(d, "meter", "b1") for d in devices})

    rule = GroupRule(id="balance", match=Match(kinds=frozenset({"meter"})),
                     main=Match(device_ids=("m-main",)), window_s=60.0, tolerance_pct=10.0)
    engine = Engine([rule], site("m-main", "m-1"))
    engine.process([Reading("m-main", "meter", 0.0, {"power_w": 500.0}),
                    Reading("m-1", "meter", 1.0, {"power_w": 500.0})])
    moved = Engine.restore([rule], site("m-main"), engine.snapshot())
    got = moved.process([Reading("m-main", "meter", 300.0, {"power_w": 500.0})])
    assert [(t.device_id, t.state, t.ts, t.value) for t in got] == [
        ("m-main", "firing", 60.0, 500.0)]
