"""Flatline (stuck sensor): the value stays within `tolerance` of an anchor for `window_s`.

The anchor is the value at the last change: a reading more than `tolerance` away from it
is a change and becomes the new anchor. The condition holds at a reading that is not a
change and comes at least `window_s` after the anchor; `for_s` and pending work as for a
threshold; the first change resolves (a resolved alert only fires again after a fresh
`window_s` without change). Readings with |value| <= `ignore_below` drop the anchor (a
unit switched off is not a stuck sensor) and resolve a firing alert; the next counted
reading is a new anchor.

Whether a reading is a change depends on the anchor, which depends on earlier changes, so
the exact answer is sequential. Two facts make it cheap: with `tolerance` 0 a change is
simply "differs from the previous reading", and in general a step of more than
2 x tolerance from the previous counted reading is always a change (the previous one is
within tolerance of the anchor). Only the stretches between certain changes that hold a
step in (0, 2 x tolerance] need the sequential walk; they all walk in lock-step, one numpy
step per position, grouped by length so memory stays linear. A run of unchanged readings
is then anchored at the change just before it, which is one lookup per run.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from rules.batch import Batch
from rules.detectors.base import Detector, Site
from rules.lifecycle import DeviceState, Emitted, level
from rules.model import FlatlineRule

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class FlatlineDetector(Detector):
    rule: FlatlineRule

    def __init__(self, rule: FlatlineRule, site: Site) -> None:
        super().__init__(rule, site)
        # anchor value/time (NaN: none) and the last counted value (NaN: last one ignored)
        self.state = DeviceState({"av": (np.float64, np.nan), "at": (np.float64, np.nan),
                                  "last": (np.float64, np.nan)})

    def process(self, batch: Batch) -> list[Emitted]:
        rule = self.rule
        sel = batch.select(rule.match, self.matched, rule.metric)
        if not len(sel):
            return []
        dev, ts, starts, heads, lasts = sel.dev, sel.ts, sel.starts, sel.heads, sel.lasts
        v = sel.values(rule.metric)
        av, at, last_v = self.state["av"], self.state["at"], self.state["last"]
        ignored = np.abs(v) <= rule.ignore_below
        if ignored.any():
            counted = np.where(ignored, np.nan, v)
            prev = np.empty_like(counted)
            prev[1:] = counted[:-1]
            prev[starts] = last_v[heads]
        else:
            counted = v
            prev = sel.prev_with(rule.metric, last_v)
        if rule.tolerance > 0:
            step = np.abs(v - prev)
            change = ignored | ~(step <= 2 * rule.tolerance)  # NaN step: no anchor
            unsure = ~change & (step > 0)
            if unsure.any():
                _walk(change, unsure, ignored, v, starts, dev, av, rule.tolerance)
        else:
            change = ignored | (v != prev)  # NaN previous: no anchor yet, a change
        cond = np.zeros(len(v), dtype=np.bool_)
        end_change = change[lasts]
        new_av = np.where(end_change, counted[lasts], np.nan)
        new_at = np.where(end_change & ~ignored[lasts], ts[lasts], np.nan)
        same = np.flatnonzero(~change)
        if len(same):
            # a run of unchanged points is anchored at the change just before it (or, at a
            # device's first point, at the carried anchor)
            first = sel.first
            run = np.ones(len(same), dtype=np.bool_)
            run[1:] = (same[1:] != same[:-1] + 1) | first[same[1:]]
            runs = np.flatnonzero(run)
            begin = same[runs]
            carried = first[begin]
            before = np.maximum(begin - 1, 0)
            run_t = np.where(carried, at[dev[begin]], ts[before])
            run_v = np.where(carried, av[dev[begin]], counted[before])
            anchor_t = np.repeat(run_t, np.diff(np.append(runs, len(same))))
            cond[same] = ts[same] - anchor_t >= rule.window_s
            tail = np.flatnonzero(~end_change)  # segments ending inside a run
            if len(tail):
                owner = np.searchsorted(begin, lasts[tail], side="right") - 1
                new_av[tail], new_at[tail] = run_v[owner], run_t[owner]
        av[heads], at[heads], last_v[heads] = new_av, new_at, counted[lasts]
        return level(self.life, dev, ts, cond, change, rule.for_s, v)


def _walk(change: Bools, unsure: Bools, ignored: Bools, v: F64, starts: I64, dev: I64,
          av: F64, tolerance: float) -> None:
    """Decide `change` exactly (in place) where a step was unsure.

    Only stretches from a certain change (or a device's first point) up to the next
    certain change can hold unsure points, and outside them the verdicts are already
    exact; each such stretch is walked from its anchor, all stretches in lock-step, grouped
    by length so one long stretch does not widen the others.
    """
    bound = change.copy()
    bound[starts] = True
    bounds = np.flatnonzero(bound)
    ends = np.append(bounds[1:], len(v))
    pick = np.flatnonzero(np.logical_or.reduceat(unsure, bounds))
    first, last = bounds[pick], ends[pick]
    seg_start = np.zeros(len(v), dtype=np.bool_)
    seg_start[starts] = True
    carried = seg_start[first] & ~change[first]  # continues the anchor of the last call
    initial = np.where(carried, av[dev[first]], np.nan)
    lengths = last - first
    width_class = np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    for cls in np.unique(width_class).tolist():
        group = np.flatnonzero(width_class == cls)
        width = int(lengths[group].max())
        at = first[group][:, None] + np.arange(width)[None, :]
        valid = at < last[group][:, None]
        at = np.where(valid, at, 0)
        values, skip = v[at], ignored[at]
        anchor = initial[group]
        out = np.zeros(at.shape, dtype=np.bool_)
        for k in range(width):
            x, live = values[:, k], valid[:, k]
            moved = live & (skip[:, k] | np.isnan(anchor) | (np.abs(x - anchor) > tolerance))
            out[:, k] = moved
            anchor = np.where(live & skip[:, k], np.nan, np.where(moved, x, anchor))
        change[at[valid]] = out[valid]
