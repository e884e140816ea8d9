"""Online/offline bookkeeping and poll scheduling for one unit, as pure functions.

A unit is offline after `offline_after` poll cycles in a row failed (each cycle already had
its retries). Offline units are not polled at their interval but probed with one attempt at
a doubling delay, so a dead unit costs the line little, and a unit that comes back is seen
within `probe_max_s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

HealthState = Literal["unknown", "online", "offline"]


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    offline_after: int = 3
    probe_min_s: float = 1.0
    probe_max_s: float = 60.0


class DeviceHealth(NamedTuple):
    """What the API's device list and /metrics report about one Modbus unit.

    A NamedTuple rather than a frozen dataclass: a new one is made on every poll of every
    unit, and a tuple is several times cheaper to build.
    """

    device_id: str
    state: HealthState = "unknown"
    last_seen: float | None = None  # wall clock of the last answer
    since: float | None = None  # wall clock of the last state change
    polls: int = 0
    failures: int = 0  # failed poll cycles since start
    consecutive_failures: int = 0
    rejected_values: int = 0  # implausible values dropped (garbage, out of min/max)
    last_error: str | None = None

    @property
    def online(self) -> bool:
        return self.state == "online"


def record_success(health: DeviceHealth, now: float) -> DeviceHealth:
    """The unit answered (possibly with an exception code: it is alive)."""
    changed = health.state != "online"
    return DeviceHealth(
        health.device_id,
        "online",
        now,
        now if changed else health.since,
        health.polls + 1,
        health.failures,
        0,
        health.rejected_values,
        health.last_error,
    )


def record_failure(
    health: DeviceHealth, now: float, error: str, policy: HealthPolicy
) -> DeviceHealth:
    """A poll cycle got no usable answer after its retries."""
    consecutive = health.consecutive_failures + 1
    state: HealthState = "offline" if consecutive >= policy.offline_after else health.state
    return health._replace(
        state=state,
        since=now if state != health.state else health.since,
        polls=health.polls + 1,
        failures=health.failures + 1,
        consecutive_failures=consecutive,
        last_error=error,
    )


def record_rejected(health: DeviceHealth, count: int, error: str | None = None) -> DeviceHealth:
    if count == 0:
        return health
    return health._replace(
        rejected_values=health.rejected_values + count,
        last_error=error if error is not None else health.last_error,
    )


def probe_delay(health: DeviceHealth, interval_s: float, policy: HealthPolicy) -> float:
    """Doubling delay between probes of an offline unit."""
    extra = max(0, health.consecutive_failures - policy.offline_after)
    base = max(interval_s, policy.probe_min_s)
    return float(min(policy.probe_max_s, base * 2 ** min(extra, 32)))


def next_poll_at(
    health: DeviceHealth,
    *,
    scheduled: float,
    now: float,
    interval_s: float,
    policy: HealthPolicy,
) -> float:
    """When to start the next cycle (monotonic clock).

    Online units keep a fixed-rate grid anchored at their first slot, so their readings do
    not drift; a cycle that overran skips the slots it missed instead of bunching up.
    """
    if health.state == "offline":
        return now + probe_delay(health, interval_s, policy)
    if interval_s <= 0:
        return now
    slot = scheduled + interval_s
    if slot < now:
        slot += math.ceil((now - slot) / interval_s) * interval_s
    return slot
