"""Local wall time of many timestamps at once, and building opening hours as bitmaps.

Schedule and baseline rules think in the site's local time (people switch things on at
08:00 local, summer or winter). Asking `zoneinfo` per reading would cost microseconds
each, so offsets are looked up per UTC day (a day has one offset unless a transition falls
in it; those few days are resolved per quarter hour, the granularity of every modern
zone's transitions) and cached; the per-reading work is numpy arithmetic.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import numpy as np
import numpy.typing as npt

from rules.model import Calendar

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

DAY = 86_400
QUARTER = 900
EPOCH = dt.date(1970, 1, 1)
_EPOCH_WEEKDAY = EPOCH.weekday()  # Thursday: day 0 of the epoch


class LocalClock:
    """UTC offsets of a time zone, cached per UTC day."""

    def __init__(self, timezone: str) -> None:
        try:
            self.zone = zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {timezone!r}") from exc
        self._days: dict[int, int | tuple[int, ...]] = {}

    def _offset(self, ts: float) -> int:
        offset = dt.datetime.fromtimestamp(ts, self.zone).utcoffset()
        return 0 if offset is None else int(offset.total_seconds())

    def _day(self, day: int) -> int | tuple[int, ...]:
        cached = self._days.get(day)
        if cached is None:
            start = self._offset(day * DAY)
            if start == self._offset(day * DAY + DAY - 1):
                cached = start
            else:
                cached = tuple(self._offset(day * DAY + q * QUARTER) for q in range(DAY // QUARTER))
            self._days[day] = cached
        return cached

    def offsets(self, ts: F64) -> F64:
        """UTC offset in seconds at each timestamp."""
        if len(ts) == 0:
            return np.zeros(0)
        days = np.floor(ts / DAY).astype(np.int64)
        first, last = int(days.min()), int(days.max())
        if last - first <= 4096:
            span = np.arange(first, last + 1)
        else:  # sparse timestamps over many years: only the days that occur
            span = np.unique(days)
        per_day = [self._day(int(d)) for d in span]
        constant = np.array([o if isinstance(o, int) else 0 for o in per_day], dtype=np.float64)
        where = days - first if len(span) == last - first + 1 else np.searchsorted(span, days)
        result = constant[where]
        for k, entry in enumerate(per_day):
            if isinstance(entry, tuple):
                hit = np.flatnonzero(where == k)
                quarters = ((ts[hit] - span[k] * DAY) // QUARTER).astype(np.int64)
                result[hit] = np.array(entry, dtype=np.float64)[quarters]
        return result

    def local(self, ts: F64) -> tuple[I64, I64]:
        """(local day number since the epoch, local minute of the day) of each timestamp."""
        local = ts + self.offsets(ts)
        days = np.floor(local / DAY).astype(np.int64)
        minutes = ((local - days * DAY) // 60).astype(np.int64)
        return days, np.minimum(minutes, 1439)

    def hour_of_week(self, ts: F64) -> I64:
        """0 = Monday 00:00-01:00 local ... 167 = Sunday 23:00-24:00."""
        days, minutes = self.local(ts)
        return weekday(days) * 24 + minutes // 60


def weekday(days: I64) -> I64:
    """`date.weekday()` of epoch day numbers: 0 = Monday."""
    return (days + _EPOCH_WEEKDAY) % 7


class OpenHours:
    """One building calendar as minute bitmaps (weekly and for holidays)."""

    def __init__(self, calendar: Calendar) -> None:
        self.weekly = np.zeros(7 * 1440, dtype=np.bool_)
        for day, intervals in enumerate(calendar.weekly[:7]):
            for start, end in intervals:
                self.weekly[day * 1440 + start: day * 1440 + end] = True
        self.holiday = np.zeros(1440, dtype=np.bool_)
        for start, end in calendar.holiday_hours:
            self.holiday[start:end] = True
        days = []
        for iso in calendar.holidays:
            try:
                days.append((dt.date.fromisoformat(iso) - EPOCH).days)
            except ValueError:
                continue  # the loader reports malformed dates; the engine must not crash
        self.holidays = np.array(sorted(days), dtype=np.int64)

    def is_open(self, days: I64, minutes: I64) -> Bools:
        result: Bools = self.weekly[weekday(days) * 1440 + minutes]
        if len(self.holidays):
            holiday = np.isin(days, self.holidays)
            if holiday.any():
                result = np.where(holiday, self.holiday[minutes], result)
        return result
