"""Per-device state arrays and the alert life cycle (idle, pending, firing) shared by detectors.

State lives in numpy arrays indexed by the engine's device number, so a batch touches a
rule's state with one gather and one scatter instead of a dict lookup per reading, and a
snapshot is a handful of arrays.

`level` is the vectorised state machine of every "condition holds / condition cleared"
rule (threshold, schedule, rate of change, flatline, baseline, ratio, group):

- a *run* is a maximal stretch of consecutive points of one device where `cond` holds;
- the run's first point starts the pending timer (`started_at`); the alert fires at the
  first point of the run at least `for_s` after that start; a point where `cond` does not
  hold ends the run, and with it a pending timer (pending needs the condition to hold
  continuously, so a value that dips back under its threshold restarts the wait);
- once firing, only a `reset` point resolves it (hysteresis: points that are neither
  `cond` nor `reset` change nothing, and new runs while firing do not re-fire).

With per-device initial states, "which event came last" is a forward fill, which numpy does
with `maximum.accumulate` over event positions; no Python loop per point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Emitted:
    """A transition before the engine dresses it as a `Transition` (ids, message, labels)."""

    ts: float
    device: int
    state: str  # "firing" | "resolved"
    value: float | None
    started_at: float
    detail: Mapping[str, Any] | None = None


class DeviceState:
    """Named arrays with one entry per engine device, grown and snapshotted together."""

    def __init__(self, spec: Mapping[str, tuple[type[np.generic], Any]], size: int = 0) -> None:
        self._spec = dict(spec)
        self.arrays: dict[str, Array] = {
            name: np.full(size, fill, dtype=dtype) for name, (dtype, fill) in self._spec.items()
        }

    def __getitem__(self, name: str) -> Array:
        return self.arrays[name]

    def __setitem__(self, name: str, value: Array) -> None:
        self.arrays[name] = value

    def resize(self, size: int) -> None:
        for name, (dtype, fill) in self._spec.items():
            old = self.arrays[name]
            if len(old) < size:
                grown = np.full(size, fill, dtype=dtype)
                grown[: len(old)] = old
                self.arrays[name] = grown

    def dump(self, prefix: str, size: int) -> dict[str, Array]:
        """The first `size` entries (the device table's length: spare capacity is not state)."""
        return {f"{prefix}{name}": array[:size] for name, array in self.arrays.items()}

    def load(self, prefix: str, arrays: Mapping[str, Array]) -> None:
        for name, (dtype, _fill) in self._spec.items():
            stored = arrays.get(f"{prefix}{name}")
            if stored is None or stored.ndim != 1:
                raise ValueError(f"snapshot lacks {prefix}{name}")
            size = len(self.arrays[name])
            if len(stored) > size:
                raise ValueError(f"snapshot array {prefix}{name} longer than the device table")
            self.arrays[name][: len(stored)] = stored.astype(dtype, copy=False)


def lifecycle_state(size: int = 0) -> DeviceState:
    """firing flag, started_at of the firing alert, start of the pending timer (NaN: none)."""
    return DeviceState({"firing": (np.bool_, False), "started": (np.float64, np.nan),
                        "pending": (np.float64, np.nan)}, size)


def segment_firsts(dev: I64) -> Bools:
    """True at the first point of each device's run in a device-sorted array."""
    first = np.empty(len(dev), dtype=np.bool_)
    if len(dev):
        first[0] = True
        np.not_equal(dev[1:], dev[:-1], out=first[1:])
    return first


def shift(values: Array, first: Bools, initial: Array) -> Array:
    """values[i - 1] within a device's points; `initial` (per point) at each device's first."""
    out = np.empty_like(values)
    if len(values):
        out[1:] = values[:-1]
        out[first] = initial[first]
    return out


def level(life: DeviceState, dev: I64, ts: F64, cond: Bools,
          reset: Bools | Callable[[I64 | None], Bools], for_s: float,
          values: F64 | None = None, detail: list[Mapping[str, Any] | None] | None = None,
          ) -> list[Emitted]:
    """Run the life cycle over device-sorted points; update `life`; return transitions.

    `values[i]` is reported as the transition's value; `detail[i]` (optional) as extra
    message fields. A point both `cond` and `reset` counts as `cond`. `reset` may be a
    function of point positions (None: all points), evaluated only where it matters.

    Most points of most devices are quiet (no condition, nothing pending or firing), so
    only devices with a `cond` point or an active state run the full state machine.
    """
    firing, started, pending = life["firing"], life["started"], life["pending"]
    out: list[Emitted] = []
    if not cond.any():
        if firing.any():
            at = np.flatnonzero(firing[dev])
            if len(at):
                hit = at[_reset_at(reset, at)]
                devs, where = np.unique(dev[hit], return_index=True)
                for i in hit[where].tolist():
                    out.append(_emit(ts, dev, i, "resolved", float(started[dev[i]]), values,
                                     detail))
                firing[devs] = False
                started[devs] = np.nan
        if not np.isnan(pending).all():
            pending[dev] = np.nan  # every touched device had a point without the condition
        return out
    candidate = firing | ~np.isnan(pending)
    candidate[dev[cond]] = True
    take = candidate[dev]
    if take.all():
        return _level(life, dev, ts, cond, _reset_at(reset, None), for_s, values, detail)
    pos = np.flatnonzero(take)
    return _level(life, dev[pos], ts[pos], cond[pos], _reset_at(reset, pos), for_s,
                  None if values is None else values[pos],
                  None if detail is None else [detail[i] for i in pos.tolist()])


def _reset_at(reset: Bools | Callable[[I64 | None], Bools], pos: I64 | None) -> Bools:
    if callable(reset):
        return reset(pos)
    return reset if pos is None else reset[pos]


def _level(life: DeviceState, dev: I64, ts: F64, cond: Bools, reset: Bools, for_s: float,
           values: F64 | None, detail: list[Mapping[str, Any] | None] | None,
           ) -> list[Emitted]:
    firing, started, pending = life["firing"], life["started"], life["pending"]
    n = len(ts)
    idx = np.arange(n)
    first = segment_firsts(dev)
    first_idx = np.maximum.accumulate(np.where(first, idx, 0))
    prev_cond = shift(cond, first, np.zeros(n, dtype=np.bool_))
    run_start = cond & ~prev_cond
    start_ts = ts.copy()
    carried = first & cond & ~np.isnan(pending[dev])
    start_ts[carried] = pending[dev[carried]]
    run_ts = start_ts[np.maximum.accumulate(np.where(run_start, idx, 0))]
    qualifies = cond & (ts - run_ts >= for_s)
    event = qualifies | (reset & ~cond)
    last_event = np.maximum.accumulate(np.where(event, idx, -1))
    seen = last_event >= first_idx
    initial = firing[dev]
    state = np.where(seen, qualifies[np.maximum(last_event, 0)], initial)
    before = shift(state, first, initial)
    fired = state & ~before
    fires = np.flatnonzero(fired)
    resolves = np.flatnonzero(~state & before)
    out: list[Emitted] = []
    last_fire = np.maximum.accumulate(np.where(fired, idx, -1))
    for i in fires.tolist():
        out.append(_emit(ts, dev, i, "firing", float(run_ts[i]), values, detail))
    for i in resolves.tolist():
        j = int(last_fire[i])
        began = float(run_ts[j]) if j >= first_idx[i] else float(started[dev[i]])
        out.append(_emit(ts, dev, i, "resolved", began, values, detail))
    last = np.flatnonzero(np.append(first[1:], True))
    devs = dev[last]
    end_state = state[last]
    at = last_fire[last]
    fresh = at >= first_idx[last]
    new_started = np.where(fresh, run_ts[np.maximum(at, 0)], started[devs])
    started[devs] = np.where(end_state, new_started, np.nan)
    firing[devs] = end_state
    pending[devs] = np.where(cond[last] & ~end_state, run_ts[last], np.nan)
    return out


def _emit(ts: F64, dev: I64, i: int, state: str, began: float, values: F64 | None,
          detail: list[Mapping[str, Any] | None] | None) -> Emitted:
    value = None if values is None else float(values[i])
    return Emitted(float(ts[i]), int(dev[i]), state, value, began,
                   None if detail is None else detail[i])
