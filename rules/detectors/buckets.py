"""Event-time buckets (epoch-aligned multiples of a width) per device, summed exactly.

A device's bucket closes when the device sends a reading in a later bucket or when the
watermark reaches the bucket's end plus `grace`; a reading that arrives for a bucket the
watermark already closed is not counted (it would otherwise change a verdict already
given).

Sums are fixed point: each value (clipped to +-2^40) is split into its integer part and
two 40-bit limbs of its fraction (resolution 2^-80), each summed as int64. Integer sums
are exact in any order and grouping, so a bucket's mean is a function of its values alone,
identical however the stream was cut into calls (a float sum carried across calls would
differ in the last bits), and an open bucket is carried as four integers instead of its
readings. A single value's mean is the value itself, to the bit (for |v| >= 2^-27).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rules.batch import Selection
from rules.lifecycle import Array, DeviceState, segment_firsts

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

NONE = np.iinfo(np.int64).min  # no open bucket
LIMIT = 2.0**40
LIMB = 2.0**40

Parts = tuple[I64, I64, I64]


def fixed(values: F64) -> Parts:
    """(integer part, fraction's high and low 40-bit limbs) of each value.

    Truncation keeps every part's sign and makes each subtraction exact (it only drops
    bits), so a value whose lowest bit is at least 2^-80 (any |v| >= 2^-27) is
    represented exactly.
    """
    work = np.clip(values, -LIMIT, LIMIT)
    whole = work.astype(np.int64)  # casting truncates toward zero
    work -= whole
    work *= LIMB
    high = work.astype(np.int64)
    work -= high
    work *= LIMB
    np.rint(work, out=work)
    return whole, high, work.astype(np.int64)


def fixed_mean(whole: I64, high: I64, low: I64, n: I64) -> F64:
    fraction = high.astype(np.float64) / LIMB + low.astype(np.float64) / LIMB / LIMB
    mean: F64 = (whole.astype(np.float64) + fraction) / n
    return mean


def bucket_end(b: I64, width: float) -> F64:
    """End time of buckets (the time their verdicts are stamped with)."""
    return (b + 1).astype(np.float64) * width


@dataclass(slots=True)
class Closed:
    """Buckets closed in this call, sorted by (device, bucket)."""

    dev: I64
    b: I64
    whole: I64
    high: I64
    low: I64
    n: I64

    @property
    def mean(self) -> F64:
        return fixed_mean(self.whole, self.high, self.low, self.n)


_NONE_I64 = np.zeros(0, np.int64)
EMPTY = Closed(_NONE_I64, _NONE_I64, _NONE_I64, _NONE_I64, _NONE_I64, _NONE_I64)


@dataclass(slots=True)
class Runs:
    """Points grouped into (device, bucket) runs: rule-independent for a width and grace.

    `keep`: the points counted (None: all); `starts` of each run among the kept points,
    its device, bucket, count and end time; `seg_first`: the run is its device's first in
    this call; `inner`: not its device's last (so a later bucket follows: it is closed);
    `last`: indices of each device's last run.
    """

    keep: Bools | None
    starts: I64
    rdev: I64
    rb: I64
    counts: I64
    end: F64
    seg_first: Bools
    inner: Bools
    last: I64


def _runs(dev: I64, ts: F64, wm: F64, width: float, grace: float) -> Runs:
    b = np.floor(ts / width).astype(np.int64)
    end = bucket_end(b, width)
    ok = wm < (end + grace if grace else end)
    keep: Bools | None = None
    if not ok.all():
        keep = ok
        dev, b, end = dev[ok], b[ok], end[ok]
    first = segment_firsts(dev)
    run_first = first.copy()
    if len(b):
        run_first[1:] |= b[1:] != b[:-1]
    starts = np.flatnonzero(run_first)
    rdev = dev[starts]
    inner = np.append(rdev[1:] == rdev[:-1], False) if len(rdev) else np.zeros(0, np.bool_)
    return Runs(keep, starts, rdev, b[starts], np.diff(np.append(starts, len(dev))),
                end[starts], first[starts], inner, np.flatnonzero(~inner))


class OpenBuckets:
    """Each device's open bucket: its index and fixed-point sums so far."""

    SUMS = ("whole", "high", "low", "n")

    def __init__(self) -> None:
        self.st = DeviceState({"b": (np.int64, NONE), **{k: (np.int64, 0) for k in self.SUMS}})

    def resize(self, size: int) -> None:
        self.st.resize(size)

    def collect(self, dev: I64, ts: F64, parts: Parts, wm: F64, width: float,
                wm_end: float, grace: float = 0.0,
                shared: dict[Hashable, Any] | None = None) -> Closed:
        """Add device-sorted points (values as `fixed` parts) to their buckets; return
        the buckets this call closed. `shared` (a selection's `derived`) caches the run
        structure of these points for every rule with the same width and grace."""
        st = self.st
        ob = st["b"]
        if len(ts) and self._accumulate(dev, ts, parts, width, wm_end, grace):
            return EMPTY
        runs = None if shared is None else shared.get(("runs", width, grace))
        if runs is None:
            runs = _runs(dev, ts, wm, width, grace)
            if shared is not None:
                shared[("runs", width, grace)] = runs
        closed: list[list[I64]] = []
        in_batch = np.zeros(len(ob), dtype=np.bool_)
        if len(runs.starts):
            keep, starts, rdev, rb = runs.keep, runs.starts, runs.rdev, runs.rb
            sums = [np.add.reduceat(v if keep is None else v[keep], starts) for v in parts]
            sums.append(runs.counts.copy())
            carried = ob[rdev]
            alone = np.flatnonzero(runs.seg_first & (carried != NONE) & (carried != rb))
            if len(alone):
                d = rdev[alone]
                closed.append([d, ob[d], *(st[k][d] for k in self.SUMS)])
            merge = np.flatnonzero(runs.seg_first & (carried == rb))
            if len(merge):
                d = rdev[merge]
                for total, key in zip(sums, self.SUMS, strict=True):
                    total[merge] += st[key][d]
            closes = runs.inner | (wm_end >= runs.end + grace)
            if closes.any():
                closed.append([rdev[closes], rb[closes], *(total[closes] for total in sums)])
            in_batch[rdev] = True
            last = runs.last
            d = rdev[last]
            stays = ~closes[last]
            ob[d] = np.where(stays, rb[last], NONE)
            for total, key in zip(sums, self.SUMS, strict=True):
                st[key][d] = np.where(stays, total[last], 0)
        expire = np.flatnonzero((ob != NONE) & ~in_batch & (wm_end >= (ob + 1) * width + grace))
        if len(expire):
            closed.append([expire, ob[expire], *(st[k][expire] for k in self.SUMS)])
            ob[expire] = NONE
            for key in self.SUMS:
                st[key][expire] = 0
        if not closed:
            return EMPTY
        if len(closed) == 1:
            cdev, cb, cw, ch, cl, cn = closed[0]
        else:
            cdev, cb, cw, ch, cl, cn = (np.concatenate([c[k] for c in closed]) for k in range(6))
        order = np.lexsort((cb, cdev))
        return Closed(cdev[order], cb[order], cw[order], ch[order], cl[order], cn[order])

    def _accumulate(self, dev: I64, ts: F64, parts: Parts, width: float, wm_end: float,
                    grace: float) -> bool:
        """The common case of a small call: every point and every open bucket is in the
        same bucket, which the watermark has not closed. Then nothing can close and the
        call only adds to the open sums (no runs, no verdicts). False: not that case."""
        bucket = np.floor(ts[0] / width)
        if not (np.floor(ts.min() / width) == bucket == np.floor(ts.max() / width)):
            return False
        b = int(bucket)
        if wm_end >= (b + 1) * width + grace:
            return False
        st = self.st
        ob = st["b"]
        if not ((ob == NONE) | (ob == b)).all():
            return False
        starts = np.flatnonzero(segment_firsts(dev))
        heads = dev[starts]
        ob[heads] = b
        for v, key in zip(parts, self.SUMS[:3], strict=True):
            st[key][heads] += np.add.reduceat(v, starts)
        st["n"][heads] += np.diff(np.append(starts, len(dev)))
        return True

    def dump(self, prefix: str, size: int) -> dict[str, npt.NDArray[np.int64]]:
        return self.st.dump(prefix, size)

    def load(self, prefix: str, arrays: Mapping[str, Array]) -> None:
        self.st.load(prefix, arrays)


def fixed_parts(sel: Selection, metric: str) -> Parts:
    """`fixed` of a selection's metric, computed once for every rule that needs it."""
    key = ("fixed", metric)
    found: Parts | None = sel.derived.get(key)
    if found is None:
        found = sel.derived[key] = fixed(sel.values(metric))
    return found
