"""Device events (door forced, tamper...) as alerts.

An event of a type in `events` fires the device's alert (or, while it fires, pushes its
expiry back); one in `clear_events` resolves it at the event's time; otherwise it
resolves `clear_after_s` after the last firing event, once the watermark passes that point.
A type listed in both counts as firing. `for_s` does not apply (an event is an instant).
"""

from __future__ import annotations

import numpy as np

from rules.batch import Batch
from rules.detectors.base import Detector, Site
from rules.lifecycle import DeviceState, Emitted
from rules.model import EventRule


class EventDetector(Detector):
    rule: EventRule

    def __init__(self, rule: EventRule, site: Site) -> None:
        super().__init__(rule, site)
        self.state = DeviceState({"last": (np.float64, np.nan)})

    def process(self, batch: Batch) -> list[Emitted]:
        rule = self.rule
        firing, started = self.life["firing"], self.life["started"]
        last = self.state["last"]
        out: list[Emitted] = []
        matched = self.matched
        for event, d, wm in zip(batch.events, batch.event_dev, batch.event_wm, strict=True):
            fires = event.type in rule.events
            if not matched[d] or not (fires or event.type in rule.clear_events):
                continue
            deadline = float(last[d]) + rule.clear_after_s
            if firing[d] and wm > deadline:
                out.append(Emitted(deadline, d, "resolved", None, float(started[d])))
                firing[d] = False
            if fires:
                if not firing[d]:
                    firing[d] = True
                    started[d] = float(event.ts)
                    out.append(Emitted(float(event.ts), d, "firing", None, float(event.ts),
                                       {"event": event.type}))
                last[d] = float(event.ts)
            elif firing[d]:
                out.append(Emitted(float(event.ts), d, "resolved", None, float(started[d]),
                                   {"event": event.type}))
                firing[d] = False
        if firing.any():
            deadline_all = last + rule.clear_after_s
            due = np.flatnonzero(firing & (batch.wm_end > deadline_all))
            firing[due] = False
            out.extend(Emitted(float(deadline_all[d]), d, "resolved", None, float(started[d]))
                       for d in due.tolist())
        return out
