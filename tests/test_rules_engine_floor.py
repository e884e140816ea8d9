"""The `floor` rule kind: a cycling unit's base draw per operating point against its own
lowest. Edges by hand, and the engine against a scalar reference on generated streams
(tests/test_rules_engine_invariance.py adds these rules to its batch-split and restart
properties)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import given

from device_drivers.vocabulary import Reading
from rules.engine import Engine
from rules.model import FloorRule, Match, Rule, SiteContext, Transition
from tests.test_rules_engine_reference import Life, Reference
from tests.test_rules_engine_streams import HVAC, RELAXED, RULES, SITE, canonical, rows, streams

FLOOR_RULES: tuple[Rule, ...] = (
    FloorRule(id="base", match=HVAC, metric="power_w", per="fan_speed_pct", per_step=10.0,
              min_per=1.0, window_s=600.0, min_swing=2.0, learn_s=600.0, rise_pct=10.0,
              clear_pct=5.0),
    FloorRule(id="base-any", match=Match(), metric="power_w", window_s=300.0, min_swing=1.5,
              learn_s=0.0, rise_pct=20.0, for_s=60.0),
)
"""Small windows and learning periods, so that generated streams reach every branch."""

T0 = 1_699_999_200.0  # a multiple of 3600: bucket k starts at T0 + k * width
H = 3600.0
RULE = FloorRule(id="drift", match=HVAC, metric="power_w", per="fan_speed_pct", min_per=1.0,
                 window_s=H, min_swing=2.0, learn_s=2 * H, rise_pct=10.0, clear_pct=5.0)
ONE = SiteContext(timezone="UTC")


def hour(k: int, floor: float, peak: float, fan: float = 60.0,
         device: str = "h-1") -> list[Reading]:
    """Bucket k: two readings at `floor` (a floor), then the compressor at `peak`."""
    return [Reading(device, "hvac", T0 + k * H + s, {"power_w": v, "fan_speed_pct": fan})
            for s, v in ((60.0, floor), (120.0, floor), (180.0, peak), (240.0, peak))]


def run(items: Sequence[Reading], rule: Rule = RULE) -> list[Transition]:
    engine = Engine([rule], ONE)
    out = engine.process(list(items))
    return out + engine.process([Reading("clock", "meter", T0 + 1000 * H, {"power_w": 1.0})])


def fired(transitions: Sequence[Transition]) -> list[tuple[float, str, float | None]]:
    return [((t.ts - T0) / H, t.state, t.value) for t in transitions]


def learnt(floor: float = 100.0) -> list[Reading]:
    return hour(0, floor, 1000.0) + hour(1, floor, 1000.0)


def test_a_floor_just_above_the_limit_fires_and_at_it_does_not() -> None:
    at = fired(run(learnt() + hour(2, 110.0, 1000.0)))
    assert at == []
    above = fired(run(learnt() + hour(2, 110.02, 1000.0)))
    assert above == [(3.0, "firing", 110.02)]


def test_learning_buckets_only_teach() -> None:
    """The bucket ending 2 h after the first reading is still learning: no verdict."""
    assert fired(run(hour(0, 100.0, 1000.0) + hour(1, 150.0, 1000.0))) == []


def test_the_reference_is_the_lowest_floor_so_a_drift_never_teaches_itself() -> None:
    items = learnt() + [r for k, f in enumerate((108.0, 109.0, 109.9, 111.0), start=2)
                        for r in hour(k, f, 1000.0)]
    assert fired(run(items)) == [(6.0, "firing", 111.0)]


def test_without_the_swing_a_bucket_is_not_judged() -> None:
    """Peak 1.99 x floor: the compressor may have run throughout; 2 x: judged."""
    assert fired(run(learnt() + hour(2, 150.0, 298.5))) == []
    assert fired(run(learnt() + hour(2, 150.0, 300.0))) == [(3.0, "firing", 150.0)]


def test_one_low_sample_is_not_a_floor() -> None:
    """A single 50 W glitch neither lowers the reference nor hides a rise."""
    glitch = [Reading("h-1", "hvac", T0 + 1 * H + 30.0, {"power_w": 50.0, "fan_speed_pct": 60.0})]
    items = hour(0, 100.0, 1000.0) + glitch + hour(1, 100.0, 1000.0)[0:] + hour(2, 120.0, 1000.0)
    assert fired(run(sorted(items, key=lambda r: r.ts))) == [(3.0, "firing", 120.0)]


def test_each_operating_point_has_its_own_reference() -> None:
    """A faster fan draws more: a first bucket at 100 % teaches, it is not a rise."""
    assert fired(run(learnt() + hour(2, 400.0, 2000.0, fan=100.0))) == []
    assert fired(run(learnt() + hour(2, 400.0, 2000.0, fan=100.0)
                     + hour(3, 450.0, 2000.0, fan=100.0))) == [(4.0, "firing", 450.0)]


def test_off_readings_are_not_used() -> None:
    """Fan at 0 (the unit is off, below min_per): standby power is no floor."""
    off = [r for k in (2, 3) for r in hour(k, 6.0, 6.0, fan=0.0)]
    assert fired(run(learnt() + off)) == []


def test_it_resolves_below_clear_and_holds_in_the_hysteresis_band() -> None:
    items = learnt() + hour(2, 120.0, 1000.0) + hour(3, 107.0, 1000.0) + hour(4, 104.0, 1000.0)
    assert fired(run(items)) == [(3.0, "firing", 120.0), (5.0, "resolved", 104.0)]


def test_for_counts_judged_buckets_in_event_time() -> None:
    rule = FloorRule(id="drift", match=HVAC, metric="power_w", per="fan_speed_pct",
                     min_per=1.0, window_s=H, learn_s=2 * H, rise_pct=10.0, for_s=2 * H)
    rising = [r for k in (2, 3) for r in hour(k, 120.0, 1000.0)]
    assert fired(run(learnt() + rising, rule)) == []  # 1 h short
    steady = [r for k in (2, 3, 4) for r in hour(k, 120.0, 1000.0)]
    assert fired(run(learnt() + steady, rule)) == [(5.0, "firing", 120.0)]


def test_the_message_names_the_change() -> None:
    out = run(learnt() + hour(2, 120.0, 1000.0))
    assert "+20.0%" in out[0].message and "fan_speed_pct" in out[0].message


# ---- the scalar reference -----------------------------------------------------------------


@dataclass
class FloorDev:
    life: Life = field(default_factory=Life)
    first: float | None = None
    last: tuple[float, int] = (math.nan, -1)  # previous reading's value and point
    bucket: int | None = None
    open: dict[int, list[float]] = field(default_factory=dict)  # point -> [floor, peak]
    ref: dict[int, float] = field(default_factory=dict)


class FloorReference(Reference):
    """`Reference` plus floor rules, one reading at a time."""

    def __init__(self, rules: Sequence[Rule], site: SiteContext) -> None:
        super().__init__(rules, site)
        self.floors: dict[tuple[str, str], FloorDev] = {}

    def settle(self) -> None:
        super().settle()
        for rule in self.rules:
            if isinstance(rule, FloorRule):
                for (rid, device), s in self.floors.items():
                    if rid == rule.id and s.bucket is not None and (
                            self.wm >= (s.bucket + 1) * rule.window_s):
                        self.close_floor(rule, device, s)

    def reading(self, rule: Rule, r: Reading) -> None:
        if not isinstance(rule, FloorRule):
            super().reading(rule, r)
            return
        if rule.metric not in r.metrics:
            return
        s = self.floors.setdefault((rule.id, r.device_id), FloorDev())
        v = r.metrics[rule.metric]
        point = -1
        if math.isfinite(v):
            if rule.per is None:
                point = 0
            else:
                per = r.metrics.get(rule.per, math.nan)
                step = round(per / rule.per_step) if math.isfinite(per) else -1
                if per >= rule.min_per and 0 <= step < 256:
                    point = step
        prev_v, prev_b = s.last
        s.last = (v, point)
        if point < 0:
            return
        if s.first is None:
            s.first = r.ts
        b = math.floor(r.ts / rule.window_s)
        if self.wm >= (b + 1) * rule.window_s:
            return  # its bucket was already closed by the watermark
        s.bucket = b
        floor = max(v, prev_v) if prev_b == point else math.nan
        cell = s.open.setdefault(point, [math.nan, math.nan])
        cell[0] = floor if math.isnan(cell[0]) else (cell[0] if math.isnan(floor)
                                                     else min(cell[0], floor))
        cell[1] = v if math.isnan(cell[1]) else max(cell[1], v)

    def close_floor(self, rule: FloorRule, device: str, s: FloorDev) -> None:
        assert s.bucket is not None and s.first is not None
        end = (s.bucket + 1) * rule.window_s
        for point in sorted(s.open):
            floor, peak = s.open[point]
            if not (floor > 0 and peak >= rule.min_swing * floor):
                continue
            ref = s.ref.get(point)
            s.ref[point] = floor if ref is None else min(ref, floor)
            if end <= s.first + rule.learn_s or ref is None or not ref > 0:
                continue
            pct = (floor - ref) * 100.0 / ref
            clear = rule.rise_pct if rule.clear_pct is None else rule.clear_pct
            s.life.point(end, pct > rule.rise_pct, pct < clear, rule.for_s, floor, self.out,
                         rule.id, device)
        s.bucket, s.open = None, {}


def test_reference_agrees_on_the_hand_worked_cases() -> None:
    items = learnt() + hour(2, 120.0, 1000.0) + hour(3, 104.0, 1000.0)
    got = FloorReference([RULE], ONE).process(items)
    got += FloorReference([RULE], ONE).process([])  # nothing pending without readings
    engine = canonical(rows(run(items)))
    assert canonical(got) == [r for r in engine if r[2] == "h-1"][: len(got)]


@RELAXED
@given(streams())
def test_engine_matches_the_floor_reference(items: list) -> None:  # type: ignore[type-arg]
    rules = (*RULES, *FLOOR_RULES)
    got = canonical(rows(Engine(rules, SITE).process(items)))
    assert got == canonical(FloorReference(rules, SITE).process(items))


def test_generated_streams_reach_the_floor_rules() -> None:
    """Guard against vacuous agreement: the reference fires both floor rules somewhere."""
    import numpy as np

    from tests.test_rules_engine_streams import _seeded

    fired_rules: set[str] = set()
    for seed in range(10):
        items = _seeded(seed)
        rng = np.random.default_rng(seed)
        for i, item in enumerate(items):
            if isinstance(item, Reading) and item.kind == "hvac":
                items[i] = Reading(item.device_id, item.kind, item.ts, {
                    **item.metrics, "fan_speed_pct": float(rng.choice([40.0, 60.0, 60.0, 60.0]))})
        fired_rules |= {row[1] for row in FloorReference(FLOOR_RULES, SITE).process(items)}
    assert fired_rules >= {r.id for r in FLOOR_RULES}
