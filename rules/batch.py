"""One call's readings, filtered and sorted the way every detector wants them.

Sorting by (device, ts) once per batch turns every per-device question (previous value,
run of exceedances, bucket of the hour) into contiguous segments, which numpy handles with
shifts and accumulations. The sort is stable on the device number only: readings of a
device keep their arrival order, and since late ones are dropped first that order is
their time order.

The *watermark* at a reading is the newest timestamp of any item (reading or event) up to
and including it in arrival order. Timer-like decisions (no data, a bucket closing, a
counter alert expiring) compare deadlines with it, so a batch decides exactly what the
same items delivered one at a time would have decided: this is what makes results
independent of how the stream is cut into calls.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from device_drivers.vocabulary import DeviceEvent
from rules.columns import ReadingColumns
from rules.lifecycle import segment_firsts, shift

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class Selection:
    """Readings of a set of devices that carry one metric, device-sorted, in segments.

    Segment k (one device) is points `starts[k]:ends[k]` of device `heads[k]`. Derived
    arrays (values, previous values) are computed on first use and shared by every rule
    that selects the same readings, which most rules of a site do.
    """

    __slots__ = ("_prev", "_values", "batch", "derived", "dev", "ends", "heads", "pos",
                 "starts", "ts", "wm")

    def __init__(self, batch: Batch, pos: I64 | None, dev: I64, ts: F64, wm: F64,
                 starts: I64) -> None:
        self.batch = batch
        self.pos = pos  # positions in the batch's sorted arrays; None: all of them
        self.dev, self.ts, self.wm = dev, ts, wm
        self.starts = starts
        self.ends = np.append(starts[1:], len(dev)).astype(np.int64)
        self.heads = dev[starts]
        self._values: dict[str, F64] = {}
        self._prev: dict[str, F64] = {}
        self.derived: dict[Hashable, Any] = {}  # rule-independent results detectors share

    def __len__(self) -> int:
        return len(self.dev)

    @property
    def lasts(self) -> I64:
        return self.ends - 1

    @property
    def first(self) -> Bools:
        first = np.zeros(len(self.dev), dtype=np.bool_)
        first[self.starts] = True
        return first

    def values(self, metric: str) -> F64:
        found = self._values.get(metric)
        if found is None:
            column = self.batch.metric(metric)
            found = self._values[metric] = column if self.pos is None else column[self.pos]
        return found

    def prev(self, metric: str | None) -> F64:
        """Each point's previous value (None: timestamp) of its device in this batch; NaN
        at each device's first point."""
        key = "" if metric is None else metric
        found = self._prev.get(key)
        if found is None:
            found = self._prev[key] = _previous(
                self.ts if metric is None else self.values(metric), self.starts)
        return found

    def prev_with(self, metric: str | None, carried: F64) -> F64:
        """`prev` with each device's carried value (`carried[device]`) at its start."""
        out = self.prev(metric).copy()
        out[self.starts] = carried[self.heads]
        return out

    def subset(self, segments: I64) -> Selection:
        """The selection restricted to whole segments (device runs)."""
        lengths = self.ends[segments] - self.starts[segments]
        idx = ranges(self.starts[segments], lengths)
        starts = (np.cumsum(lengths) - lengths).astype(np.int64)
        found = Selection(self.batch, idx if self.pos is None else self.pos[idx],
                          self.dev[idx], self.ts[idx], self.wm[idx], starts)
        for name, column in self._values.items():
            found._values[name] = column[idx]
        return found


def ranges(starts: I64, lengths: I64) -> I64:
    """Concatenated `arange(s, s + n)` for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return (np.repeat(starts - offsets, lengths) + np.arange(total)).astype(np.int64)


def _previous(values: F64, starts: I64) -> F64:
    out = np.empty_like(values)
    if len(values):
        out[1:] = values[:-1]
        out[starts] = np.nan
    return out


@dataclass(slots=True)
class Batch:
    columns: ReadingColumns
    order: I64  # stream positions of the accepted readings, device-sorted
    dev: I64
    ts: F64
    wm: F64
    wm_before: float  # NaN: nothing seen before this batch
    wm_first: float  # after the call's first item
    wm_end: float  # after its last
    events: Sequence[DeviceEvent] = ()
    event_dev: Sequence[int] = ()
    event_wm: Sequence[float] = ()
    late: int = 0
    _metrics: dict[str, F64] = field(default_factory=dict)
    _views: dict[str | None, Selection] = field(default_factory=dict)
    _selections: dict[Hashable, Selection] = field(default_factory=dict)

    def metric(self, name: str) -> F64:
        """The metric's values in sorted order; NaN where absent (or unknown metric)."""
        column = self._metrics.get(name)
        if column is None:
            raw = self.columns.metrics.get(name)
            column = np.full(len(self.order), np.nan) if raw is None else raw[self.order]
            self._metrics[name] = column
        return column

    def view(self, metric: str | None) -> Selection:
        """All readings carrying `metric` (None: all readings)."""
        found = self._views.get(metric)
        if found is None:
            pos: I64 | None = None
            dev, ts, wm = self.dev, self.ts, self.wm
            if metric is not None:
                have = ~np.isnan(self.metric(metric))
                if not have.all():
                    pos = np.flatnonzero(have)
                    dev, ts, wm = dev[pos], ts[pos], wm[pos]
            starts = np.flatnonzero(segment_firsts(dev)).astype(np.int64)
            found = self._views[metric] = Selection(self, pos, dev, ts, wm, starts)
        return found

    def select(self, key: Hashable, matched: Bools, metric: str | None) -> Selection:
        """Readings of devices with `matched[device]` that carry `metric` (None: all)."""
        cache_key = (key, metric)
        found = self._selections.get(cache_key)
        if found is None:
            base = self.view(metric)
            keep = matched[base.heads]
            found = base if keep.all() else base.subset(np.flatnonzero(keep))
            self._selections[cache_key] = found
        return found


def prepare(columns: ReadingColumns, device_map: I64, last_ts: F64, stream_wm: F64,
            wm_before: float, wm_first: float, wm_end: float) -> Batch:
    """Drop late readings (ts <= the device's newest), sort, attach watermarks.

    `device_map[k]` is the engine's number of `columns.device_ids[k]`; `last_ts` (per
    engine device, NaN: none yet) is updated in place. `stream_wm[i]` is the watermark
    at reading i (events interleaved with the readings count too).
    """
    gdev = device_map[columns.device] if len(columns) else np.zeros(0, dtype=np.int64)
    keys = gdev.astype(np.uint16) if len(last_ts) <= 0xFFFF else gdev
    order = np.argsort(keys, kind="stable").astype(np.int64)
    dev = gdev[order]
    ts = columns.ts[order]
    first = segment_firsts(dev)
    known = last_ts[dev]
    before = shift(ts, first, np.where(np.isnan(known), -np.inf, known))
    fine = ts > before
    late = 0
    if not fine.all():
        keep = _not_late(ts, first, before)
        late = int((~keep).sum())
        order, dev, ts = order[keep], dev[keep], ts[keep]
        first = segment_firsts(dev)
    wm = stream_wm[order]
    if len(dev):
        last = np.flatnonzero(np.append(first[1:], True))
        last_ts[dev[last]] = ts[last]
    return Batch(columns, order, dev, ts, wm, wm_before, wm_first, wm_end, late=late)


def _not_late(ts: F64, first: Bools, before: F64) -> Bools:
    """Keep a reading only if it is newer than everything its device sent before it.

    Rare (a device's clock jumping back, a retransmission), so a loop over the affected
    devices is fine.
    """
    keep = ts > before
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(ts))
    bad = np.flatnonzero(np.logical_and.reduceat(keep, starts) == 0) if len(starts) else starts
    for k in bad.tolist():
        lo, hi = int(starts[k]), int(ends[k])
        newest = float(before[lo])
        for i in range(lo, hi):
            if ts[i] > newest:
                newest = float(ts[i])
            else:
                keep[i] = False
    return keep
