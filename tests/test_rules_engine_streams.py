"""The engine against the scalar reference on generated streams (hypothesis), and the
columns fast path against `Reading` objects. Other property tests reuse these streams."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_drivers.vocabulary import DeviceEvent, Reading
from rules.columns import ReadingColumns
from rules.engine import Engine
from rules.model import (
    BaselineRule,
    Calendar,
    CounterRule,
    DeviceInfo,
    EventRule,
    FlatlineRule,
    GroupRule,
    Match,
    NoDataRule,
    RateOfChangeRule,
    RatioRule,
    Rule,
    ScheduleRule,
    SiteContext,
    ThresholdRule,
    Transition,
)
from tests.test_rules_engine_reference import Item, Reference, Row

T0 = 1_700_000_000.0  # a Tuesday, 22:13:20 UTC
METERS = Match(kinds=frozenset({"meter"}))
HVAC = Match(kinds=frozenset({"hvac"}))
SITE = SiteContext(
    timezone="Asia/Shanghai",
    calendars={"b1": Calendar(weekly=tuple(((0, 370), (400, 1440)) for _ in range(7)))},
    devices={d.device_id: d for d in (
        DeviceInfo("m-main", "meter", "b1"), DeviceInfo("m-sub", "meter", "b1"),
        DeviceInfo("h-1", "hvac", "b1"), DeviceInfo("h-quiet", "hvac", "b1"))},
)
RULES: tuple[Rule, ...] = (
    ThresholdRule(id="hot", match=HVAC, metric="power_w", above=5000.0, clear=4000.0),
    ThresholdRule(id="hot-for", match=HVAC, metric="power_w", above=5000.0, for_s=60.0),
    ThresholdRule(id="cold", match=Match(), metric="temperature_c", below=10.0, clear=12.0,
                  for_s=20.0),
    RateOfChangeRule(id="ramp", match=Match(), metric="power_w", max_per_s=100.0,
                     clear_per_s=50.0, min_interval_s=5.0, direction="up"),
    RateOfChangeRule(id="swing", match=HVAC, metric="temperature_c", max_per_s=0.5),
    FlatlineRule(id="stuck", match=Match(), metric="power_w", window_s=120.0),
    FlatlineRule(id="stuck-tol", match=Match(), metric="temperature_c", window_s=60.0,
                 tolerance=0.5, ignore_below=1.0, for_s=10.0),
    CounterRule(id="counter", match=METERS, counter_max=10_000.0, jump_margin=5.0,
                clear_after_s=300.0),
    CounterRule(id="counter-gap", match=METERS, counter_max=10_000.0, jump_margin=5.0,
                max_power=3000.0, clear_after_s=300.0),
    NoDataRule(id="silent", match=Match(), timeout_s=600.0),
    NoDataRule(id="silent-temp", match=HVAC, metric="temperature_c", timeout_s=300.0),
    ScheduleRule(id="after-hours", match=Match(), metric="power_w", above=1000.0,
                 clear=500.0),
    BaselineRule(id="usual", match=Match(), metric="power_w", bucket_s=60.0,
                 history_weeks=1, k=3.0, min_abs_deviation=50.0, warmup_s=120.0),
    BaselineRule(id="usual-ewma", match=HVAC, metric="power_w", bucket_s=120.0,
                 method="ewma", alpha=0.5, k=2.0, direction="up", warmup_s=0.0),
    RatioRule(id="filter", match=HVAC, numerator="filter_dp_pa", denominator="fan_speed_pct",
              exponent=2.0, learn_s=300.0, window_s=60.0, rise_pct=30.0, fall_pct=30.0,
              clear_pct=10.0),
    GroupRule(id="balance", match=METERS, main=Match(device_ids=("m-main",)),
              window_s=60.0, tolerance_pct=10.0, min_abs=20.0),
    EventRule(id="tamper", match=Match(), events=frozenset({"tamper", "door_forced"}),
              clear_events=frozenset({"reset"}), clear_after_s=120.0),
)


# ---- generated streams ----------------------------------------------------------------------

DEVICES = ("m-main", "m-sub", "h-1", "h-quiet", "x-9")
KIND = {"m-main": "meter", "m-sub": "meter", "h-1": "hvac", "h-quiet": "hvac", "x-9": "hvac"}
STEPS = (0.0, 1.0, 3.0, 7.0, 20.0, 45.0, 70.0, 130.0, 400.0, 700.0, 3000.0)
POWER = (0.0, 100.0, 400.0, 600.0, 1200.0, 3000.0, 4000.0, 4500.0, 5000.0, 5000.5, 8000.0)
TEMPS = (0.5, 9.0, 10.0, 11.0, 11.2, 11.6, 12.0, 12.5, 20.0, 20.4, 20.9)


@st.composite
def streams(draw: st.DrawFn, max_items: int = 80) -> list[Item]:
    """Readings and events of a few devices around the rules' thresholds and windows.

    Mostly in time order, with same-time readings, per-device reordering (late readings)
    and counter regressions, rollovers and jumps mixed in.
    """
    n = draw(st.integers(1, max_items))
    ts = T0 + draw(st.sampled_from((0.0, 17.0, 59.0)))
    energy = {d: draw(st.sampled_from((100.0, 9_800.0))) for d in DEVICES}
    items: list[Item] = []
    for _ in range(n):
        device = draw(st.sampled_from(DEVICES[:4] if draw(st.integers(0, 9)) else DEVICES))
        ts += draw(st.sampled_from(STEPS))
        at = ts - draw(st.sampled_from((0.0, 0.0, 0.0, 0.0, 2.0, 50.0)))
        kind = KIND[device]
        if draw(st.integers(0, 11)) == 0:
            items.append(DeviceEvent(device, kind, at, draw(st.sampled_from(
                ("tamper", "reset", "door_forced", "other")))))
            continue
        metrics: dict[str, float] = {}
        if draw(st.booleans()) or kind == "meter":
            metrics["power_w"] = draw(st.sampled_from(POWER))
        if kind == "meter" and draw(st.integers(0, 3)):
            step = draw(st.sampled_from((0.0, 1.0, 10.0, 300.0, -5.0, 400.0)))
            energy[device] = (energy[device] + step) % 10_000.0
            metrics["energy_wh"] = energy[device]
        if kind == "hvac":
            if draw(st.booleans()):
                metrics["temperature_c"] = draw(st.sampled_from(TEMPS))
            if draw(st.booleans()):
                metrics["fan_speed_pct"] = draw(st.sampled_from((0.0, 40.0, 50.0, 60.0)))
                metrics["filter_dp_pa"] = draw(st.sampled_from((80.0, 100.0, 120.0, 160.0)))
        items.append(Reading(device, kind, at, metrics))
    return items


def rows(transitions: Iterable[Transition]) -> list[Row]:
    return sorted((t.ts, t.rule_id, t.device_id, t.state, t.value, t.started_at)
                  for t in transitions)


def canonical(values: Iterable[Row]) -> list[Row]:
    return sorted(values, key=lambda r: (r[0], r[1], r[2], r[3], repr(r[4]), r[5]))


def only_readings(items: Sequence[Item]) -> list[Reading]:
    return [i for i in items if isinstance(i, Reading)]


RELAXED = settings(max_examples=75, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])


# ---- the engine against the reference ---------------------------------------------------


@RELAXED
@given(streams())
def test_engine_matches_the_scalar_reference(items: list[Item]) -> None:
    engine = Engine(RULES, SITE)
    got = canonical(rows(engine.process(items)))
    assert got == canonical(Reference(RULES, SITE).process(items))


@RELAXED
@given(streams(), st.integers(1, 4))
def test_engine_matches_the_reference_call_by_call(items: list[Item], parts: int) -> None:
    """Deadlines settle by watermark inside each call just as item by item."""
    engine, reference = Engine(RULES, SITE), Reference(RULES, SITE)
    size = max(1, len(items) // parts)
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        assert canonical(rows(engine.process(chunk))) == canonical(reference.process(chunk))


@RELAXED
@given(streams())
def test_columns_path_equals_objects_path(items: list[Item]) -> None:
    readings = only_readings(items)
    by_objects = Engine(RULES, SITE).process(readings)
    by_columns = Engine(RULES, SITE).process_columns(ReadingColumns.from_readings(readings))
    assert by_columns == by_objects


def test_reference_sees_the_kinds_it_is_meant_to_check() -> None:
    """Guard against a stream generator that never exercises a rule (vacuous equality)."""
    fired: set[str] = set()
    for seed in range(10):
        fired |= {row[1] for row in Reference(RULES, SITE).process(_seeded(seed))}
    assert fired >= {r.id for r in RULES} - {"usual-ewma"}


def _seeded(seed: int) -> list[Item]:
    """A deterministic long stream in the style of `streams()`."""
    rng = np.random.default_rng(seed)
    ts = T0
    energy = dict.fromkeys(DEVICES, 9_800.0)
    items: list[Item] = []
    for _ in range(600):
        device = DEVICES[int(rng.integers(0, 5))]
        ts += float(rng.choice(STEPS))
        kind = KIND[device]
        if rng.integers(0, 12) == 0:
            items.append(DeviceEvent(device, kind, ts, str(rng.choice(
                ["tamper", "reset", "door_forced"]))))
            continue
        metrics = {"power_w": float(rng.choice(POWER))}
        if kind == "meter":
            energy[device] = (energy[device] + float(rng.choice([1, 10, 300, -5]))) % 10_000
            metrics["energy_wh"] = energy[device]
        else:
            metrics["temperature_c"] = float(rng.choice(TEMPS))
            metrics["fan_speed_pct"] = 50.0
            metrics["filter_dp_pa"] = float(rng.choice([100.0, 100.0, 160.0]))
        items.append(Reading(device, kind, ts, metrics))
    return items


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000))
def test_engine_matches_the_reference_on_long_streams(seed: int) -> None:
    items = _seeded(seed)
    assert canonical(rows(Engine(RULES, SITE).process(items))) == canonical(
        Reference(RULES, SITE).process(items))
