"""When the telemetry worker hands over to a fresh process, to give memory back.

Draining a big backlog (a flood, an InfluxDB outage) leaves the worker 13-20 MB larger than
before it, with about 2 MB of it live objects (docs/decisions.md): CPython keeps an arena
while any object in it lives, and SQLite keeps its caches. `malloc_trim`, fewer malloc
arenas and smaller batches each gave back less than 3 MB. Long-lived Python services solve
this with a fresh process (uWSGI's reload-on-rss, Celery's worker_max_memory_per_child),
and here a hand-over loses nothing by construction: the orderly stop fsyncs the spool, the
next worker reads it from where the sinks left off, and the persistent MQTT session holds
the readings that arrive in the second between the two.

Only a backlog triggers it. A site whose steady working set is larger than ours (more
devices, more rules) grows without a backlog and never churns; and the worker waits until
every sink has caught up, so a hand-over never lands in the middle of a drain.

A pure policy over what the worker's health tick already measures; the worker does the
stopping and the gateway (gateway.app.telemetry_process) starts the next one at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace

# "Start me again", not a failure (sysexits' EX_TEMPFAIL): the gateway does not count it as
# a crash and starts the next worker without a backoff.
RECYCLE_EXIT = 75

# A backlog of 10 s at the 2,000 readings/s marks the start of an episode; the
# sinks have caught up again below 2.5 s (the rules consumer lingers up to 1 s by design).
BACKLOG_RECORDS = 20_000
CAUGHT_UP_RECORDS = 5_000


@dataclass(frozen=True, slots=True)
class MemoryWatch:
    """RSS before the current backlog, and the largest backlog since."""

    quiet_rss_mb: float
    peak_backlog: int = 0

    @property
    def in_backlog(self) -> bool:
        return self.peak_backlog >= BACKLOG_RECORDS


def observe(watch: MemoryWatch, rss_mb: float, depths: Iterable[int], growth_mb: float
            ) -> tuple[MemoryWatch, bool]:
    """The next watch, and whether to hand over now (`growth_mb` <= 0: never).

    `depths`: each sink's spooled records not yet written. The RSS to compare with is the
    last one taken while the sinks were caught up, before the backlog began.
    """
    backlog = max(depths, default=0)
    if backlog > CAUGHT_UP_RECORDS:
        return replace(watch, peak_backlog=max(watch.peak_backlog, backlog)), False
    hand_over = watch.in_backlog and 0 < growth_mb <= rss_mb - watch.quiet_rss_mb
    return MemoryWatch(rss_mb), hand_over


def rss_mb() -> float:
    """This process's resident set, from /proc (0.0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
