"""Baseline: a device's bucket mean against what it usually does at that hour of the week.

Per device and local hour-of-week (168 slots, so weekday mornings and Sunday nights each
get their own normal) the detector keeps either the last `history_weeks` x
(buckets per hour) bucket means (`median_mad`: median and 1.4826 x MAD of those) or an
EWMA of the mean and of the absolute deviation (`ewma`). A closed bucket is judged against
the slot's state *before* it is added, then added (always: a lasting change becomes the
new normal instead of alerting forever; the median resists the first few outliers).

A slot with fewer than three past buckets (or history_weeks x buckets-per-hour, when that
is smaller) is not judged, nor is any bucket starting within `warmup_s` of the device's
first reading. Judged buckets are points at their end time for the shared life cycle:
deviating = condition, within bounds = reset, so `for_s` counts in buckets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from rules.batch import Batch
from rules.detectors.base import Detector, Meta, Site
from rules.detectors.buckets import OpenBuckets, bucket_end, fixed_parts
from rules.lifecycle import Array, DeviceState, Emitted, level, segment_firsts
from rules.model import BaselineRule

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

SLOTS = 168
MIN_HISTORY = 3


class BaselineDetector(Detector):
    rule: BaselineRule

    def __init__(self, rule: BaselineRule, site: Site) -> None:
        super().__init__(rule, site)
        self.state = DeviceState({"first": (np.float64, np.nan), "row": (np.int64, -1)})
        self.buckets = OpenBuckets()
        self.depth = max(1, rule.history_weeks) * max(1, math.ceil(3600 / rule.bucket_s))
        self.min_history = min(MIN_HISTORY, self.depth)
        self.rows = 0
        self.tables: dict[str, Array] = {}
        self._allocate(0)

    def _allocate(self, rows: int) -> None:
        """History tables with room for `rows` devices (kept contents)."""
        if self.rule.method == "median_mad":
            spec: dict[str, tuple[tuple[int, ...], type[np.generic], Any]] = {
                "hist": ((rows, SLOTS, self.depth), np.float64, np.nan),
                "pos": ((rows, SLOTS), np.int64, 0), "count": ((rows, SLOTS), np.int64, 0)}
        else:
            spec = {"mu": ((rows, SLOTS), np.float64, 0.0),
                    "scale": ((rows, SLOTS), np.float64, 0.0),
                    "count": ((rows, SLOTS), np.int64, 0)}
        for name, (shape, dtype, fill) in spec.items():
            table = np.full(shape, fill, dtype=dtype)
            old = self.tables.get(name)
            if old is not None:
                table[: len(old)] = old
            self.tables[name] = table

    def resize(self, size: int) -> None:
        super().resize(size)
        self.buckets.resize(size)

    def process(self, batch: Batch) -> list[Emitted]:
        rule = self.rule
        sel = batch.select(rule.match, self.matched, rule.metric)
        first_ts = self.state["first"]
        unset = np.isnan(first_ts[sel.heads])
        first_ts[sel.heads[unset]] = sel.ts[sel.starts[unset]]
        closed = self.buckets.collect(sel.dev, sel.ts, fixed_parts(sel, rule.metric), sel.wm,
                                      rule.bucket_s, batch.wm_end, shared=sel.derived)
        if not len(closed.dev):
            return []
        mean = closed.mean
        start = closed.b * rule.bucket_s
        slot = self.site.clock.hour_of_week(start.astype(np.float64))
        row = self._rows(closed.dev)
        judged, deviates, expected, bound = self._judge(row, slot, mean)
        judged &= start >= first_ts[closed.dev] + rule.warmup_s
        pts = np.flatnonzero(judged)
        if not len(pts):
            return []
        detail: list[Mapping[str, Any] | None] = [
            {"expected": float(e), "bound": float(b)}
            for e, b in zip(expected[pts].tolist(), bound[pts].tolist(), strict=True)]
        return level(self.life, closed.dev[pts], bucket_end(closed.b[pts], rule.bucket_s),
                     deviates[pts], ~deviates[pts], rule.for_s, mean[pts], detail)

    def _rows(self, dev: I64) -> I64:
        row_of = self.state["row"]
        missing = np.unique(dev[row_of[dev] < 0])
        if len(missing):
            row_of[missing] = np.arange(self.rows, self.rows + len(missing))
            self.rows += len(missing)
            if self.rows > len(self.tables["count"]):
                self._allocate(max(self.rows, 2 * len(self.tables["count"]), 8))
        return row_of[dev]

    def _judge(self, row: I64, slot: I64, mean: F64) -> tuple[Bools, Bools, F64, F64]:
        """Judge each bucket against its slot, then learn it; chronological per slot."""
        n = len(row)
        key = row * SLOTS + slot
        order = np.argsort(key, kind="stable")
        first = segment_firsts(key[order])
        pos = np.arange(n)
        rank_sorted = pos - np.maximum.accumulate(np.where(first, pos, 0))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = rank_sorted
        judged = np.zeros(n, dtype=np.bool_)
        expected, scale = np.full(n, np.nan), np.full(n, np.nan)
        for r in range(int(rank.max()) + 1):
            m = np.flatnonzero(rank == r)
            judged[m], expected[m], scale[m] = self._learn(row[m], slot[m], mean[m])
        bound = np.maximum(self.rule.k * scale, self.rule.min_abs_deviation)
        delta = mean - expected
        if self.rule.direction == "up":
            out = delta > bound
        elif self.rule.direction == "down":
            out = -delta > bound
        else:
            out = np.abs(delta) > bound
        return judged, judged & out, expected, bound

    def _learn(self, row: I64, slot: I64, mean: F64) -> tuple[Bools, F64, F64]:
        t = self.tables
        count = t["count"][row, slot]
        judged = count >= self.min_history
        if self.rule.method == "median_mad":
            values = t["hist"][row, slot]
            expected = median_of_rows(values, count)
            scale = 1.4826 * median_of_rows(np.abs(values - expected[:, None]), count)
            at = t["pos"][row, slot]
            t["hist"][row, slot, at] = mean
            t["pos"][row, slot] = (at + 1) % self.depth
            t["count"][row, slot] = np.minimum(count + 1, self.depth)
        else:
            expected, scale = t["mu"][row, slot], t["scale"][row, slot]
            alpha = self.rule.alpha
            fresh = count == 0
            step = mean - expected
            t["mu"][row, slot] = np.where(fresh, mean, expected + alpha * step)
            t["scale"][row, slot] = np.where(fresh, 0.0,
                                             (1 - alpha) * scale + alpha * np.abs(step))
            t["count"][row, slot] = count + 1
        return judged, expected, scale

    def dump(self) -> tuple[dict[str, Array], Meta]:
        arrays, meta = super().dump()
        arrays.update(self.buckets.dump("bucket.", len(self.site)))
        arrays.update({f"table.{k}": v[: self.rows] for k, v in self.tables.items()})
        return arrays, {**meta, "rows": self.rows}

    def load(self, arrays: Mapping[str, Array], meta: Meta) -> None:
        super().load(arrays, meta)
        self.buckets.load("bucket.", arrays)
        rows = int(meta["rows"])
        self.rows = 0
        self._allocate(rows)
        for name, table in self.tables.items():
            stored = arrays.get(f"table.{name}")
            if stored is None or stored.shape != (rows, *table.shape[1:]):
                raise ValueError(f"snapshot table {name} does not fit the rule")
            table[:rows] = stored
        self.rows = rows


def median_of_rows(values: F64, count: I64) -> F64:
    """Median of the first-`count` valid (non-NaN) entries of each row; NaN for none.

    The same arithmetic as `numpy.median` (mean of the two middle values), so references
    and replays agree to the bit.
    """
    ordered = np.sort(values, axis=1)  # NaN sorts last
    rows = np.arange(len(values))
    lo = np.maximum((count - 1) // 2, 0)
    hi = np.maximum(count // 2, 0)
    result = (ordered[rows, lo] + ordered[rows, hi]) / 2
    return np.where(count > 0, result, np.nan)
