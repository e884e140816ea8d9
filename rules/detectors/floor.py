"""Floor drift: a cycling unit's base draw at one operating point against its own lowest.

Why a floor: the total draw of an air-conditioning unit follows the weather (the
compressor's work), so a slow rise of a few % a day hides in it. When the compressor
stops, what is left (fan, controls) depends on the fan speed only; a unit whose base draw
at the same fan speed rises is wearing (bearings, motor, a fouled fan), whatever the
weather does.

Per device, per epoch-aligned `window_s` bucket (event time) and per operating point
(`per` rounded to `per_step`, at most `BINS` points), the bucket keeps two numbers: its
*floor*, the lowest value held by two consecutive readings of the device at that point (a
single low sample is not a floor), and its *peak*. Both are minima and maxima, so an open
bucket is two floats and any batch split gives the same values. A bucket closes when the
device sends a reading in a later bucket or the watermark reaches its end; a reading whose
bucket the watermark already closed is not counted.

A closed bucket whose peak is at least `min_swing` x its floor (> 0) saw the big load start
and stop: its floor is judged against the reference of that operating point (the lowest
such floor so far, so a drift never teaches itself), then lowers the reference when below
it. Buckets ending within `learn_s` of the device's first usable reading only teach.
Buckets without the swing (the compressor ran throughout, or never) say nothing either
way: they are left out, so they neither start nor break a pending run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from rules.batch import Batch
from rules.detectors.base import Detector, Meta, Site
from rules.lifecycle import Array, DeviceState, Emitted, level
from rules.model import FloorRule

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

BINS = 256
"""Operating points per device (e.g. fan speed 0-100 % in steps of 1)."""
NONE = np.iinfo(np.int64).min


class FloorDetector(Detector):
    rule: FloorRule

    def __init__(self, rule: FloorRule, site: Site) -> None:
        super().__init__(rule, site)
        # first usable reading; open bucket (NONE: none); last reading's value and point
        # (-1: not usable), for the two-reading floor
        self.state = DeviceState({
            "first": (np.float64, np.nan), "win": (np.int64, NONE),
            "last_v": (np.float64, np.nan), "last_b": (np.int64, -1)})
        self.floor = np.full((0, BINS), np.nan)  # open bucket, per operating point
        self.peak = np.full((0, BINS), np.nan)
        self.ref = np.full((0, BINS), np.nan)

    def resize(self, size: int) -> None:
        super().resize(size)
        if len(self.ref) < size:
            self.floor, self.peak, self.ref = (_grow(a, size)
                                               for a in (self.floor, self.peak, self.ref))

    def process(self, batch: Batch) -> list[Emitted]:
        rule = self.rule
        sel = batch.select(rule.match, self.matched, rule.metric)
        if not len(sel) and not (self.state["win"] != NONE).any():
            return []
        st = self.state
        dev, ts, wm = sel.dev, sel.ts, sel.wm
        value = sel.values(rule.metric)
        usable = np.isfinite(value)
        if rule.per is None:
            point = np.zeros(len(dev), dtype=np.int64)
        else:
            per = sel.values(rule.per)
            with np.errstate(invalid="ignore"):
                steps = np.rint(per / rule.per_step)
                usable &= (per >= rule.min_per) & (steps >= 0) & (steps < BINS)
            point = np.where(usable, steps, 0).astype(np.int64)
        point = np.where(usable, point, -1)
        # the two-reading floor: this reading and the device's previous one, same point
        prev_v = np.empty(len(dev))
        prev_b = np.empty(len(dev), dtype=np.int64)
        if len(dev):
            prev_v[1:], prev_b[1:] = value[:-1], point[:-1]
            heads, lasts = sel.heads, sel.lasts
            prev_v[sel.starts], prev_b[sel.starts] = st["last_v"][heads], st["last_b"][heads]
            st["last_v"][heads], st["last_b"][heads] = value[lasts], point[lasts]
            first = st["first"]
            seen = np.flatnonzero(usable)
            if len(seen):
                at = seen[np.flatnonzero(np.append(True, dev[seen][1:] != dev[seen][:-1]))]
                fresh = at[np.isnan(first[dev[at]])]
                first[dev[fresh]] = ts[fresh]
        paired = usable & (prev_b == point)
        pair = np.where(paired, np.fmax(value, prev_v), np.nan)
        width = rule.window_s
        w = np.floor(ts / width).astype(np.int64)
        keep = np.flatnonzero(usable & (wm < (w + 1) * width))
        # candidate buckets: this batch's groups plus the open ones
        win = st["win"]
        open_dev = np.flatnonzero(win != NONE)
        o_dev, o_b = np.nonzero(~np.isnan(self.peak[open_dev]))
        o_dev = open_dev[o_dev]
        cdev = np.concatenate((dev[keep], o_dev))
        cw = np.concatenate((w[keep], win[o_dev]))
        cb = np.concatenate((point[keep], o_b))
        cfloor = np.concatenate((pair[keep], self.floor[o_dev, o_b]))
        cpeak = np.concatenate((value[keep], self.peak[o_dev, o_b]))
        touched = np.union1d(open_dev, dev[keep]) if len(keep) else open_dev
        self.floor[touched] = np.nan
        self.peak[touched] = np.nan
        win[touched] = NONE
        if not len(cdev):
            return []
        order = np.lexsort((cw, cb, cdev))  # by device, point, bucket
        cdev, cw, cb, cfloor, cpeak = (a[order] for a in (cdev, cw, cb, cfloor, cpeak))
        new = np.ones(len(cdev), dtype=np.bool_)
        new[1:] = (cdev[1:] != cdev[:-1]) | (cb[1:] != cb[:-1]) | (cw[1:] != cw[:-1])
        starts = np.flatnonzero(new)
        gdev, gw, gb = cdev[starts], cw[starts], cb[starts]
        with np.errstate(invalid="ignore"):
            gfloor = np.fmin.reduceat(cfloor, starts)
            gpeak = np.fmax.reduceat(cpeak, starts)
        last_w = np.full(len(win), NONE)
        if len(dev):
            last_w[sel.heads] = np.floor(ts[sel.lasts] / width).astype(np.int64)
        closed = (gw < last_w[gdev]) | ((gw + 1) * width <= batch.wm_end)
        stay = np.flatnonzero(~closed)
        self.floor[gdev[stay], gb[stay]] = gfloor[stay]
        self.peak[gdev[stay], gb[stay]] = gpeak[stay]
        win[gdev[stay]] = gw[stay]
        return self._judge(gdev[closed], gw[closed], gb[closed], gfloor[closed], gpeak[closed])

    def _judge(self, dev: I64, w: I64, b: I64, floor: F64, peak: F64) -> list[Emitted]:
        """Closed buckets, sorted by (device, point, bucket): judge, then teach, in order."""
        rule = self.rule
        with np.errstate(invalid="ignore"):
            swing = (floor > 0) & (peak >= rule.min_swing * floor)
        at = np.flatnonzero(swing)
        if not len(at):
            return []
        dev, w, b, floor = dev[at], w[at], b[at], floor[at]
        end = (w + 1).astype(np.float64) * rule.window_s
        teach_only = end <= self.state["first"][dev] + rule.learn_s
        new = np.ones(len(dev), dtype=np.bool_)
        new[1:] = (dev[1:] != dev[:-1]) | (b[1:] != b[:-1])
        group_start = np.maximum.accumulate(np.where(new, np.arange(len(dev)), 0))
        rank = np.arange(len(dev)) - group_start
        ref_then = np.empty(len(dev))
        for r in range(int(rank.max()) + 1):  # a few buckets per device and call
            i = np.flatnonzero(rank == r)
            ref_then[i] = self.ref[dev[i], b[i]]
            self.ref[dev[i], b[i]] = np.fmin(ref_then[i], floor[i])
        judged = np.flatnonzero(~teach_only & (ref_then > 0))
        if not len(judged):
            return []
        pct = (floor[judged] - ref_then[judged]) * 100.0 / ref_then[judged]
        clear = rule.rise_pct if rule.clear_pct is None else rule.clear_pct
        order = np.lexsort((b[judged], end[judged], dev[judged]))
        pct, sel = pct[order], judged[order]
        detail: list[Mapping[str, Any] | None] = [
            {"reference": r, "pct": p} for r, p in zip(ref_then[sel].tolist(), pct.tolist(),
                                                       strict=True)]
        return level(self.life, dev[sel], end[sel], pct > rule.rise_pct, pct < clear,
                     rule.for_s, floor[sel], detail)

    def dump(self) -> tuple[dict[str, Array], Meta]:
        arrays, meta = super().dump()
        n = len(self.site)
        for name in ("floor", "peak", "ref"):
            grid = getattr(self, name)[:n]
            at = np.flatnonzero(~np.isnan(grid.ravel()))
            arrays[f"{name}.at"] = at.astype(np.int64)
            arrays[f"{name}.value"] = grid.ravel()[at]
        return arrays, meta

    def load(self, arrays: Mapping[str, Array], meta: Meta) -> None:
        super().load(arrays, meta)
        size = len(self.state["win"])
        for name in ("floor", "peak", "ref"):
            at, values = arrays.get(f"{name}.at"), arrays.get(f"{name}.value")
            if (at is None or values is None or at.shape != values.shape or at.ndim != 1
                    or (len(at) and (at.min() < 0 or at.max() >= size * BINS))):
                raise ValueError(f"floor snapshot: {name} is inconsistent")
            grid = np.full(size * BINS, np.nan)
            grid[at.astype(np.int64)] = values
            setattr(self, name, grid.reshape(size, BINS))


def _grow(grid: F64, size: int) -> F64:
    grown = np.full((size, BINS), np.nan)
    grown[: len(grid)] = grid
    return grown
