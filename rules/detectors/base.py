"""What every detector shares: the site's device table, and the detector interface.

A detector owns one rule's state. The engine numbers devices once (in `Site`) and every
detector's per-device arrays use that number, so growing the table or snapshotting it is
one operation for all rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from rules.batch import Batch
from rules.calendar import LocalClock, OpenHours
from rules.lifecycle import Array, DeviceState, Emitted, lifecycle_state
from rules.model import DeviceInfo, Match, Rule, SiteContext

Bools = npt.NDArray[np.bool_]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Meta = dict[str, Any]


class Site:
    """The device table (registry devices first, then devices learned from readings)."""

    def __init__(self, context: SiteContext) -> None:
        self.context = context
        self.clock = LocalClock(context.timezone)
        self.infos: list[DeviceInfo] = []
        self.registered: list[bool] = []
        self.since: list[float] = []  # watermark when the device became known (NaN: none)
        self.index: dict[str, int] = {}
        self._calendar_number: dict[str | None, int] = {}
        self.calendars: list[OpenHours] = []
        self.calendar_of: list[int] = []  # per device: index into `calendars`
        self._masks: dict[Match, Bools] = {}

    def __len__(self) -> int:
        return len(self.infos)

    def add(self, info: DeviceInfo, registered: bool, since: float) -> int:
        number = self.index.get(info.device_id)
        if number is None:
            number = self.index[info.device_id] = len(self.infos)
            self.infos.append(info)
            self.registered.append(registered)
            self.since.append(since)
            calendar = self._calendar_number.get(info.building)
            if calendar is None:
                calendar = self._calendar_number[info.building] = len(self.calendars)
                self.calendars.append(OpenHours(self.context.calendar_for(info.building)))
            self.calendar_of.append(calendar)
        return number

    def open_at(self, dev: I64, ts: F64) -> Bools:
        """Whether each device's building is open at each time (its calendar, local time).

        Opening hours have minute resolution and the zone's offsets are whole minutes, so
        one table of (calendar x UTC minute) over the batch's span answers every reading
        with a single lookup; odd offsets (historic zones) take the per-reading way.
        """
        calendar = np.array(self.calendar_of, dtype=np.int64)[dev]
        minute = np.floor(ts / 60.0).astype(np.int64)
        if len(ts):
            low, high = int(minute.min()), int(minute.max())
            if high - low < 1_000_000:
                grid = (low + np.arange(high - low + 1)).astype(np.float64) * 60.0
                if not (self.clock.offsets(grid) % 60).any():
                    days, minutes = self.clock.local(grid)
                    table = np.stack([h.is_open(days, minutes) for h in self.calendars])
                    found: Bools = table[calendar, minute - low]
                    return found
        days, minutes = self.clock.local(ts)
        result = np.empty(len(ts), dtype=np.bool_)
        for number, hours in enumerate(self.calendars):
            hit = calendar == number
            if hit.any():
                result[hit] = hours.is_open(days[hit], minutes[hit])
        return result

    def mask(self, match: Match) -> Bools:
        """`match.matches` of every device, computed once per distinct match and device."""
        mask = self._masks.get(match)
        if mask is None or len(mask) < len(self.infos):
            done = 0 if mask is None else len(mask)
            grown = np.zeros(len(self.infos), dtype=np.bool_)
            if mask is not None:
                grown[:done] = mask
            for number in range(done, len(self.infos)):
                grown[number] = match.matches(self.infos[number])
            mask = self._masks[match] = grown
        return mask


class Detector:
    """One rule's evaluator. Subclasses override `process` (and `tick` for deadman rules)."""

    rule: Rule

    def __init__(self, rule: Rule, site: Site) -> None:
        self.rule = rule
        self.site = site
        self.life = lifecycle_state()
        self.state = DeviceState({})

    @property
    def matched(self) -> Bools:
        return self.site.mask(self.rule.match)

    def resize(self, size: int) -> None:
        self.life.resize(size)
        self.state.resize(size)

    def process(self, batch: Batch) -> list[Emitted]:
        raise NotImplementedError

    def tick(self, now: float) -> list[Emitted]:
        return []

    def dump(self) -> tuple[dict[str, Array], Meta]:
        """State as arrays plus JSON-able extras; `load` must rebuild it exactly."""
        n = len(self.site)
        return {**self.life.dump("life.", n), **self.state.dump("state.", n)}, {}

    def load(self, arrays: Mapping[str, Array], meta: Meta) -> None:
        self.life.load("life.", arrays)
        self.state.load("state.", arrays)
