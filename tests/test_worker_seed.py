"""A restarted worker's seq state, read back from the spool's tail (gateway.telemetry.worker_seed).

Real spool files written by `Spool`; the seeded state is checked the way it matters, by a
redelivered reading counting as a duplicate and the next one as new.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from device_drivers.vocabulary import Reading
from gateway.telemetry.ingest import Ingest
from gateway.telemetry.records import encode_reading
from gateway.telemetry.spool import Spool
from gateway.telemetry.spool_format import SCAN_CHUNK_BYTES, list_segments
from gateway.telemetry.worker_seed import TAIL_BYTES, seed_from_spool

DEVICES = {"m-1": "meter", "m-2": "meter"}


def _record(device: str, seq: int, metrics: dict[str, float] | None = None) -> bytes:
    record = encode_reading(Reading(device, "meter", time.time(), metrics or {"power_w": 1.0}, seq),
                            "site")
    assert record is not None
    return record


def _answers(ingest: Ingest, device: str, seq: int) -> str:
    """"duplicate" or "new" for a reading with `seq` arriving now (seqs above 1: a 1 after
    the last reading's time is a restarted device)."""
    before = ingest.duplicates
    payload = json.dumps({"ts": time.time(), "seq": seq, "metrics": {"power_w": 2.0}})
    ingest.message(device, payload.encode(), time.time())
    return "duplicate" if ingest.duplicates > before else "new"


def _seeded(spool_dir: Path, max_record_bytes: int) -> Ingest:
    ingest = Ingest(DEVICES)
    seed_from_spool(spool_dir, ingest, max_record_bytes)
    return ingest


def test_each_devices_last_seq_comes_back_across_a_segment_just_started(tmp_path: Path) -> None:
    with Spool(tmp_path, ["local"], max_bytes=1 << 20, segment_bytes=64 << 10) as spool:
        spool.append([_record("m-1", seq) for seq in range(1, 2_000)])
        segments, m2 = len(list_segments(tmp_path)), 0
        while len(list_segments(tmp_path)) == segments:  # until m-2 starts a new segment
            m2 += 1
            spool.append([_record("m-2", m2)])
        max_record = spool.max_record_bytes
    assert list_segments(tmp_path)[-1].size < TAIL_BYTES  # m-1's last is in the one before
    ingest = _seeded(tmp_path, max_record)
    assert _answers(ingest, "m-1", 1_999) == "duplicate"
    assert _answers(ingest, "m-1", 2_000) == "new"
    assert _answers(ingest, "m-2", m2) == "duplicate" and _answers(ingest, "m-2", m2 + 1) == "new"


def test_a_record_larger_than_a_read_chunk_is_read_past(tmp_path: Path) -> None:
    big = {f"metric_{i}": float(i) for i in range(SCAN_CHUNK_BYTES // 12)}
    with Spool(tmp_path, ["local"], max_bytes=64 << 20) as spool:
        spool.append([_record("m-1", 10), _record("m-2", 10, big), _record("m-1", 20)])
        max_record = spool.max_record_bytes
    assert len(_record("m-2", 10, big)) > SCAN_CHUNK_BYTES
    ingest = _seeded(tmp_path, max_record)
    assert _answers(ingest, "m-2", 10) == "duplicate" and _answers(ingest, "m-1", 20) == "duplicate"
    assert _answers(ingest, "m-2", 11) == "new"


def test_a_torn_last_record_is_ignored_and_the_one_before_it_counts(tmp_path: Path) -> None:
    with Spool(tmp_path, ["local"], max_bytes=1 << 20) as spool:
        spool.append([_record("m-1", 10), _record("m-1", 20), _record("m-1", 30)])
        max_record = spool.max_record_bytes
    newest = list_segments(tmp_path)[-1].path
    newest.write_bytes(newest.read_bytes()[:-5])  # kill -9 in the middle of a write
    ingest = _seeded(tmp_path, max_record)
    assert _answers(ingest, "m-1", 20) == "duplicate" and _answers(ingest, "m-1", 30) == "new"
