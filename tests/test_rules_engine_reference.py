"""A scalar reference evaluator for the rules engine: one item, one rule at a time.

Written for obviousness, not speed: every item first advances the watermark and settles
every deadline it passed (no data, expiring alerts, closing buckets), then is applied to
each rule in order. The engine's vectorised evaluation must agree with it exactly, values
included (tests/test_rules_engine_streams.py); the tests here pin the reference itself to
a few hand-worked cases, so agreement means something.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from device_drivers.vocabulary import DeviceEvent, Reading
from rules.model import (
    BaselineRule,
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
)

Item = Reading | DeviceEvent
Row = tuple[float, str, str, str, float | None, float]  # ts, rule, device, state, value, start

@dataclass
class Life:
    """The alert life cycle of one (rule, device), one point at a time."""

    firing: bool = False
    started: float = math.nan
    run: float | None = None  # start of the current run of condition points

    def point(self, ts: float, cond: bool, reset: bool, for_s: float, value: float | None,
              out: list[Row], rule: str, device: str) -> None:
        if cond:
            if self.run is None:
                self.run = ts
            if not self.firing and ts - self.run >= for_s:
                self.firing, self.started = True, self.run
                out.append((ts, rule, device, "firing", value, self.started))
        else:
            self.run = None
            if self.firing and reset:
                self.firing = False
                out.append((ts, rule, device, "resolved", value, self.started))


@dataclass
class Dev:
    """Everything the reference remembers about one device for one rule."""

    life: Life = field(default_factory=Life)
    prev: tuple[float, float] | None = None  # (value, ts)
    anchor: tuple[float, float] | None = None
    counter: tuple[float, float] | None = None
    power: list[int] = field(default_factory=list)
    last: float | None = None
    bucket: tuple[int, list[float]] | None = None  # (index, values)
    first: float | None = None
    learnt: list[float] = field(default_factory=list)
    slice: int = -1
    ref: float | None = None


def total(values: Sequence[float]) -> float:
    """Sum of a building's meter means: numpy's `add.reduceat`, as the engine adds them."""
    return float(np.add.reduceat(np.array(values, dtype=np.float64), [0])[0])


def fixed_mean(values: Sequence[float]) -> float:
    """A bucket's mean in the engine's fixed point: integer parts and two 40-bit fraction
    limbs, summed exactly."""
    whole = high = low = 0
    for v in values:
        clipped = min(max(v, -(2.0**40)), 2.0**40)
        part = math.trunc(clipped)
        scaled = (clipped - part) * 2.0**40
        top = math.trunc(scaled)
        whole, high = whole + part, high + top
        low += round((scaled - top) * 2.0**40)
    fraction = float(high) / 2.0**40 + float(low) / 2.0**40 / 2.0**40
    return (float(whole) + fraction) / len(values)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


class Reference:
    def __init__(self, rules: Sequence[Rule], site: SiteContext) -> None:
        self.rules, self.site = list(rules), site
        self.zone = zoneinfo.ZoneInfo(site.timezone)
        self.kinds: dict[str, str] = {d: i.kind for d, i in site.devices.items()}
        self.state: dict[tuple[str, str], Dev] = {}
        self.last_ts: dict[str, float] = {}
        self.last_event: dict[str, float] = {}
        self.wm = -math.inf
        self.origin: float | None = None
        self.history: dict[tuple[str, str, int], list[float]] = {}
        # (rule, building, bucket) -> member -> its values
        self.groups: dict[tuple[str, str, int], dict[str, list[float]]] = {}
        self.out: list[Row] = []

    def info(self, device: str) -> DeviceInfo:
        return self.site.devices.get(device) or DeviceInfo(device, self.kinds[device])

    def dev(self, rule: Rule, device: str) -> Dev:
        return self.state.setdefault((rule.id, device), Dev())

    def process(self, items: Iterable[Item]) -> list[Row]:
        self.out = []
        for item in items:
            self.kinds.setdefault(item.device_id, item.kind)
            self.wm = max(self.wm, item.ts)
            if self.origin is None:
                self.origin = self.wm
                for rule in self.rules:
                    if isinstance(rule, NoDataRule):
                        for device in self.site.devices:
                            if rule.match.matches(self.info(device)):
                                self.dev(rule, device).last = self.origin
            self.settle()
            if isinstance(item, DeviceEvent):
                if item.ts >= self.last_event.get(item.device_id, -math.inf):
                    self.last_event[item.device_id] = item.ts
                    for rule in self.rules:
                        if isinstance(rule, EventRule):
                            self.event(rule, item)
                continue
            if item.ts <= self.last_ts.get(item.device_id, -math.inf):
                continue
            self.last_ts[item.device_id] = item.ts
            for rule in self.rules:
                if rule.match.matches(self.info(item.device_id)) or isinstance(rule, GroupRule):
                    self.reading(rule, item)
        return self.out

    # deadlines the watermark passed
    def settle(self) -> None:
        for rule in self.rules:
            for (rid, device), s in list(self.state.items()):
                if rid != rule.id:
                    continue
                if isinstance(rule, NoDataRule) and s.last is not None and not s.life.firing:
                    if self.wm > s.last + rule.timeout_s + rule.for_s:
                        at = s.last + rule.timeout_s + rule.for_s
                        s.life.firing, s.life.started = True, at
                        self.out.append((at, rule.id, device, "firing", None, at))
                if isinstance(rule, (CounterRule, EventRule)) and s.life.firing:
                    at = (s.last or 0.0) + rule.clear_after_s
                    if self.wm > at:
                        s.life.firing = False
                        self.out.append((at, rule.id, device, "resolved", None, s.life.started))
                if isinstance(rule, (BaselineRule, RatioRule)) and s.bucket is not None:
                    width = rule.bucket_s if isinstance(rule, BaselineRule) else rule.window_s
                    if self.wm >= (s.bucket[0] + 1) * width:
                        self.close(rule, device, s)
            if isinstance(rule, GroupRule):
                for key in sorted(k for k in self.groups if k[0] == rule.id):
                    if self.wm >= (key[2] + 1) * rule.window_s + rule.window_s:
                        self.judge_group(rule, key[1], key[2], self.groups.pop(key))

    def reading(self, rule: Rule, r: Reading) -> None:
        s = self.dev(rule, r.device_id)
        v = r.metrics.get(getattr(rule, "metric", None) or "", math.nan)
        has = not math.isnan(v)
        if isinstance(rule, ThresholdRule) and has:
            if rule.above is not None:
                clear = min(rule.above if rule.clear is None else rule.clear, rule.above)
                cond, reset = v > rule.above, v < clear
            else:
                assert rule.below is not None
                clear = max(rule.below if rule.clear is None else rule.clear, rule.below)
                cond, reset = v < rule.below, v > clear
            s.life.point(r.ts, cond, reset, rule.for_s, v, self.out, rule.id, r.device_id)
        elif isinstance(rule, RateOfChangeRule) and has:
            if s.prev is not None and r.ts - s.prev[1] >= rule.min_interval_s:
                rate = (v - s.prev[0]) / (r.ts - s.prev[1])
                d = {"up": rate, "down": -rate, "both": abs(rate)}[rule.direction]
                clear = min(rule.max_per_s if rule.clear_per_s is None else rule.clear_per_s,
                            rule.max_per_s)
                s.life.point(r.ts, d > rule.max_per_s, d < clear, rule.for_s, rate, self.out,
                             rule.id, r.device_id)
            s.prev = (v, r.ts)
        elif isinstance(rule, FlatlineRule) and has:
            changed = True
            if abs(v) <= rule.ignore_below:
                s.anchor = None
            elif s.anchor is None or abs(v - s.anchor[0]) > rule.tolerance:
                s.anchor = (v, r.ts)
            else:
                changed = False
            cond = not changed and s.anchor is not None and r.ts - s.anchor[1] >= rule.window_s
            s.life.point(r.ts, cond, changed, rule.for_s, v, self.out, rule.id, r.device_id)
        elif isinstance(rule, CounterRule):
            self.counter(rule, r, s)
        elif isinstance(rule, NoDataRule):
            if rule.metric is None or not math.isnan(r.metrics.get(rule.metric, math.nan)):
                if s.life.firing:
                    s.life.firing = False
                    self.out.append((max(r.ts, s.life.started), rule.id, r.device_id,
                                     "resolved", None, s.life.started))
                s.last = r.ts
        elif isinstance(rule, ScheduleRule) and has:
            local = dt.datetime.fromtimestamp(r.ts, self.zone)
            cal = self.site.calendar_for(self.info(r.device_id).building)
            minute = local.hour * 60 + local.minute
            hours = (cal.holiday_hours if local.date().isoformat() in cal.holidays
                     else cal.weekly[local.weekday()])
            is_open = any(a <= minute < b for a, b in hours)
            clear = min(rule.above if rule.clear is None else rule.clear, rule.above)
            s.life.point(r.ts, not is_open and v > rule.above, is_open or v <= clear,
                         rule.for_s, v, self.out, rule.id, r.device_id)
        elif isinstance(rule, BaselineRule) and has:
            if s.first is None:
                s.first = r.ts
            self.bucket(s, r.ts, v, rule.bucket_s)
        elif isinstance(rule, RatioRule):
            self.ratio(rule, r, s)
        elif isinstance(rule, GroupRule) and has:
            info = self.info(r.device_id)
            member = r.device_id in self.site.devices and info.building is not None and (
                rule.main.matches(info) or rule.match.matches(info))
            b = math.floor(r.ts / rule.window_s)
            if member and info.building and self.wm < (b + 1) * rule.window_s + rule.window_s:
                key = (rule.id, info.building, b)
                self.groups.setdefault(key, {}).setdefault(r.device_id, []).append(v)

    def bucket(self, s: Dev, ts: float, v: float, width: float) -> None:
        b = math.floor(ts / width)
        if self.wm >= (b + 1) * width:
            return  # its bucket was already closed by the watermark
        if s.bucket is None:
            s.bucket = (b, [])
        s.bucket[1].append(v)

    def counter(self, rule: CounterRule, r: Reading, s: Dev) -> None:
        c = r.metrics.get(rule.metric, math.nan)
        p = r.metrics.get(rule.power_metric, math.nan)
        mw = [] if math.isnan(p) else [round(min(max(p, -1e9), 1e9) * 1000.0)]
        if math.isnan(c):
            s.power += mw
            return
        if s.counter is not None:
            prev, t_prev = s.counter
            power = s.power + mw
            raw = c - prev
            down = raw < -rule.regression_tolerance
            roll = down and prev >= rule.counter_max * (1 - rule.rollover_margin) and (
                c <= rule.counter_max * rule.rollover_margin)
            delta = rule.counter_max - prev + c if roll else raw
            jump = False
            if power:
                mean_w = sum(power) / len(power) / 1000.0
                explained = rule.jump_factor * mean_w * (r.ts - t_prev) / 3600.0
                if rule.max_power is not None:
                    explained = max(explained, rule.max_power * (r.ts - t_prev) / 3600.0)
                jump = delta > explained + rule.jump_margin
            if (down and not roll) or jump:
                if not s.life.firing:
                    s.life.firing, s.life.started = True, r.ts
                    self.out.append((r.ts, rule.id, r.device_id, "firing", delta, r.ts))
                s.last = r.ts
        s.counter, s.power = (c, r.ts), mw

    def ratio(self, rule: RatioRule, r: Reading, s: Dev) -> None:
        num = r.metrics.get(rule.numerator, math.nan)
        den = r.metrics.get(rule.denominator, math.nan)
        if not den >= rule.min_denominator:
            return
        value = float(np.float64(num) / np.float64(den) ** rule.exponent)
        if not math.isfinite(value):
            return
        if s.first is None:
            s.first = r.ts
        since = r.ts - s.first
        if s.ref is None and (since < rule.learn_s or since == 0):
            part = min(int(since * 512 / rule.learn_s), 511) if rule.learn_s > 0 else 0
            if part != s.slice:  # the first reading of each of 512 learning slices
                s.learnt.append(value)
                s.slice = part
            return
        if s.ref is None:
            s.ref = median(s.learnt)
        self.bucket(s, r.ts, value, rule.window_s)

    def close(self, rule: BaselineRule | RatioRule, device: str, s: Dev) -> None:
        assert s.bucket is not None
        b, values = s.bucket
        s.bucket = None
        mean = fixed_mean(values)
        if isinstance(rule, RatioRule):
            assert s.ref is not None
            if s.ref <= 0:
                return
            pct = (mean / s.ref - 1) * 100
            clear = rule.clear_pct
            cond = (rule.rise_pct is not None and pct > rule.rise_pct) or (
                rule.fall_pct is not None and pct < -rule.fall_pct)
            calm = (rule.rise_pct is None or pct < (rule.rise_pct if clear is None else clear)) \
                and (rule.fall_pct is None or pct > -(rule.fall_pct if clear is None else clear))
            s.life.point((b + 1) * rule.window_s, cond, calm, rule.for_s, mean, self.out,
                         rule.id, device)
            return
        local = dt.datetime.fromtimestamp(b * rule.bucket_s, self.zone)
        slot = local.weekday() * 24 + local.hour
        past = self.history.setdefault((rule.id, device, slot), [])
        depth = rule.history_weeks * math.ceil(3600 / rule.bucket_s)
        judged = len(past) >= min(3, depth)
        if rule.method == "median_mad":
            expected = median(past) if past else 0.0
            scale = 1.4826 * median([abs(x - expected) for x in past]) if past else 0.0
            past.append(mean)
            del past[:-depth]
        else:  # past = [mu, scale, count]
            if not past:
                past.extend([mean, 0.0, 0.0])
                expected, scale = mean, 0.0
            else:
                expected, scale = past[0], past[1]
                past[0] = expected + rule.alpha * (mean - expected)
                past[1] = (1 - rule.alpha) * scale + rule.alpha * abs(mean - expected)
            judged = past[2] >= 3
            past[2] += 1
        assert s.first is not None
        if not judged or b * rule.bucket_s < s.first + rule.warmup_s:
            return
        bound = max(rule.k * scale, rule.min_abs_deviation)
        delta = mean - expected
        out = {"up": delta > bound, "down": -delta > bound, "both": abs(delta) > bound}
        off = out[rule.direction]
        s.life.point((b + 1) * rule.bucket_s, off, not off, rule.for_s, mean, self.out,
                     rule.id, device)

    def judge_group(self, rule: GroupRule, building: str, b: int,
                    parts: dict[str, list[float]]) -> None:
        order = list(self.site.devices)  # registry order: the order means are added in
        members = [d for d in order if (i := self.site.devices[d]).building == building and (
            rule.main.matches(i) or rule.match.matches(i))]
        if set(parts) != set(members) or not any(
                rule.main.matches(self.site.devices[d]) for d in members):
            return
        means = {d: fixed_mean(parts[d]) for d in members}
        main = total([means[d] for d in members if rule.main.matches(self.site.devices[d])])
        subs = total([means[d] for d in members if not rule.main.matches(self.site.devices[d])])
        off = abs(main - subs) > max(rule.tolerance_pct / 100 * abs(main), rule.min_abs)
        owner = min(d for d in members if rule.main.matches(self.site.devices[d]))
        self.dev(rule, owner).life.point((b + 1) * rule.window_s, off, not off, rule.for_s,
                                         main, self.out, rule.id, owner)

    def event(self, rule: EventRule, e: DeviceEvent) -> None:
        if not rule.match.matches(self.info(e.device_id)):
            return
        s = self.dev(rule, e.device_id)
        if e.type in rule.events:
            if not s.life.firing:
                s.life.firing, s.life.started = True, e.ts
                self.out.append((e.ts, rule.id, e.device_id, "firing", None, e.ts))
            s.last = e.ts
        elif e.type in rule.clear_events and s.life.firing:
            s.life.firing = False
            self.out.append((e.ts, rule.id, e.device_id, "resolved", None, s.life.started))


# ---- the reference on hand-worked cases ------------------------------------------------------


def test_reference_threshold_and_deadman_by_hand() -> None:
    rules: list[Rule] = [
        ThresholdRule(id="hot", match=Match(), metric="p", above=10.0, clear=5.0),
        NoDataRule(id="silent", match=Match(), timeout_s=100.0)]
    items = [Reading("a", "x", 0.0, {"p": 11.0}), Reading("a", "x", 50.0, {"p": 6.0}),
             Reading("a", "x", 60.0, {"p": 4.0}), Reading("a", "x", 200.0, {"p": 4.0})]
    assert Reference(rules, SiteContext()).process(items) == [
        (0.0, "hot", "a", "firing", 11.0, 0.0), (60.0, "hot", "a", "resolved", 4.0, 0.0),
        (160.0, "silent", "a", "firing", None, 160.0),
        (200.0, "silent", "a", "resolved", None, 160.0)]


def test_reference_fixed_point_mean_by_hand() -> None:
    assert fixed_mean([2.15]) == 2.15
    assert fixed_mean([-1e-5]) == -1e-5
    assert fixed_mean([0.1, 0.2]) == 0.15000000000000002
    assert fixed_mean([2.0**41]) == 2.0**40  # clipped
