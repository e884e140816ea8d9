"""`scgw rules replay`'s line handling (gateway/app/rules_replay.py `replay_stream`): the inline
fast path and the checked path give the same readings, and every bad line is reported with
its number, whichever JSON parser is installed."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from gateway.app import rules_replay
from rules.engine import Engine
from rules.model import Match, SiteContext, ThresholdRule

RULES = [ThresholdRule(id="hot", match=Match(), metric="power_w", above=100.0, clear=50.0)]
GOOD = [
    '{"device_id": "m-1", "kind": "meter", "ts": 1000, "metrics": {"power_w": 10}}',
    '  {"device_id": "m-1", "ts": 1001.5, "metrics": {"power_w": 150.5}}  ',  # known now
    '{"device_id": "h-1", "kind": "hvac", "ts": 1002, "type": "tamper"}',
    '{"device_id": "m-1", "ts": 1003, "metrics": {"power_w": 40}}',
]
BAD = [
    ('{"device_id": "m-1", "ts": 1004, "metrics": {"power_w": 1}} trailing', "not JSON"),
    ("not json at all", "not JSON"),
    ('{"device_id": "m-1", "ts": 1005, "metrics": {"power_w": NaN}}', ""),
    ('{"device_id": "m-1", "ts": 1006, "metrics": {"power_w": "5"}}', "not a finite number"),
    ('{"device_id": "x-9", "ts": 1007, "metrics": {"power_w": 5}}', "no kind for 'x-9'"),
    ('{"device_id": "m-1", "ts": "soon", "metrics": {"power_w": 5}}', "ts must be a number"),
    ('{"device_id": "m-1", "ts": 1008, "metrics": {}}', "metrics must be a non-empty"),
    ('{"device_id": ["m-1"], "ts": 1009, "metrics": {"power_w": 5}}', "device_id missing"),
    ("[1, 2]", "expected a JSON object"),
]


def parsers() -> list[Callable[[], Callable[[str], Any]]]:
    return [rules_replay.json_loads, lambda: json.loads]


@pytest.mark.parametrize("parser", parsers(), ids=["installed", "stdlib"])
def test_good_lines_replay_and_bad_ones_are_named(
        parser: Callable[[], Callable[[str], Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules_replay, "json_loads", parser)
    lines = [*GOOD[:2], "", *[text for text, _ in BAD], *GOOD[2:], "   "]
    out, err = io.StringIO(), io.StringIO()
    engine = Engine(RULES, SiteContext(timezone="UTC"))
    count, bad, emitted = rules_replay.replay_stream(
        io.StringIO("\n".join(lines) + "\n"), engine, {}, out, err)
    assert (count, bad, emitted) == (4, len(BAD), 2)
    states = [(a["state"], a["value"]) for a in map(json.loads, out.getvalue().splitlines())]
    assert states == [("firing", 150.5), ("resolved", 40.0)]
    reported = err.getvalue().splitlines()
    assert len(reported) == len(BAD)
    for number, (report, (_, fragment)) in enumerate(zip(reported, BAD, strict=True), start=4):
        assert report.startswith(f"line {number}: ") and fragment in report
        assert report.endswith("; skipped")


def test_a_batch_boundary_keeps_every_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules_replay, "BATCH", 3)
    lines = [json.dumps({"device_id": "m-1", "kind": "meter", "ts": 1000 + i,
                         "metrics": {"power_w": 200.0 if i % 4 == 1 else 10.0}})
             for i in range(10)]
    out, err = io.StringIO(), io.StringIO()
    engine = Engine(RULES, SiteContext(timezone="UTC"))
    assert rules_replay.replay_stream(io.StringIO("\n".join(lines)), engine, {}, out,
                                   err) == (10, 0, 5)  # 3 firings, 2 resolutions
