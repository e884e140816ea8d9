"""Spool records read back: the fast path agrees with the general parser, and the memo."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers.vocabulary import DeviceEvent, Reading
from gateway.telemetry.line_protocol import parse_line
from gateway.telemetry.records import (
    ReadingMemo,
    RecordError,
    _decoded,
    decode_record,
    encode_event,
    encode_reading,
)

HEAD = b"telemetry,device_id=m-1,kind=meter,site=s"


def general(record: bytes) -> object:
    """What the general parser alone makes of a record (an exception type when it refuses)."""
    try:
        measurement, tags, fields, ts_ms = parse_line(record.decode())
        if ts_ms is None:
            return RecordError
        return _decoded(measurement, tags, fields, ts_ms)
    except (ValueError, OverflowError):
        return RecordError


def decoded(record: bytes) -> object:
    try:
        return decode_record(record)
    except RecordError:
        return RecordError


field_text = st.lists(
    st.tuples(st.sampled_from(["power_w", "seq", "x", "", "a b"]),
              st.sampled_from(["1.5", "12i", "-3i", "+3i", "1_0i", "1.5i", "t", "nan", "1e400",
                               '"s"', "", "9" * 400 + "i", "-0.0", "7"])),
    min_size=1, max_size=4).map(lambda items: ",".join(f"{k}={v}" for k, v in items))


@settings(max_examples=500)
@given(field_text, st.sampled_from(["1764791234567", "", "x", "-5"]))
def test_the_fast_path_reads_a_record_as_the_general_parser_does(fields: str,
                                                                stamp: str) -> None:
    decode_record(HEAD + b" power_w=1.0,seq=1i 1764791234567")  # the head is now known
    record = HEAD + b" " + fields.encode() + (b" " + stamp.encode() if stamp else b"")
    assert repr(decoded(record)) == repr(general(record))  # repr: nan equals nan


def test_records_of_every_kind_decode() -> None:
    reading = Reading("m-1", "meter", 1_764_791_234.567, {"power_w": 2.5}, 7)
    record = encode_reading(reading, "s")
    assert record is not None
    assert decode_record(record) == reading == decode_record(record)  # general, then fast
    event = DeviceEvent("gate-1", "gate", 1_764_791_234.5, "door_forced")
    event_record = encode_event(event, "s")
    assert event_record is not None
    assert decode_record(event_record) == event


def test_the_memo_serves_each_record_once_and_stays_bounded() -> None:
    memo = ReadingMemo(max_items=2)
    readings = [Reading("m-1", "meter", 1_764_791_234.0 + i, {"power_w": float(i)}, i)
                for i in range(3)]
    records = [encode_reading(r, "s") for r in readings]
    assert all(records)
    for record, reading in zip(records, readings, strict=True):
        assert record is not None
        memo.put(record, reading)
    assert len(memo) == 2  # the third was not kept, and is decoded instead
    items, bad = memo.decode([r for r in records if r is not None] + [b"nonsense"])
    assert items == readings and len(bad) == 1
    assert len(memo) == 0


def test_a_caught_up_consumer_clears_a_memo_of_records_it_will_never_read() -> None:
    memo = ReadingMemo(max_items=4)
    for i in range(3):  # e.g. records a full spool dropped before the consumer read them
        memo.put(b"record-%d" % i, Reading("m-1", "meter", 1.0, {"power_w": 1.0}, i))
    memo.caught_up()
    assert len(memo) == 0
    memo.put(b"just-appended", Reading("m-1", "meter", 1.0, {"power_w": 1.0}, 9))
    memo.caught_up()  # the append or two in flight are kept
    assert len(memo) == 1
