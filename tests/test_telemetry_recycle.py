"""When the telemetry worker hands over to a fresh process (gateway.telemetry.recycle).

The policy is pure: these walk it through what a worker's health ticks see; the hand-over
itself, with a real worker process and InfluxDB, is in tests/test_telemetry_gateway.py.
"""

from __future__ import annotations

from pathlib import Path

from gateway.telemetry.recycle import (
    BACKLOG_RECORDS,
    CAUGHT_UP_RECORDS,
    MemoryWatch,
    observe,
    rss_mb,
)


def _walk(ticks: list[tuple[float, list[int]]], growth_mb: float = 8.0) -> list[bool]:
    """The hand-over decision at each (RSS, sink depths) tick, from a worker started at 45 MB."""
    watch = MemoryWatch(45.0)
    decisions = []
    for rss, depths in ticks:
        watch, hand_over = observe(watch, rss, depths, growth_mb)
        decisions.append(hand_over)
    return decisions


def test_a_worker_grown_by_a_drained_backlog_hands_over_once_the_sinks_caught_up() -> None:
    flood = [(50.0, [0, 100]),  # steady: 50 MB is the level before the backlog
             (58.0, [BACKLOG_RECORDS * 10, 3_000]),
             (66.0, [BACKLOG_RECORDS, 0]),  # draining: not in the middle of it
             (66.0, [CAUGHT_UP_RECORDS + 1, 0]),
             (66.0, [CAUGHT_UP_RECORDS, 10])]  # caught up, 16 MB larger than before
    assert _walk(flood) == [False, False, False, False, True]


def test_growth_below_the_limit_or_without_a_backlog_never_hands_over() -> None:
    small = [(50.0, [0]), (60.0, [BACKLOG_RECORDS]), (57.9, [0]), (57.9, [0])]
    assert _walk(small) == [False] * 4
    # A site whose working set keeps growing (devices added) without a backlog: no churn.
    steady = [(50.0 + i, [CAUGHT_UP_RECORDS]) for i in range(40)]
    assert not any(_walk(steady))
    # A backlog that never reaches an episode's size does not count either.
    short = [(50.0, [0]), (70.0, [BACKLOG_RECORDS - 1]), (70.0, [0])]
    assert _walk(short) == [False] * 3


def test_the_comparison_is_with_the_level_before_this_backlog() -> None:
    # The first backlog grew it 6 MB (kept); the second starts from there and adds 4.
    twice = [(50.0, [0]), (56.0, [BACKLOG_RECORDS]), (56.0, [0]),
             (56.0, [0]), (60.0, [BACKLOG_RECORDS]), (60.0, [0])]
    assert _walk(twice) == [False] * 6
    assert _walk(twice, growth_mb=4.0) == [False, False, True, False, False, True]


def test_zero_turns_it_off() -> None:
    flood = [(50.0, [0]), (90.0, [BACKLOG_RECORDS]), (90.0, [0])]
    assert _walk(flood, growth_mb=0.0) == [False] * 3


def test_a_worker_that_starts_with_a_backlog_compares_with_its_size_at_start() -> None:
    # Restarted during an InfluxDB outage: never quiet before the backlog.
    assert _walk([(60.0, [BACKLOG_RECORDS]), (53.0, [0])]) == [False, True]


def test_rss_is_this_process_resident_set() -> None:
    status = Path("/proc/self/status").read_text()
    vm_rss = next(int(line.split()[1]) for line in status.splitlines()
                  if line.startswith("VmRSS:")) / 1024
    assert abs(rss_mb() - vm_rss) < 2.0
    assert rss_mb() > 10.0  # an interpreter with pytest loaded
