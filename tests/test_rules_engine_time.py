"""Rules engine: the kinds that think in local time or in buckets (schedule, baseline, ratio,
group), and the local-time arithmetic under them."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Sequence

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers.vocabulary import Reading
from rules.calendar import LocalClock
from rules.columns import ReadingColumns
from rules.detectors.base import Site
from rules.detectors.ratio import RatioDetector
from rules.engine import Engine
from rules.model import (
    BaselineRule,
    Calendar,
    DeviceInfo,
    GroupRule,
    Match,
    RatioRule,
    Rule,
    ScheduleRule,
    SiteContext,
    Transition,
)

WEEK = 7 * 86_400.0


def at(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def brief(transitions: Sequence[Transition]) -> list[tuple[str, str, float]]:
    return [(t.device_id, t.state, t.ts) for t in transitions]


# ---- schedule and local time ---------------------------------------------------------------


BERLIN = SiteContext(
    timezone="Europe/Berlin",
    calendars={"b1": Calendar(weekly=tuple(((480, 1080),) for _ in range(7)),
                              holidays=frozenset({"2026-05-01"}))},
    devices={"ahu-1": DeviceInfo("ahu-1", "hvac", "b1")})
AFTER_HOURS = ScheduleRule(id="after-hours", match=Match(), metric="power_w", above=1000.0,
                           clear=800.0)


def ahu(ts: float, watts: float) -> Reading:
    return Reading("ahu-1", "hvac", ts, {"power_w": watts})


def test_schedule_follows_daylight_saving_time() -> None:
    """06:30 UTC is 07:30 in Berlin before the March switch (closed), 08:30 after (open)."""
    before, after = at("2026-03-28T06:30:00+00:00"), at("2026-03-30T06:30:00+00:00")
    got = Engine([AFTER_HOURS], BERLIN).process([ahu(before, 2000.0), ahu(after, 2000.0)])
    assert brief(got) == [("ahu-1", "firing", before), ("ahu-1", "resolved", after)]


def test_schedule_holidays_are_closed_all_day_in_local_dates() -> None:
    noon = at("2026-05-01T12:00:00+02:00")
    late = at("2026-05-01T23:30:00+02:00")  # still May 1st in Berlin, May 1st 21:30 UTC
    next_day = at("2026-05-02T00:30:00+02:00")  # April 30th 22:30 UTC, May 2nd locally
    got = Engine([AFTER_HOURS], BERLIN).process(
        [ahu(noon, 2000.0), ahu(late, 900.0), ahu(next_day, 700.0)])
    assert brief(got) == [("ahu-1", "firing", noon), ("ahu-1", "resolved", next_day)]


def test_schedule_resolves_at_or_below_clear_while_closed() -> None:
    night = at("2026-03-10T23:00:00+01:00")
    items = [ahu(night, 1500.0), ahu(night + 60, 900.0), ahu(night + 120, 800.0)]
    got = Engine([AFTER_HOURS], BERLIN).process(items)
    assert brief(got) == [("ahu-1", "firing", night), ("ahu-1", "resolved", night + 120)]


ZONES = ("Europe/Berlin", "America/St_Johns", "Asia/Kathmandu", "Australia/Lord_Howe",
         "Asia/Shanghai", "UTC")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ZONES), st.lists(st.integers(-2_300_000_000_000, 2_300_000_000_000),
                                        min_size=1, max_size=40))
def test_local_clock_agrees_with_zoneinfo(zone: str, millis: list[int]) -> None:
    """Millisecond timestamps: datetime rounds to microseconds, the clock does not."""
    stamps = [m / 1000 for m in millis]
    ts = np.array(stamps)
    days, minutes = LocalClock(zone).local(ts)
    tz = zoneinfo.ZoneInfo(zone)
    for t, d, m in zip(stamps, days.tolist(), minutes.tolist(), strict=True):
        local = dt.datetime.fromtimestamp(t, tz)
        assert (d, m) == ((local.date() - dt.date(1970, 1, 1)).days,
                          local.hour * 60 + local.minute)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ZONES), st.floats(-2.3e9, 2.3e9), st.integers(1, 3000))
def test_opening_hours_table_agrees_with_a_per_reading_check(zone: str, start: float,
                                                             spread: int) -> None:
    calendar = Calendar(weekly=tuple(((d * 60, 600 + d * 97),) for d in range(7)),
                        holidays=frozenset({"2000-01-01", "1969-12-31"}),
                        holiday_hours=((0, 90),))
    site = Site(SiteContext(timezone=zone, calendars={"b": calendar}))
    site.add(DeviceInfo("d", "hvac", "b"), True, np.nan)
    ts = start + np.linspace(0, spread * 60.0, 50)
    got = site.open_at(np.zeros(len(ts), dtype=np.int64), ts)
    tz = zoneinfo.ZoneInfo(zone)
    for t, is_open in zip(ts.tolist(), got.tolist(), strict=True):
        local = dt.datetime.fromtimestamp(t, tz)
        minute = local.hour * 60 + local.minute
        hours = (calendar.holiday_hours if local.date().isoformat() in calendar.holidays
                 else calendar.weekly[local.weekday()])
        assert is_open == any(a <= minute < b for a, b in hours)


# ---- baseline -----------------------------------------------------------------------------


MONDAY_9 = at("2026-01-05T09:00:00+00:00")


def weekly(values: Sequence[float], rule: Rule) -> list[Transition]:
    """m-1 reads once in the Monday 09:00 bucket of successive weeks; another meter's
    reading an hour later moves the watermark past the bucket's end, which closes it."""
    items = []
    for week, value in enumerate(values):
        base = MONDAY_9 + week * WEEK
        items += [Reading("m-1", "meter", base + 10, {"power_w": value}),
                  Reading("clock", "meter", base + 3610, {"power_w": 50.0})]
    return [t for t in Engine([rule], SiteContext()).process(items) if t.device_id == "m-1"]


USUAL = BaselineRule(id="usual", match=Match(), metric="power_w", bucket_s=3600.0,
                     history_weeks=4, k=4.0, warmup_s=0.0)


def test_baseline_fires_on_a_bucket_far_from_its_hour_of_week_and_resolves() -> None:
    got = weekly([100.0, 101.0, 102.0, 500.0, 101.5], USUAL)
    end = MONDAY_9 + 3600
    assert brief(got) == [("m-1", "firing", end + 3 * WEEK), ("m-1", "resolved", end + 4 * WEEK)]
    assert got[0].value == 500.0 and "usual 101 ± 5.9304" in got[0].message


def test_baseline_needs_history_and_respects_warmup_and_direction() -> None:
    assert weekly([100.0, 101.0, 500.0], USUAL) == []  # two past buckets are not enough
    warm = BaselineRule(id="usual", match=Match(), metric="power_w", bucket_s=3600.0,
                        warmup_s=4 * WEEK)
    assert weekly([100.0, 101.0, 102.0, 500.0], warm) == []
    up = BaselineRule(id="usual", match=Match(), metric="power_w", bucket_s=3600.0,
                      direction="up", warmup_s=0.0)
    assert weekly([100.0, 101.0, 102.0, 0.0], up) == []
    floor = BaselineRule(id="usual", match=Match(), metric="power_w", bucket_s=3600.0,
                         min_abs_deviation=500.0, warmup_s=0.0)
    assert weekly([100.0, 101.0, 102.0, 500.0], floor) == []


def test_baseline_warmup_counts_from_the_first_reading_inclusive() -> None:
    """A bucket starting exactly warmup_s after the first reading is judged."""
    rule = BaselineRule(id="usual", match=Match(), metric="power_w", bucket_s=3600.0,
                        warmup_s=3 * WEEK - 10)
    assert [t.state for t in weekly([100.0, 101.0, 102.0, 500.0], rule)] == ["firing"]


def test_baseline_ewma_learns_and_judges() -> None:
    rule = BaselineRule(id="usual", match=Match(), metric="power_w", bucket_s=3600.0,
                        method="ewma", alpha=0.5, k=3.0, warmup_s=0.0)
    assert [t.state for t in weekly([100.0, 104.0, 96.0, 100.0, 300.0], rule)] == ["firing"]


def test_a_bucket_closes_on_the_devices_next_bucket_or_at_the_watermark() -> None:
    base = MONDAY_9 + 3 * WEEK
    history = [Reading("m-1", "meter", MONDAY_9 + w * WEEK + 10, {"power_w": v})
               for w, v in enumerate([100.0, 101.0, 102.0, 500.0])]
    engine = Engine([USUAL], SiteContext())
    assert engine.process([*history, Reading("x", "meter", base + 3599, {})]) == []
    assert brief(engine.process([Reading("x", "meter", base + 3600, {})])) == [
        ("m-1", "firing", base + 3600)]
    same_call = [*history, Reading("x", "meter", base + 3600, {})]
    assert brief(Engine([USUAL], SiteContext()).process(same_call)) == [
        ("m-1", "firing", base + 3600)]
    own = [*history, Reading("m-1", "meter", base + 3600, {"power_w": 1.0})]
    assert brief(Engine([USUAL], SiteContext()).process(own))[0][1:] == ("firing",
                                                                         base + 3600)


# ---- ratio --------------------------------------------------------------------------------


FILTER = RatioRule(id="filter", match=Match(), numerator="filter_dp_pa",
                   denominator="fan_speed_pct", exponent=2.0, min_denominator=5.0,
                   learn_s=100.0, window_s=100.0, rise_pct=20.0, clear_pct=10.0)


def unit(ts: float, dp: float, fan: float = 10.0) -> Reading:
    return Reading("ahu-1", "hvac", 1_000_000.0 + ts, {"filter_dp_pa": dp,
                                                       "fan_speed_pct": fan})


def test_ratio_learns_a_reference_then_alerts_on_window_means() -> None:
    items = [unit(0, 100.0), unit(50, 300.0), unit(60, 900.0, fan=1.0),  # ref: median 2
             unit(100, 300.0), unit(150, 200.0),  # window [100, 200): mean 2.5, +25 %
             unit(200, 215.0), unit(300, 200.0)]  # +7.5 %: within clear_pct
    got = Engine([FILTER], SiteContext()).process(items)
    assert [(t.state, t.ts - 1_000_000.0, t.value) for t in got] == [
        ("firing", 200.0, 2.5), ("resolved", 300.0, 2.15)]
    assert "+25.0% from its reference 2" in got[0].message


def test_ratio_learning_keeps_the_first_value_of_each_slice_for_any_split() -> None:
    """learn_s 512 s: 512 one-second slices; four readings a second, one kept each."""
    rule = RatioRule(id="r", match=Match(), numerator="a", denominator="b", learn_s=512.0)
    values = np.random.default_rng(3).random(2100)
    ts = (1e6 + np.arange(2100) * 0.25).astype(np.float64)
    for split in ([1500], [1, 700, 799], [37] * 40 + [20]):
        engine = Engine([rule], SiteContext())
        start = 0
        for size in split:
            engine.process_columns(ReadingColumns(
                ("d",), ("x",), np.zeros(size, np.int64), ts[start:start + size],
                {"a": values[start:start + size], "b": np.ones(size)}))
            start += size
        restored = Engine.restore([rule], SiteContext(), engine.snapshot())
        detector = restored._detectors[0]
        assert isinstance(detector, RatioDetector)
        kept = detector.store[0, : detector.state["kept"][0]]
        assert np.array_equal(kept, values[:1500:4])
        restored.process_columns(ReadingColumns(("d",), ("x",), np.zeros(1, np.int64),
                                                ts[2048:2049], {"a": values[:1], "b": np.ones(1)}))
        assert detector.state["ref"][0] == np.median(values[:1500:4])


# ---- group --------------------------------------------------------------------------------


BUILDING = SiteContext(devices={d: DeviceInfo(d, "meter", "b1")
                                for d in ("m-main", "m-1", "m-2")})
BALANCE = GroupRule(id="balance", match=Match(kinds=frozenset({"meter"})),
                    main=Match(device_ids=("m-main",)), window_s=60.0, tolerance_pct=10.0,
                    min_abs=5.0)


def meters(ts: float, main: float, one: float, two: float | None) -> list[Reading]:
    out = [Reading("m-main", "meter", ts, {"power_w": main}),
           Reading("m-1", "meter", ts + 1, {"power_w": one})]
    if two is not None:
        out.append(Reading("m-2", "meter", ts + 2, {"power_w": two}))
    return out


def test_group_compares_main_with_sub_sum_after_a_grace_window() -> None:
    engine = Engine([BALANCE], BUILDING)
    assert engine.process(meters(0, 300.0, 100.0, 100.0) + meters(60, 210.0, 100.0, 100.0)) == []
    got = engine.process(meters(120, 200.0, 100.0, 100.0))  # watermark reaches 60 + 60
    assert [(t.device_id, t.state, t.ts, t.value) for t in got] == [
        ("m-main", "firing", 60.0, 300.0)]
    got = engine.process(meters(180, 200.0, 100.0, 100.0))
    assert [(t.state, t.ts) for t in got] == [("resolved", 120.0)]


def test_group_does_not_judge_a_bucket_with_a_silent_member() -> None:
    items = meters(0, 300.0, 100.0, None) + meters(60, 300.0, 100.0, None) + meters(
        120, 300.0, 100.0, None)
    assert Engine([BALANCE], BUILDING).process(items) == []


def test_group_counts_stragglers_within_the_grace_window_and_no_later() -> None:
    """m-2's reading for the first minute arrives late: counted while the watermark is
    under 60 + 60, dropped once it reaches that (the verdict is due then)."""
    def run(watermark: float) -> list[Transition]:
        items = [Reading("m-main", "meter", 0.0, {"power_w": 300.0}),
                 Reading("m-1", "meter", 1.0, {"power_w": 100.0}),
                 Reading("m-main", "meter", watermark, {"power_w": 200.0}),
                 Reading("m-2", "meter", 55.0, {"power_w": 100.0}),
                 Reading("m-main", "meter", 200.0, {"power_w": 200.0})]
        return Engine([BALANCE], BUILDING).process(items)

    assert [(t.state, t.ts) for t in run(100.0)] == [("firing", 60.0)]
    assert run(120.0) == []
