"""Online/offline transitions and poll scheduling (pure)."""

from __future__ import annotations

from device_drivers.modbus.health import (
    DeviceHealth,
    HealthPolicy,
    next_poll_at,
    probe_delay,
    record_failure,
    record_rejected,
    record_success,
)

POLICY = HealthPolicy(offline_after=3, probe_min_s=1.0, probe_max_s=30.0)


def test_offline_after_n_consecutive_failures_and_back() -> None:
    h = record_success(DeviceHealth("u"), now=10.0)
    assert h.online and h.last_seen == 10.0 and h.since == 10.0
    for i in range(2):
        h = record_failure(h, 11.0 + i, "timeout", POLICY)
        assert h.online  # one or two lost polls do not flap the state
    h = record_failure(h, 13.0, "timeout", POLICY)
    assert (h.state, h.since, h.consecutive_failures, h.failures) == ("offline", 13.0, 3, 3)
    h = record_success(h, 20.0)
    assert (h.state, h.since, h.consecutive_failures, h.failures) == ("online", 20.0, 0, 3)
    assert h.last_error == "timeout" and h.polls == 5


def test_a_success_resets_the_count() -> None:
    h = DeviceHealth("u")
    for _ in range(2):
        h = record_failure(h, 1.0, "x", POLICY)
    h = record_success(h, 2.0)
    for _ in range(2):
        h = record_failure(h, 3.0, "x", POLICY)
    assert h.online


def test_probes_back_off_to_a_ceiling() -> None:
    h = DeviceHealth("u")
    delays = []
    for _ in range(10):
        h = record_failure(h, 0.0, "x", POLICY)
        if h.state == "offline":
            delays.append(probe_delay(h, 0.5, POLICY))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert next_poll_at(h, scheduled=0.0, now=100.0, interval_s=0.5, policy=POLICY) == 130.0


def test_online_schedule_is_a_fixed_grid_that_skips_missed_slots() -> None:
    h = record_success(DeviceHealth("u"), 0.0)
    assert next_poll_at(h, scheduled=10.0, now=10.2, interval_s=1.0, policy=POLICY) == 11.0
    # a 3.5 s cycle does not produce a burst of catch-up polls
    assert next_poll_at(h, scheduled=10.0, now=13.5, interval_s=1.0, policy=POLICY) == 14.0
    assert next_poll_at(h, scheduled=10.0, now=10.2, interval_s=0.0, policy=POLICY) == 10.2


def test_rejected_values_are_counted() -> None:
    h = record_rejected(DeviceHealth("u"), 2, "implausible: a, b")
    assert (h.rejected_values, h.last_error) == (2, "implausible: a, b")
    assert record_rejected(h, 0) is h
