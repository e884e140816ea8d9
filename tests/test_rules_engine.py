"""Rules engine: the semantics of each point-in-time rule kind at its edges, late readings,
messages, output order and the live deadman."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from device_drivers.vocabulary import DeviceEvent, Reading
from rules.engine import Engine
from rules.model import (
    CounterRule,
    DeviceInfo,
    EventRule,
    FlatlineRule,
    Match,
    NoDataRule,
    RateOfChangeRule,
    Rule,
    SiteContext,
    ThresholdRule,
    Transition,
    alert_id,
)

T = 1_700_000_000.0
HVAC = Match(kinds=frozenset({"hvac"}))
HOT = ThresholdRule(id="hot", match=HVAC, metric="power_w", above=5000.0, clear=4500.0)


def power(ts: float, value: float, device: str = "hvac-b1-1") -> Reading:
    return Reading(device, "hvac", T + ts, {"power_w": value})


def run(rules: Sequence[Rule], items: Sequence[Reading | DeviceEvent],
        context: SiteContext | None = None) -> list[Transition]:
    return Engine(rules, context or SiteContext()).process(items)


def brief(transitions: Sequence[Transition]) -> list[tuple[str, float]]:
    return [(t.state, t.ts - T) for t in transitions]


# ---- threshold -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "fires"), [(4999.9, False), (5000.0, False),
                                              (5000.1, True)])
def test_threshold_fires_only_strictly_above(value: float, fires: bool) -> None:
    assert bool(run([HOT], [power(0, value)])) is fires


def test_threshold_alert_carries_its_identity_value_and_default_message() -> None:
    rule = ThresholdRule(id="hot", match=HVAC, metric="power_w", above=5000.0, for_s=300.0)
    (fired,) = run([rule], [power(0, 5100.0), power(300, 5312.4)])
    assert (fired.state, fired.started_at, fired.ts, fired.value) == ("firing", T, T + 300,
                                                                      5312.4)
    assert fired.alert_id == alert_id("hot", "hvac-b1-1", T)
    assert fired.message == "power_w of hvac-b1-1 above 5000 for 300 s (value 5312.4)"
    assert fired.to_wire()["metric"] == "power_w"


def test_threshold_for_one_second_short_stays_pending() -> None:
    rule = ThresholdRule(id="hot", match=HVAC, metric="power_w", above=5000.0, for_s=300.0)
    assert run([rule], [power(0, 6000.0), power(299, 6000.0)]) == []
    assert brief(run([rule], [power(0, 6000.0), power(299, 6000.0), power(300, 6000.0)])) == [
        ("firing", 300.0)]


def test_a_dip_into_the_hysteresis_band_restarts_the_pending_timer() -> None:
    rule = ThresholdRule(id="hot", match=HVAC, metric="power_w", above=5000.0, clear=4000.0,
                         for_s=100.0)
    items = [power(0, 6000.0), power(60, 4500.0), power(70, 6000.0), power(120, 6000.0),
             power(170, 6000.0)]
    (fired,) = run([rule], items)
    assert (fired.started_at - T, fired.ts - T) == (70.0, 170.0)


def test_hysteresis_resolves_strictly_below_clear_with_the_same_alert() -> None:
    items = [power(0, 6000.0), power(10, 4500.0), power(20, 4499.0)]
    fired, resolved = run([HOT], items)
    assert brief([fired, resolved]) == [("firing", 0.0), ("resolved", 20.0)]
    assert (resolved.alert_id, resolved.started_at) == (fired.alert_id, fired.started_at)
    assert resolved.message == "power_w of hvac-b1-1 back below 4500 (value 4499)"


@pytest.mark.parametrize("for_s", [0.0, 30.0])
def test_flapping_around_the_threshold_without_crossing_clear_is_one_alert(for_s: float) -> None:
    rule = ThresholdRule(id="hot", match=HVAC, metric="power_w", above=5000.0, clear=4000.0,
                         for_s=for_s)
    values = [6000.0, 6000.0, 6000.0, 4999.0, 5001.0, 4500.0, 5200.0, 4001.0, 5000.1]
    items = [power(i * 15.0, v) for i, v in enumerate(values)]
    assert [t.state for t in run([rule], items)] == ["firing"]


def test_below_threshold_mirrors_above() -> None:
    rule = ThresholdRule(id="cold", match=Match(), metric="temperature_c", below=10.0,
                         clear=12.0)
    items = [Reading("t-1", "hvac", T + i, {"temperature_c": v})
             for i, v in enumerate([10.0, 9.9, 11.0, 12.0, 12.1])]
    assert brief(run([rule], items)) == [("firing", 1.0), ("resolved", 4.0)]


def test_readings_without_the_metric_or_of_other_kinds_are_ignored() -> None:
    items = [Reading("m-1", "meter", T, {"power_w": 9000.0}),
             Reading("hvac-1", "hvac", T, {"temperature_c": 9000.0})]
    assert run([HOT], items) == []


# ---- late readings, order, counters ---------------------------------------------------------


def test_late_readings_are_ignored_and_counted() -> None:
    engine = Engine([HOT], SiteContext())
    engine.process([power(10, 100.0)])
    assert engine.process([power(10, 9000.0), power(5, 9000.0)]) == []
    assert engine.counters["late"] == 2 and engine.counters["readings"] == 1
    assert engine.process([power(11, 9000.0)])


def test_output_is_sorted_by_time_then_rule_order_then_device() -> None:
    other = ThresholdRule(id="a-rule", match=HVAC, metric="power_w", above=1.0)
    items = [power(5, 6000.0, "hvac-b"), power(5, 6000.0, "hvac-a"), power(1, 6000.0, "hvac-c")]
    got = run([HOT, other], items)
    assert [(t.ts - T, t.rule_id, t.device_id) for t in got] == [
        (1.0, "hot", "hvac-c"), (1.0, "a-rule", "hvac-c"), (5.0, "hot", "hvac-a"),
        (5.0, "hot", "hvac-b"), (5.0, "a-rule", "hvac-a"), (5.0, "a-rule", "hvac-b")]


def test_active_lists_firing_alerts_until_resolved() -> None:
    engine = Engine([HOT], SiteContext())
    (fired,) = engine.process([power(0, 6000.0)])
    assert engine.active() == [fired]
    engine.process([power(1, 100.0)])
    assert engine.active() == []


# ---- messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "expected"), [
    ("{device_id} ({kind}, {building}) {metric}={value:.0f} > {above} [{team}] {severity}",
     "hvac-b1-1 (hvac, b1) power_w=6000 > 5000.0 [ops] critical"),
    ("{nope} is not a field", "power_w of hvac-b1-1 above 5000 (value 6000)"),
    ("{value:%Y} bad spec", "power_w of hvac-b1-1 above 5000 (value 6000)"),
    ("{rule_id.__class__} attribute access", "power_w of hvac-b1-1 above 5000 (value 6000)"),
    ("{0} positional", "power_w of hvac-b1-1 above 5000 (value 6000)"),
    ("unbalanced {", "power_w of hvac-b1-1 above 5000 (value 6000)"),
])
def test_message_templates_render_or_fall_back_without_losing_the_alert(
        template: str, expected: str) -> None:
    rule = ThresholdRule(id="hot", match=HVAC, metric="power_w", above=5000.0,
                         severity="critical", labels={"team": "ops"}, message=template)
    context = SiteContext(devices={"hvac-b1-1": DeviceInfo("hvac-b1-1", "hvac", "b1")})
    (fired,) = run([rule], [power(0, 6000.0)], context)
    assert fired.message == expected
    assert fired.labels == {"team": "ops"}


# ---- rate of change -----------------------------------------------------------------------


def test_rate_of_change_compares_consecutive_readings_per_second() -> None:
    rule = RateOfChangeRule(id="ramp", match=HVAC, metric="power_w", max_per_s=100.0,
                            clear_per_s=50.0, direction="up", min_interval_s=5.0)
    # 22 s is too close to 20 s to compare, but still the previous reading for 30 s;
    # 400 / 8 = 50 per second is not under the clear rate, 300 / 10 is
    items = [power(0, 0.0), power(10, 1000.0), power(20, 2001.0), power(22, 9000.0),
             power(30, 9400.0), power(40, 9700.0)]
    got = run([rule], items)
    assert brief(got) == [("firing", 20.0), ("resolved", 40.0)]
    assert got[0].value == pytest.approx(100.1)


def test_rate_down_ignores_rises() -> None:
    rule = RateOfChangeRule(id="drop", match=HVAC, metric="power_w", max_per_s=10.0,
                            direction="down")
    assert run([rule], [power(0, 0.0), power(1, 1000.0)]) == []
    assert brief(run([rule], [power(0, 1000.0), power(1, 0.0)])) == [("firing", 1.0)]


# ---- flatline ------------------------------------------------------------------------------


def test_flatline_fires_after_window_without_change_and_resolves_on_change() -> None:
    rule = FlatlineRule(id="stuck", match=HVAC, metric="power_w", window_s=60.0)
    items = [power(t, 1234.5) for t in (0, 30, 59)] + [power(60, 1234.5), power(61, 1234.6)]
    got = run([rule], items)
    assert brief(got) == [("firing", 60.0), ("resolved", 61.0)]


def test_flatline_tolerance_is_relative_to_the_anchor_not_the_previous_value() -> None:
    """9.7 is 0.7 from 10.4 but only 0.3 from the anchor 10.0: still flat."""
    rule = FlatlineRule(id="stuck", match=HVAC, metric="power_w", window_s=60.0,
                        tolerance=0.5)
    flat = [power(0, 10.0), power(20, 10.4), power(40, 9.7), power(60, 10.2)]
    assert brief(run([rule], flat)) == [("firing", 60.0)]
    drift = [power(0, 10.0), power(20, 10.4), power(40, 10.8), power(60, 11.2)]
    assert run([rule], drift) == []  # 10.8 is more than 0.5 from 10.0: a change


def test_flatline_anchors_stay_per_device_across_calls() -> None:
    rule = FlatlineRule(id="stuck", match=HVAC, metric="power_w", window_s=60.0)
    engine = Engine([rule], SiteContext())
    engine.process([power(0, 5.0, "a"), power(10, 7.0, "b")])
    got = engine.process([power(30, 5.0, "a"), power(40, 7.0, "b"), power(60, 5.0, "a"),
                          power(69, 7.0, "b")])
    assert [(t.device_id, t.state, t.ts - T) for t in got] == [("a", "firing", 60.0)]


def test_flatline_carries_its_anchor_into_the_next_call() -> None:
    """10.4 is within 0.5 of the anchor 10.0 set in the previous call: still flat."""
    rule = FlatlineRule(id="stuck", match=HVAC, metric="power_w", window_s=60.0,
                        tolerance=0.5)
    engine = Engine([rule], SiteContext())
    engine.process([power(0, 10.0), power(20, 10.0)])
    assert brief(engine.process([power(40, 10.4), power(60, 10.3)])) == [("firing", 60.0)]


def test_flatline_ignores_switched_off_values() -> None:
    rule = FlatlineRule(id="stuck", match=HVAC, metric="power_w", window_s=60.0,
                        ignore_below=1.0)
    assert run([rule], [power(t, 0.5) for t in range(0, 200, 20)]) == []
    items = [power(0, 50.0), power(70, 50.0), power(80, 0.0), power(90, 50.0)]
    assert brief(run([rule], items)) == [("firing", 70.0), ("resolved", 80.0)]


# ---- counter -------------------------------------------------------------------------------


def meter(ts: float, energy: float, watts: float | None = 3600.0) -> Reading:
    metrics = {"energy_wh": energy} | ({} if watts is None else {"power_w": watts})
    return Reading("m-1", "meter", T + ts, metrics)


COUNTER = CounterRule(id="counter", match=Match(), counter_max=10_000.0, jump_factor=2.0,
                      jump_margin=5.0, clear_after_s=600.0)


def test_counter_regression_fires_and_resolves_after_quiet_time_by_watermark() -> None:
    items = [meter(0, 5000.0), meter(10, 4990.0), meter(20, 5000.0),
             Reading("other", "meter", T + 611, {"power_w": 1.0})]
    got = run([COUNTER], items)
    assert brief(got) == [("firing", 10.0), ("resolved", 610.0)]
    assert got[0].value == -10.0 and "regression" in got[0].message


def test_counter_rollover_is_not_an_anomaly() -> None:
    assert run([COUNTER], [meter(0, 9_990.0), meter(10, 3.0)]) == []


def test_counter_jump_compares_with_the_energy_the_power_explains() -> None:
    # 3600 W for 10 s explains 10 Wh; 2 x 10 + 5 = 25 Wh is the limit
    assert run([COUNTER], [meter(0, 100.0), meter(10, 125.0)]) == []
    (fired,) = run([COUNTER], [meter(0, 100.0), meter(10, 125.1)])
    assert "jump" in fired.message
    assert run([COUNTER], [meter(0, 100.0, None), meter(10, 900.0, None)]) == []


def test_counter_max_power_scales_the_allowance_with_the_gap() -> None:
    """A unit reading standby at both ends may have run at up to max_power in between:
    7200 W for 10 s is 20 Wh, + 5 = 25 Wh; over a 100 s gap, 205 Wh."""
    rule = dataclasses.replace(COUNTER, max_power=7200.0)
    assert run([rule], [meter(0, 100.0, 0.0), meter(10, 125.0, 0.0)]) == []
    assert brief(run([rule], [meter(0, 100.0, 0.0), meter(10, 125.1, 0.0)])) == [
        ("firing", 10.0)]
    assert run([rule], [meter(0, 100.0, 0.0), meter(100, 305.0, 0.0)]) == []
    assert brief(run([rule], [meter(0, 100.0, 0.0), meter(100, 305.1, 0.0)])) == [
        ("firing", 100.0)]
    # the power readings still count where they explain more: 2 x 36 kW x 10 s = 200 Wh
    assert run([rule], [meter(0, 100.0, 36_000.0), meter(10, 305.0, 36_000.0)]) == []


def test_counter_power_mean_spans_the_readings_between_counter_readings() -> None:
    items = [meter(0, 100.0, 0.0), Reading("m-1", "meter", T + 5, {"power_w": 10_800.0}),
             meter(10, 135.0, 0.0)]  # mean 3600 W over 10 s: 10 Wh; limit 25
    assert brief(run([COUNTER], items)) == [("firing", 10.0)]
    items[1] = Reading("m-1", "meter", T + 5, {"power_w": 21_600.0})  # mean 7200: limit 45
    assert run([COUNTER], items) == []


def test_counter_power_mean_spans_calls() -> None:
    """Mean of 3600, 10800 and 0 W over 10 s explains 13.3 Wh: 30 Wh is within 2x + 5."""
    engine = Engine([COUNTER], SiteContext())
    engine.process([meter(0, 100.0, 3600.0), Reading("m-1", "meter", T + 5,
                                                     {"power_w": 10_800.0})])
    assert engine.process([meter(10, 130.0, 0.0)]) == []
    assert [t.state for t in engine.process([meter(20, 150.0, 0.0)])] == ["firing"]


# ---- no data ------------------------------------------------------------------------------


SILENT = NoDataRule(id="silent", match=Match(), timeout_s=600.0)


def test_a_gap_longer_than_the_timeout_fires_at_its_deadline_and_resolves_on_data() -> None:
    assert run([SILENT], [power(0, 1.0), power(600, 1.0)]) == []  # exactly the timeout
    fired, resolved = run([SILENT], [power(0, 1.0), power(600.5, 1.0)])
    assert brief([fired, resolved]) == [("firing", 600.0), ("resolved", 600.5)]
    assert fired.started_at == resolved.started_at == T + 600
    assert fired.message == "no data from hvac-b1-1 for 600 s"


def test_another_devices_newer_reading_reveals_the_silence() -> None:
    got = run([SILENT], [power(0, 1.0, "a"), power(601, 1.0, "b")])
    assert [(t.device_id, t.state, t.ts - T) for t in got] == [("a", "firing", 600.0)]


def test_a_reading_delayed_past_the_watermark_still_reveals_the_silence_before_it() -> None:
    """a's reading at 599 arrives after b's at 601: by then a was already silent for 600 s
    of stream time, in this call or split over two. The resolution is not stamped before
    the firing."""
    items = [power(0, 1.0, "a"), power(601, 1.0, "b"), power(599, 1.0, "a")]
    expected = [("a", "firing", 600.0), ("a", "resolved", 600.0)]
    assert [(t.device_id, t.state, t.ts - T) for t in run([SILENT], items)] == expected
    engine = Engine([SILENT], SiteContext())
    split = engine.process(items[:1]) + engine.process(items[1:])
    assert [(t.device_id, t.state, t.ts - T) for t in split] == expected


def test_a_registered_device_that_never_reports_is_silent_from_the_first_watermark() -> None:
    context = SiteContext(devices={"quiet": DeviceInfo("quiet", "hvac", "b1")})
    got = run([SILENT], [power(0, 1.0), power(500, 1.0), power(700, 1.0)], context)
    assert [(t.device_id, t.state, t.ts - T) for t in got] == [("quiet", "firing", 600.0)]


def test_a_metric_deadman_counts_only_readings_with_that_metric() -> None:
    rule = NoDataRule(id="no-temp", match=Match(), metric="temperature_c", timeout_s=60.0)
    items = [Reading("h", "hvac", T, {"temperature_c": 20.0}), power(50, 1.0, "h"),
             power(100, 1.0, "h")]
    assert brief(run([rule], items)) == [("firing", 60.0)]


def test_tick_fires_on_wall_clock_and_event_time_does_not_fire_twice() -> None:
    engine = Engine([SILENT], SiteContext())
    engine.process([power(0, 1.0)])
    assert engine.tick(T + 600) == []
    (fired,) = engine.tick(T + 601)
    assert (fired.state, fired.ts) == ("firing", T + 600)
    assert engine.tick(T + 700) == []
    assert [t.state for t in engine.process([power(650, 1.0, "x"), power(900, 1.0)])] == [
        "resolved"]


# ---- events -------------------------------------------------------------------------------


TAMPER = EventRule(id="tamper", match=Match(), events=frozenset({"tamper"}),
                   clear_events=frozenset({"reset"}), clear_after_s=100.0)


def event(ts: float, kind: str, device: str = "gate-1") -> DeviceEvent:
    return DeviceEvent(device, "gate", T + ts, kind)


def test_event_fires_extends_and_clears_on_a_clear_event() -> None:
    items = [event(0, "tamper"), event(50, "tamper"), event(120, "reset")]
    got = run([TAMPER], items)
    assert brief(got) == [("firing", 0.0), ("resolved", 120.0)]
    assert got[0].message == "tamper at gate-1"


def test_event_expires_clear_after_s_past_the_last_one_strictly() -> None:
    at_deadline: list[Reading | DeviceEvent] = [event(0, "tamper"), power(100, 1.0, "x"),
                                                event(100, "tamper")]
    assert brief(run([TAMPER], at_deadline)) == [("firing", 0.0)]
    past: list[Reading | DeviceEvent] = [event(0, "tamper"), power(100.5, 1.0, "x"),
                                         event(101, "tamper")]
    assert brief(run([TAMPER], past)) == [("firing", 0.0), ("resolved", 100.0),
                                          ("firing", 101.0)]


def test_events_older_than_the_devices_last_event_are_late() -> None:
    engine = Engine([TAMPER], SiteContext())
    engine.process([event(10, "other")])
    assert engine.process([event(5, "tamper")]) == []
    assert engine.counters["late_events"] == 1
    assert brief(engine.process([event(10, "tamper")])) == [("firing", 10.0)]  # same instant
