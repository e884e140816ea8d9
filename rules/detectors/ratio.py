"""Ratio drift: numerator / denominator**exponent against the device's own reference.

The reference is the median ratio of the device's first `learn_s` of valid readings (its
first valid reading always counts), sampled: the learning period is cut into `KEEP`
equal slices of event time and the first reading of each slice is kept. The sample depends
only on timestamps, so any batch split keeps the same values (and the same median), and a
device's store is bounded however often it reports.

After learning, ratios are averaged per `window_s` bucket (epoch-aligned, event time,
closed like baseline buckets) and each closed window is judged: its change from the
reference in percent fires above `rise_pct` (or below -`fall_pct`) and resets once within
`clear_pct` (default: the firing limits). A reference <= 0 cannot be compared against and
is not judged. Judged windows are points at their end time for the shared life cycle.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from rules.batch import Batch, Selection
from rules.detectors.base import Detector, Meta, Site
from rules.detectors.baseline import median_of_rows
from rules.detectors.buckets import OpenBuckets, Parts, bucket_end, fixed
from rules.lifecycle import Array, DeviceState, Emitted, level, segment_firsts
from rules.model import RatioRule

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

KEEP = 512


@dataclass(slots=True)
class Points:
    """A selection's valid ratio points (rule-independent for the same ratio definition)."""

    dev: I64
    ts: F64
    wm: F64
    ratio: F64
    starts: I64
    heads: I64
    parts: Parts
    derived: dict[Hashable, Any] = field(default_factory=dict)


def ratio_points(sel: Selection, rule: RatioRule) -> Points:
    """Ratios of a selection's readings with a usable denominator, shared by every rule
    that defines the same ratio."""
    key = ("ratio", rule.numerator, rule.denominator, rule.exponent, rule.min_denominator)
    found: Points | None = sel.derived.get(key)
    if found is not None:
        return found
    den = sel.values(rule.denominator)
    with np.errstate(all="ignore"):
        if rule.exponent == 1.0:
            scale = den
        elif rule.exponent == 2.0:
            scale = den * den
        else:
            scale = den ** rule.exponent
        ratio: F64 = sel.values(rule.numerator) / scale
    ok = (den >= rule.min_denominator) & np.isfinite(ratio)
    dev, ts, wm, starts = sel.dev, sel.ts, sel.wm, sel.starts
    if not ok.all():
        at = np.flatnonzero(ok)
        dev, ts, wm, ratio = dev[at], ts[at], wm[at], ratio[at]
        starts = np.flatnonzero(segment_firsts(dev))
    found = sel.derived[key] = Points(dev, ts, wm, ratio, starts, dev[starts], fixed(ratio))
    return found


class RatioDetector(Detector):
    rule: RatioRule

    def __init__(self, rule: RatioRule, site: Site) -> None:
        super().__init__(rule, site)
        # first valid reading, reference (NaN: not learnt yet), values kept while learning
        # and the learning slice of the last one (-1: none)
        self.state = DeviceState({
            "first": (np.float64, np.nan), "ref": (np.float64, np.nan), "kept": (np.int64, 0),
            "slice": (np.int64, -1)})
        self.buckets = OpenBuckets()
        self.store = np.zeros((0, KEEP))  # row per device while any device learns

    def resize(self, size: int) -> None:
        super().resize(size)
        self.buckets.resize(size)

    def process(self, batch: Batch) -> list[Emitted]:
        rule = self.rule
        sel = batch.select(rule.match, self.matched, rule.numerator)
        pts = ratio_points(sel, rule)
        dev, ts, wm, ratio, parts = pts.dev, pts.ts, pts.wm, pts.ratio, pts.parts
        shared: dict[Hashable, Any] | None = pts.derived
        if len(dev) and np.isnan(self.state["ref"][pts.heads]).any():
            after = self._learn(dev, ts, ratio, pts.starts)
            if after is not None:
                dev, ts, wm = dev[after], ts[after], wm[after]
                parts = (parts[0][after], parts[1][after], parts[2][after])
                shared = None
        closed = self.buckets.collect(dev, ts, parts, wm, rule.window_s, batch.wm_end,
                                      shared=shared)
        ref = self.state["ref"][closed.dev]
        judged = np.flatnonzero(ref > 0)
        if not len(judged):
            return []
        mean = closed.mean[judged]
        pct = (mean / ref[judged] - 1.0) * 100.0
        cond = np.zeros(len(judged), dtype=np.bool_)
        calm = np.ones(len(judged), dtype=np.bool_)
        if rule.rise_pct is not None:
            cond |= pct > rule.rise_pct
            calm &= pct < (rule.rise_pct if rule.clear_pct is None else rule.clear_pct)
        if rule.fall_pct is not None:
            cond |= pct < -rule.fall_pct
            calm &= pct > -(rule.fall_pct if rule.clear_pct is None else rule.clear_pct)
        detail: list[Mapping[str, Any] | None] = [
            {"reference": r, "pct": p}
            for r, p in zip(ref[judged].tolist(), pct.tolist(), strict=True)]
        return level(self.life, closed.dev[judged], bucket_end(closed.b[judged], rule.window_s),
                     cond, calm, rule.for_s, mean, detail)

    def _learn(self, dev: I64, ts: F64, ratio: F64, starts: I64) -> I64 | None:
        """Sample learning-period ratios into the store; return the positions of the
        points after learning (None: all of them).

        A device learns from its first valid reading for `learn_s`, so its learning
        points are a prefix of its points in the batch.
        """
        st = self.state
        first_ts, ref = st["first"], st["ref"]
        heads = dev[starts]
        unset = np.isnan(first_ts[heads])
        first_ts[heads[unset]] = ts[starts[unset]]
        since = ts - first_ts[dev]
        learning = np.isnan(ref[dev]) & ((since < self.rule.learn_s) | (since == 0))
        at = np.flatnonzero(learning)
        if len(at):
            self._sample(dev[at], since[at], ratio[at])
        done = np.unique(dev[~learning & np.isnan(ref[dev])])
        if len(done):
            self._references(done)
        return np.flatnonzero(~learning) if len(at) else None

    def _sample(self, dev: I64, since: F64, values: F64) -> None:
        """Keep the first value of each learning slice (device-sorted points)."""
        st = self.state
        if len(self.store) < len(st["kept"]):
            grown = np.full((len(st["kept"]), KEEP), np.nan)
            grown[: len(self.store)] = self.store
            self.store = grown
        if self.rule.learn_s > 0:
            slices = np.minimum(since * KEEP / self.rule.learn_s, KEEP - 1).astype(np.int64)
        else:
            slices = np.zeros(len(since), dtype=np.int64)
        previous = np.empty_like(slices)
        previous[1:] = slices[:-1]
        first = segment_firsts(dev)
        previous[first] = st["slice"][dev[first]]
        take = np.flatnonzero(slices != previous)
        if not len(take):
            return
        dev, slices, values = dev[take], slices[take], values[take]
        first = segment_firsts(dev)
        starts = np.flatnonzero(first)
        counts = np.diff(np.append(starts, len(dev)))
        heads = dev[starts]
        column = np.repeat(st["kept"][heads] - starts, counts) + np.arange(len(dev))
        self.store[dev, column] = values
        st["kept"][heads] += counts
        st["slice"][heads] = slices[starts + counts - 1]

    def _references(self, devs: I64) -> None:
        """Learning is over for `devs`: their reference is the median of what was kept."""
        st = self.state
        st["ref"][devs] = median_of_rows(self.store[devs], st["kept"][devs])
        self.store[devs] = np.nan
        st["kept"][devs] = 0
        st["slice"][devs] = -1
        if (st["kept"] == 0).all():
            self.store = np.zeros((0, KEEP))  # nobody learns: free the store

    def dump(self) -> tuple[dict[str, Array], Meta]:
        arrays, meta = super().dump()
        arrays.update(self.buckets.dump("bucket.", len(self.site)))
        kept = self.state["kept"][: len(self.site)]
        learners = np.flatnonzero(kept > 0)
        arrays["learn.values"] = (self.store[learners][np.arange(KEEP)[None, :]
                                                        < kept[learners][:, None]]
                                  if len(learners) else np.zeros(0))
        return arrays, meta

    def load(self, arrays: Mapping[str, Array], meta: Meta) -> None:
        super().load(arrays, meta)
        self.buckets.load("bucket.", arrays)
        values = arrays.get("learn.values")
        kept = self.state["kept"]
        if values is None or int(kept.sum()) != len(values) or (kept > KEEP).any() or (
                kept < 0).any():
            raise ValueError("ratio learning store is inconsistent")
        self.store = np.zeros((0, KEEP))
        learners = np.flatnonzero(kept > 0)
        if len(learners):
            self.store = np.full((len(kept), KEEP), np.nan)
            mask = np.arange(KEEP)[None, :] < kept[learners][:, None]
            rows = self.store[learners]
            rows[mask] = values
            self.store[learners] = rows
