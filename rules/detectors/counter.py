"""Cumulative counters (energy): regressions, rollovers and jumps the power cannot explain.

Each counter reading is compared with the device's previous one. The energy the power
explains is the mean of the `power_metric` values of the readings from the previous
counter reading to this one (both included) times the elapsed time; with no power reading
in that span the jump test is skipped (nothing to compare with). Power is summed as integer
milliwatts: integer sums are exact in any order, so a batch split anywhere gives the same
means to the last bit (floats summed in a different grouping would not).

One alert per rule and device covers all three anomalies; each anomaly while firing
extends it, and it resolves `clear_after_s` after the last one, when the watermark
(newest event time seen) passes that point. `for_s` does not apply: anomalies are
instants, not states. The transition's value is the (rollover-corrected) delta in the
counter's unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rules.batch import Batch, Selection
from rules.detectors.base import Detector, Site
from rules.lifecycle import DeviceState, Emitted
from rules.model import CounterRule

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


@dataclass(slots=True)
class Spans:
    """Counter readings of a selection and the power summed around them (rule-independent).

    For counter point i (position k[i]): the previous counter reading's value and time when
    it is in this batch (else NaN and i is in `carried`); `span_sum/n[i]` the power (mW)
    over [previous counter reading, k[i]], or over [device's first point, k[i]] when the
    previous one is carried (the carried sum is then added). `tail_sum/n` per device
    segment: the power from its last counter reading (or its first point, when it has
    none) to its end; `tail_at` that counter reading's position (-1: none).
    """

    k: I64
    carried: I64  # indices (into k) of points whose previous counter reading is carried
    c: F64  # counter value at k
    c_prev: F64  # previous counter value (NaN where carried)
    t_prev: F64
    span_sum: I64
    span_n: I64
    tail_at: I64
    tail_sum: I64
    tail_n: I64


def spans(sel: Selection, metric: str, power: str) -> Spans:
    key = ("counter-spans", metric, power)
    found: Spans | None = sel.derived.get(key)
    if found is not None:
        return found
    c, p = sel.values(metric), sel.values(power)
    has_c, has_p = ~np.isnan(c), ~np.isnan(p)
    pz = np.where(has_p, np.rint(np.clip(p, -1e9, 1e9) * 1000.0), 0.0).astype(np.int64)
    pn = has_p.astype(np.int64)
    bound = has_c.copy()
    bound[sel.starts] = True
    bounds = np.flatnonzero(bound)
    piece_sum = np.add.reduceat(pz, bounds) if len(bounds) else pz[:0]
    piece_n = np.add.reduceat(pn, bounds) if len(bounds) else pn[:0]
    at_c = np.flatnonzero(has_c[bounds])  # piece index of each counter point
    k = bounds[at_c]
    seg = np.searchsorted(sel.starts, k, side="right") - 1
    seg_start = sel.starts[seg]
    before = np.maximum(at_c - 1, 0)
    prev_bound = bounds[before]
    inside = (at_c > 0) & (prev_bound >= seg_start)  # a piece of the same device precedes
    own = inside & has_c[prev_bound]
    span_sum = np.where(inside, piece_sum[before], 0) + pz[k]
    span_n = np.where(inside, piece_n[before], 0) + pn[k]
    last_piece = np.searchsorted(bounds, sel.ends, side="left") - 1
    tail_bound = bounds[last_piece]
    tail_at = np.where(has_c[tail_bound], tail_bound, -1)
    j = np.where(own, prev_bound, 0)
    found = Spans(k, np.flatnonzero(~own), c[k], np.where(own, c[j], np.nan),
                  np.where(own, sel.ts[j], np.nan), span_sum, span_n, tail_at,
                  piece_sum[last_piece], piece_n[last_piece])
    sel.derived[key] = found
    return found


class CounterDetector(Detector):
    rule: CounterRule

    def __init__(self, rule: CounterRule, site: Site) -> None:
        super().__init__(rule, site)
        # previous counter value and time; power (mW) summed since it, and how many;
        # time of the last anomaly (the alert's expiry is counted from it)
        self.state = DeviceState({
            "c": (np.float64, np.nan), "t": (np.float64, np.nan), "psum": (np.int64, 0),
            "pn": (np.int64, 0), "anomaly": (np.float64, np.nan)})

    def process(self, batch: Batch) -> list[Emitted]:
        rule = self.rule
        out: list[Emitted] = []
        sel = batch.select(rule.match, self.matched, None)
        if len(sel):
            out = self._readings(sel)
        return out + self._expire(batch.wm_end)

    def _readings(self, sel: Selection) -> list[Emitted]:
        rule, st = self.rule, self.state
        sp = spans(sel, rule.metric, rule.power_metric)
        c, ts = sel.values(rule.metric), sel.ts
        k = sp.k
        dk = sel.dev[k]
        c_prev, t_prev = sp.c_prev.copy(), sp.t_prev.copy()
        psum, pn = sp.span_sum.copy(), sp.span_n.copy()
        carry = sp.carried  # counter points whose predecessor is in an earlier call
        cd = dk[carry]
        c_prev[carry], t_prev[carry] = st["c"][cd], st["t"][cd]
        psum[carry] += st["psum"][cd]
        pn[carry] += st["pn"][cd]
        ck = sp.c
        raw = ck - c_prev
        down = raw < -rule.regression_tolerance
        top = rule.counter_max
        rollover = down & (c_prev >= top * (1 - rule.rollover_margin)) & (
            ck <= top * rule.rollover_margin)
        regression = down & ~rollover
        delta = np.where(rollover, top - c_prev + ck, raw)
        mean_w = psum / np.maximum(pn, 1) / 1000.0
        explained = rule.jump_factor * mean_w * (ts[k] - t_prev) / 3600.0
        if rule.max_power is not None:  # the most the device can draw across the gap
            explained = np.maximum(explained, rule.max_power * (ts[k] - t_prev) / 3600.0)
        explained = explained + rule.jump_margin
        jump = ~regression & (pn > 0) & (delta > explained)
        anomaly = np.flatnonzero(regression | jump)  # NaN previous value: never an anomaly
        # carry each device's last counter reading and the power since it
        heads = sel.heads
        mine = sp.tail_at >= 0
        known = mine | ~np.isnan(st["c"][heads])
        tail = np.maximum(sp.tail_at, 0)
        st["psum"][heads] = np.where(mine, sp.tail_sum,
                                     np.where(known, st["psum"][heads] + sp.tail_sum, 0))
        st["pn"][heads] = np.where(mine, sp.tail_n,
                                   np.where(known, st["pn"][heads] + sp.tail_n, 0))
        st["c"][heads] = np.where(mine, c[tail], st["c"][heads])
        st["t"][heads] = np.where(mine, ts[tail], st["t"][heads])
        out: list[Emitted] = []
        for a in anomaly.tolist():
            i = int(k[a])
            which = "regression" if regression[a] else "jump"
            self._anomaly(int(dk[a]), float(ts[i]), float(sel.wm[i]), float(delta[a]), out,
                          {"anomaly": which, "previous": float(c_prev[a]),
                           "explained": float(explained[a]) if which == "jump" else None})
        return out

    def _anomaly(self, d: int, t: float, wm: float, delta: float, out: list[Emitted],
                 detail: dict[str, object]) -> None:
        firing, started = self.life["firing"], self.life["started"]
        last = self.state["anomaly"]
        deadline = last[d] + self.rule.clear_after_s
        if firing[d] and wm > deadline:
            out.append(Emitted(float(deadline), d, "resolved", None, float(started[d])))
            firing[d] = False
        if not firing[d]:
            firing[d] = True
            started[d] = t
            out.append(Emitted(t, d, "firing", delta, t, detail))
        last[d] = t

    def _expire(self, wm_end: float) -> list[Emitted]:
        firing, started = self.life["firing"], self.life["started"]
        if not firing.any():
            return []
        deadline = self.state["anomaly"] + self.rule.clear_after_s
        due = np.flatnonzero(firing & (wm_end > deadline))
        firing[due] = False
        return [Emitted(float(deadline[d]), d, "resolved", None, float(started[d]))
                for d in due.tolist()]
