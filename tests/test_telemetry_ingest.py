"""Telemetry ingest (gateway/telemetry/ingest.py): every refusal reason, seq handling, and
properties: it never raises, and an accepted reading is exactly what its spool record decodes to.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers.vocabulary import PLAUSIBLE_RANGES, Reading
from gateway.telemetry.ingest import MAX_METRICS, REASONS, Ingest, device_from_topic
from gateway.telemetry.records import decode_record, encode_reading

NOW = 1_763_800_000.0
KINDS = {"m-1": "meter", "ahu-1": "hvac"}


class Reports:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, device_id: str, reason: str, detail: str) -> None:
        self.calls.append((device_id, reason, detail))


def ingest() -> tuple[Ingest, Reports]:
    reports = Reports()
    return Ingest(KINDS, report=reports), reports


def msg(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def one(ts: float | None = NOW, seq: int | None = None, **metrics: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"metrics": metrics or {"power_w": 1.0}}
    if ts is not None:
        out["ts"] = ts
    if seq is not None:
        out["seq"] = seq
    return out


# ---- accepted ------------------------------------------------------------------------------


def test_single_reading_takes_its_kind_from_the_registry() -> None:
    ing, reports = ingest()
    readings = ing.message("ahu-1", msg({"ts": NOW + 0.25, "seq": 42,
                                         "metrics": {"power_w": 1234.5, "running": True}}), NOW)
    assert readings == [Reading("ahu-1", "hvac", NOW + 0.25, {"power_w": 1234.5, "running": 1.0},
                                42)]
    assert (ing.accepted, ing.messages, dict(ing.refused), reports.calls) == (1, 1, {}, [])


def test_batch_and_missing_ts_and_seq() -> None:
    ing, _ = ingest()
    batch = {"readings": [one(ts=NOW - 10, seq=1), one(ts=None, seq=2), one(ts=NOW)]}
    readings = ing.message("m-1", msg(batch), NOW + 0.0004)
    assert [(r.ts, r.seq) for r in readings] == [(NOW - 10, 1), (NOW, 2), (NOW, None)]
    assert ing.accepted == 3


def test_timestamps_are_rounded_to_the_millisecond() -> None:
    ing, _ = ingest()
    (reading,) = ing.message("m-1", msg(one(ts=NOW + 0.12349)), NOW)
    assert reading.ts == round((NOW + 0.12349) * 1000) / 1000


def test_good_values_survive_a_bad_one() -> None:
    ing, _ = ingest()
    payload = b'{"ts": %f, "metrics": {"power_w": 5, "temperature_c": NaN, "mode": "eco"}}' % NOW
    (reading,) = ing.message("ahu-1", payload, NOW)
    assert reading.metrics == {"power_w": 5.0}
    assert dict(ing.refused) == {"not_finite": 1, "wrong_type": 1}


# ---- refused, by reason ---------------------------------------------------------------------

BAD: list[tuple[str, str, bytes]] = [
    ("unknown_device", "nobody", msg(one())),
    ("oversize", "m-1", b'{"ts": 1, "metrics": {"power_w": 1}, "pad": "' + b"x" * 70_000 + b'"}'),
    ("oversize", "m-1", b"{" * (1 << 20)),  # 1 MB
    ("malformed", "m-1", b"not json"),
    ("malformed", "m-1", b"\xff\xfe{}"),
    ("malformed", "m-1", b"[1, 2]"),
    ("malformed", "m-1", b'"a string"'),
    ("malformed", "m-1", b""),
    ("malformed", "m-1", b'{"metrics": {"power_w": 1}} trailing'),
    ("malformed", "m-1", msg({"readings": {"not": "a list"}})),
    ("malformed", "m-1", msg({"readings": [17]})),
    ("malformed", "m-1", msg({"ts": NOW, "seq": 1})),
    ("malformed", "m-1", msg({"ts": NOW, "metrics": [1, 2]})),
    ("malformed", "m-1", b"[" * 30_000 + b"]" * 30_000),  # nesting: RecursionError
    ("too_many_metrics", "m-1", msg({"metrics": {f"m{i}": i for i in range(MAX_METRICS + 1)}})),
    ("bad_timestamp", "m-1", msg(one(ts=4_102_444_800.0))),  # 2100
    ("bad_timestamp", "m-1", msg(one(ts=NOW + 86_401))),
    ("bad_timestamp", "m-1", msg(one(ts=946_684_799))),  # 1999
    ("bad_timestamp", "m-1", b'{"ts": NaN, "metrics": {"power_w": 1}}'),
    ("bad_timestamp", "m-1", b'{"ts": Infinity, "metrics": {"power_w": 1}}'),
    ("bad_seq", "m-1", msg(one(seq=-1))),
    ("bad_seq", "m-1", msg(one(seq=2**63))),
    ("wrong_type", "m-1", msg({"ts": "2025-01-01", "metrics": {"power_w": 1}})),
    ("wrong_type", "m-1", msg({"ts": True, "metrics": {"power_w": 1}})),
    ("wrong_type", "m-1", msg({"seq": "7", "metrics": {"power_w": 1}})),
    ("wrong_type", "m-1", msg({"seq": 7.0, "metrics": {"power_w": 1}})),
    ("wrong_type", "m-1", msg({"seq": True, "metrics": {"power_w": 1}})),
    ("wrong_type", "m-1", msg({"metrics": {"power_w": "1234"}})),
    ("wrong_type", "m-1", msg({"metrics": {"power_w": None}})),
    ("wrong_type", "m-1", msg({"metrics": {"power_w": [1]}})),
    ("wrong_type", "m-1", msg({"metrics": {"power_w": {"v": 1}}})),
    ("not_finite", "m-1", b'{"metrics": {"power_w": NaN}}'),
    ("not_finite", "m-1", b'{"metrics": {"power_w": Infinity}}'),
    ("not_finite", "m-1", b'{"metrics": {"power_w": -Infinity}}'),
    ("not_finite", "m-1", b'{"metrics": {"power_w": 1e400}}'),
    ("not_finite", "m-1", b'{"metrics": {"power_w": 1' + b"0" * 400 + b"}}"),
    ("bad_metric_name", "m-1", msg({"metrics": {"Power_W": 1}})),
    ("bad_metric_name", "m-1", msg({"metrics": {"1power": 1}})),
    ("bad_metric_name", "m-1", msg({"metrics": {"power-w": 1}})),
    ("bad_metric_name", "m-1", msg({"metrics": {"p" * 65: 1}})),
    ("bad_metric_name", "m-1", msg({"metrics": {"": 1}})),
    ("bad_metric_name", "m-1", msg({"metrics": {"seq": 1}})),
    ("bad_metric_name", "m-1", msg({"metrics": {"time": 1}})),
    ("no_metrics", "m-1", msg({"ts": NOW, "metrics": {}})),
    ("bad_timestamp", "m-1", msg(one(ts=NOW + 301))),  # more than 5 minutes ahead
    ("implausible", "m-1", msg({"metrics": {"power_w": 1e12}})),
    ("implausible", "m-1", msg({"metrics": {"energy_wh": -5.0}})),
    ("implausible", "m-1", msg({"metrics": {"humidity_pct": 140}})),
    ("implausible", "m-1", msg({"metrics": {"running": 2}})),
]


@pytest.mark.parametrize(("reason", "device", "payload"), BAD,
                         ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_each_refusal_is_counted_by_reason_and_the_next_reading_arrives(
        reason: str, device: str, payload: bytes) -> None:
    ing, reports = ingest()
    assert ing.message(device, payload, NOW) == []
    assert dict(ing.refused) == {reason: 1}
    assert reports.calls[0][:2] == (device, reason) and len(reports.calls) == 1
    assert ing.message("m-1", msg(one(seq=1)), NOW) != []


def test_every_reason_is_covered() -> None:
    assert {reason for reason, _, _ in BAD} == set(REASONS)


def test_plausible_edges_and_custom_metrics_pass() -> None:
    ing, _ = ingest()
    readings = ing.message("m-1", msg(one(ts=NOW + 299, seq=1, power_w=-10e6, energy_wh=0.0,
                                          humidity_pct=100, my_counter=1e30)), NOW)
    assert readings and readings[0].metrics == {"power_w": -10e6, "energy_wh": 0.0,
                                                "humidity_pct": 100.0, "my_counter": 1e30}


def test_device_events_are_parsed_and_refused_like_readings() -> None:
    ing, _ = ingest()
    event = ing.event("m-1", msg({"type": "tamper", "ts": NOW - 1.0004}), NOW)
    assert event is not None and (event.type, event.ts, event.kind) == ("tamper", NOW - 1.0,
                                                                       "meter")
    assert ing.event("nobody", msg({"type": "tamper"}), NOW) is None
    assert ing.event("m-1", msg({"type": ""}), NOW) is None
    assert ing.event("m-1", msg({"type": "x" * 65}), NOW) is None
    assert ing.event("m-1", msg({"type": "tamper", "ts": NOW + 3600}), NOW) is None
    assert ing.event("m-1", b"not json", NOW) is None
    assert dict(ing.refused) == {"unknown_device": 1, "malformed": 3, "bad_timestamp": 1}


def test_ten_thousand_metrics_are_refused_without_parsing_each() -> None:
    ing, _ = ingest()
    many = msg({"metrics": {f"m{i}": i for i in range(10_000)}})
    assert ing.message("m-1", many, NOW) == []
    assert set(ing.refused) <= {"oversize", "too_many_metrics"}


def test_logged_once_per_device_and_reason_in_bounded_memory() -> None:
    ing, reports = ingest()
    for _ in range(3):
        ing.message("m-1", b"junk", NOW)
        ing.message("ahu-1", b"junk", NOW)
        ing.message("m-1", msg({"metrics": {"x": "y"}}), NOW)
    assert [(d, r) for d, r, _ in reports.calls] == [
        ("m-1", "malformed"), ("ahu-1", "malformed"), ("m-1", "wrong_type")]
    assert ing.refused == {"malformed": 6, "wrong_type": 3}
    for i in range(10_000):  # unknown ids are unbounded; what is remembered is not
        ing.message(f"ghost-{i}", b"{}", NOW)
    assert len(reports.calls) <= 4096 and ing.refused["unknown_device"] == 10_000


# ---- seq ------------------------------------------------------------------------------------


def seqs(ing: Ingest, *values: int, ts: float = NOW) -> list[int | None]:
    out = []
    for i, seq in enumerate(values):
        out += [r.seq for r in ing.message("m-1", msg(one(ts=ts + i, seq=seq)), NOW + 100)]
    return out


def test_duplicates_dropped_and_gaps_counted() -> None:
    ing, _ = ingest()
    assert seqs(ing, 5, 6, 6, 7, 5, 11, 12, 9) == [5, 6, 7, 11, 12]
    assert (ing.duplicates, ing.gaps, ing.missing, ing.seq_resets) == (3, 1, 3, 0)


def test_redelivery_in_a_batch_is_a_duplicate() -> None:
    ing, _ = ingest()
    batch = msg({"readings": [one(ts=NOW + i, seq=i) for i in range(1, 6)]})
    assert len(ing.message("m-1", batch, NOW + 10)) == 5
    assert ing.message("m-1", batch, NOW + 10) == []
    assert ing.duplicates == 5


def test_a_restarted_device_is_recognised() -> None:
    ing, _ = ingest()
    assert seqs(ing, 5000, 5001, 3, 4) == [5000, 5001, 3, 4]  # far behind: a reset
    assert ing.seq_resets == 1
    ing2, _ = ingest()
    assert seqs(ing2, 0, 1, 2, 3, 0, 1) == [0, 1, 2, 3, 0, 1]  # back to 0, newer timestamp
    assert (ing2.seq_resets, ing2.duplicates) == (1, 0)


def test_an_old_reading_redelivered_is_not_a_restart() -> None:
    ing, _ = ingest()
    first = msg(one(ts=NOW, seq=1))
    ing.message("m-1", first, NOW)
    ing.message("m-1", msg(one(ts=NOW + 1, seq=2)), NOW)
    assert ing.message("m-1", first, NOW + 5) == []
    assert (ing.duplicates, ing.seq_resets) == (1, 0)


def test_seeded_seq_makes_a_redelivery_a_duplicate() -> None:
    ing, _ = ingest()
    ing.seed("m-1", 10, NOW + 10)
    ing.seed("ghost", 1, NOW)  # unregistered: ignored
    assert seqs(ing, 9, 10, 11) == [11]
    assert ing.duplicates == 2


def test_readings_without_seq_are_never_deduplicated() -> None:
    ing, _ = ingest()
    payload = msg(one())
    assert len(ing.message("m-1", payload, NOW)) == len(ing.message("m-1", payload, NOW)) == 1


@given(st.lists(st.integers(0, 3000), max_size=60))
def test_seq_bookkeeping_adds_up(values: list[int]) -> None:
    ing, _ = ingest()
    accepted = seqs(ing, *values)
    assert len(accepted) + ing.duplicates == len(values)
    run = [s for s in accepted if s is not None]
    if ing.seq_resets == 0:
        assert run == sorted(set(run))  # strictly increasing


# ---- properties -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"metrics": json_values, "ts": json_values,
                                        "seq": json_values}).map(lambda v: msg(v)),
                 st.fixed_dictionaries({"readings": json_values}).map(lambda v: msg(v))))
def test_never_raises_and_counts_every_message(payload: bytes) -> None:
    ing, _ = ingest()
    readings = ing.message("m-1", payload, NOW)
    assert ing.messages == 1
    for reading in readings:
        assert all(math.isfinite(v) for v in reading.metrics.values())


names = st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True).filter(
    lambda n: n not in ("seq", "time") and n not in PLAUSIBLE_RANGES)  # any value is plausible


@settings(max_examples=300)
@given(st.dictionaries(names, st.floats(allow_nan=False, allow_infinity=False)
                       | st.integers(-2**60, 2**60), min_size=1, max_size=8),
       st.floats(946_684_800, NOW + 300), st.integers(0, 2**63 - 1) | st.none())
def test_an_accepted_reading_is_what_its_spool_record_decodes_to(
        metrics: dict[str, float], ts: float, seq: int | None) -> None:
    """The local store may take a reading from memory or decode it: same minute, same values."""
    ing, _ = ingest()
    (reading,) = ing.message("ahu-1", msg({"ts": ts, "seq": seq, "metrics": metrics}), NOW)
    record = encode_reading(reading, "maple-court")
    assert record is not None
    assert decode_record(record) == reading


def test_device_from_topic() -> None:
    device = device_from_topic("scgw/site")
    assert device("scgw/site/devices/m-1/telemetry") == "m-1"
    assert device("scgw/site/devices//telemetry") is None
    assert device("scgw/site/devices/m-1/status") is None
    assert device("other/devices/m-1/telemetry") is None
