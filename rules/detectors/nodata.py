"""Deadman (no data): a device silent for `timeout_s` (+ `for_s`) of event time.

A device is watched from its first reading, or, when the site registry lists it, from the
watermark at which the rule first saw the stream (or at which the device was added to the
registry): a registered unit that never reports is exactly what this rule is for.

The alert fires at `last + timeout` (its `ts` and `started_at`) as soon as anything proves
that moment passed: the device's next reading, or any item whose timestamp (the
watermark) is beyond it. It resolves at the device's next reading (stamped no earlier
than the firing: a reading that arrives late can carry an older timestamp). Both depend only on the
stream, not on how it was cut into calls. Live, `tick(now)` applies the same test to the
wall clock, so a silent site still alerts; the transitions are identical to what event
time would produce later, so nothing fires twice.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from rules.batch import Batch
from rules.detectors.base import Detector, Site
from rules.lifecycle import DeviceState, Emitted
from rules.model import NoDataRule

F64 = npt.NDArray[np.float64]


class NoDataDetector(Detector):
    rule: NoDataRule

    def __init__(self, rule: NoDataRule, site: Site) -> None:
        super().__init__(rule, site)
        self.state = DeviceState({"last": (np.float64, np.nan)})
        self.timeout = rule.timeout_s + rule.for_s

    def _watch_registered(self, origin: float) -> None:
        """Start the clock of registered devices that have not reported yet."""
        if np.isnan(origin):
            return
        last = self.state["last"]
        n = len(self.site)
        fresh = self.matched & np.isnan(last[:n]) & np.array(self.site.registered, np.bool_)
        if fresh.any():
            since = np.array(self.site.since, dtype=np.float64)[fresh]
            last[:n][fresh] = np.where(np.isnan(since), origin, since)

    def process(self, batch: Batch) -> list[Emitted]:
        self._watch_registered(batch.wm_first)
        last = self.state["last"]
        firing, started = self.life["firing"], self.life["started"]
        out: list[Emitted] = []
        sel = batch.select(self.rule.match, self.matched, self.rule.metric)
        if len(sel):
            deadline = sel.prev_with(None, last) + self.timeout
            gap = sel.wm > deadline
            heads = sel.heads
            was_firing = sel.starts[firing[heads]]
            gap[was_firing] = False
            hits = np.flatnonzero(gap)
            if len(was_firing):
                hits = np.union1d(hits, was_firing)
            dev, ts = sel.dev, sel.ts
            for i in hits.tolist():
                d = int(dev[i])
                if gap[i]:
                    began = float(deadline[i])
                    out.append(Emitted(began, d, "firing", None, began))
                else:
                    began = float(started[d])
                # a reading delayed past the watermark can predate the deadline it broke
                out.append(Emitted(max(float(ts[i]), began), d, "resolved", None, began))
            last[heads] = ts[sel.lasts]
            firing[heads] = False
        out.extend(self._expire(batch.wm_end))
        return out

    def _expire(self, now: float) -> list[Emitted]:
        n = len(self.site)
        last = self.state["last"][:n]
        firing, started = self.life["firing"][:n], self.life["started"][:n]
        deadline = last + self.timeout
        due = np.flatnonzero(self.matched & ~firing & (now > deadline))
        firing[due] = True
        started[due] = deadline[due]
        return [Emitted(float(deadline[d]), d, "firing", None, float(deadline[d]))
                for d in due.tolist()]

    def tick(self, now: float) -> list[Emitted]:
        self._watch_registered(now)
        return self._expire(now)
