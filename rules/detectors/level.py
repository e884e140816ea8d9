"""Threshold, rate-of-change and schedule rules: a per-reading condition and its clearing.

All three reduce to `lifecycle.level` once each reading is classified as *condition*
(counts toward firing), *reset* (resolves a firing alert) or neither (hysteresis band).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from rules.batch import Batch
from rules.detectors.base import Detector, Site
from rules.lifecycle import DeviceState, Emitted, level
from rules.model import RateOfChangeRule, ScheduleRule, ThresholdRule

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class ThresholdDetector(Detector):
    """`above`: fires on a value strictly above, resolves strictly below `clear`.

    A value exactly at the threshold does not exceed it; a value exactly at `clear` does
    not clear (it is still inside the hysteresis band). Readings in the band
    (clear <= v <= above) keep a firing alert firing but end a pending run: `for_s` needs
    the value above the threshold at every reading from the first one over it. `below`
    mirrors all of this. A `clear` on the wrong side of the threshold is treated as the
    threshold itself (no hysteresis), so a malformed rule cannot fire and resolve at once.
    """

    rule: ThresholdRule

    def __init__(self, rule: ThresholdRule, site: Site) -> None:
        super().__init__(rule, site)
        self.up = rule.above is not None
        limit = rule.above if rule.above is not None else rule.below
        self.limit = float("nan") if limit is None else float(limit)
        clear = self.limit if rule.clear is None else float(rule.clear)
        self.clear = min(clear, self.limit) if self.up else max(clear, self.limit)

    def process(self, batch: Batch) -> list[Emitted]:
        sel = batch.select(self.rule.match, self.matched, self.rule.metric)
        if not len(sel):
            return []
        v = sel.values(self.rule.metric)
        cond = v > self.limit if self.up else v < self.limit

        def reset(pos: I64 | None) -> Bools:
            x = v if pos is None else v[pos]
            cleared: Bools = x < self.clear if self.up else x > self.clear
            return cleared

        return level(self.life, sel.dev, sel.ts, cond, reset, self.rule.for_s, v)


class RateOfChangeDetector(Detector):
    """Rate between consecutive readings carrying the metric (per second).

    A pair closer than `min_interval_s` is not compared: that reading is no evidence
    either way (it neither breaches, clears, nor interrupts a pending run), but it is still
    the "previous" reading of the next pair (comparing with an older reading would blur a
    genuine step into a slope). `up` uses the signed rate,
    `down` its negation, `both` its magnitude; the alert resolves at the first compared
    pair whose (directional) rate is below `clear_per_s`. The transition's value is the
    signed rate.
    """

    rule: RateOfChangeRule

    def __init__(self, rule: RateOfChangeRule, site: Site) -> None:
        super().__init__(rule, site)
        self.state = DeviceState({"v": (np.float64, np.nan), "t": (np.float64, np.nan)})
        clear = rule.max_per_s if rule.clear_per_s is None else rule.clear_per_s
        self.clear = min(clear, rule.max_per_s)

    def process(self, batch: Batch) -> list[Emitted]:
        sel = batch.select(self.rule.match, self.matched, self.rule.metric)
        if not len(sel):
            return []
        v = sel.values(self.rule.metric)
        last_v, last_t = self.state["v"], self.state["t"]
        prev_t = sel.prev_with(None, last_t)
        compared = sel.ts - prev_t >= self.rule.min_interval_s
        rate = (v - sel.prev_with(self.rule.metric, last_v)) / (sel.ts - prev_t)
        if self.rule.direction == "up":
            directed = rate
        elif self.rule.direction == "down":
            directed = -rate
        else:
            directed = np.abs(rate)
        cond = compared & (directed > self.rule.max_per_s)
        last_v[sel.heads] = v[sel.lasts]
        last_t[sel.heads] = sel.ts[sel.lasts]
        if not cond.any() and not self.life["firing"].any() and np.isnan(
                self.life["pending"]).all():
            return []  # nothing can change: skip the life cycle entirely
        pts = np.flatnonzero(compared)
        directed, rate = directed[pts], rate[pts]
        return level(self.life, sel.dev[pts], sel.ts[pts], cond[pts], directed < self.clear,
                     self.rule.for_s, rate)


class ScheduleDetector(Detector):
    """Strictly above `above` while the building is closed; resolves at or below `clear`,
    or when the building opens (local time, holidays included).

    Opening hours are only computed for devices that could change state in this batch
    (a reading over the limit, or an alert pending or firing): most of the time that is
    nobody, and the calendar costs nothing.
    """

    rule: ScheduleRule

    def __init__(self, rule: ScheduleRule, site: Site) -> None:
        super().__init__(rule, site)
        clear = rule.above if rule.clear is None else rule.clear
        self.clear = min(clear, rule.above)

    def process(self, batch: Batch) -> list[Emitted]:
        sel = batch.select(self.rule.match, self.matched, self.rule.metric)
        if not len(sel):
            return []
        v = sel.values(self.rule.metric)
        over = v > self.rule.above
        firing, pending = self.life["firing"], self.life["pending"]
        active = firing | ~np.isnan(pending)
        active[sel.dev[over]] = True
        need = np.flatnonzero(active[sel.dev])
        if not len(need):
            return []
        is_open = np.ones(len(sel), dtype=np.bool_)
        is_open[need] = self.site.open_at(sel.dev[need], sel.ts[need])
        cond = over & ~is_open
        reset = is_open | (v <= self.clear)
        return level(self.life, sel.dev, sel.ts, cond, reset, self.rule.for_s, v)
