"""Each device's last seq after a restart, read back from the tail of the spool.

Why: the worker appends a reading to the spool before it sends the PUBACK. Killed between the
two, the broker delivers that message again to the restarted worker (persistent session).
InfluxDB would overwrite the point harmlessly, but the local store's 1-minute rollups add
counts and sums: the reading would be counted twice. Messages in flight at a crash were
appended in the last moments before it, so the last records of the spool hold every
device's last seq that a redelivery can repeat; seeding `Ingest` with them turns such a
redelivery into a counted duplicate. Only the last two segment files are read (the newest
may have just been started), in bounded chunks, before the MQTT session resumes.

The records are our own lines (`telemetry,device_id=..,kind=..,site=.. f=..,seq=Ni ms`)
for registered devices, whose ids need no escaping, so a regular expression reads them.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from gateway.telemetry.ingest import Ingest
from gateway.telemetry.spool_format import list_segments, read_segment

log = logging.getLogger(__name__)

_RECORD = re.compile(rb"telemetry,device_id=([a-z0-9_-]+),[^ ]* (?:[^ ]*,)?seq=(\d+)i (\d+)")
CHUNK_BYTES = 4 << 20


def seed_from_spool(directory: Path, ingest: Ingest, max_record_bytes: int,
                    segments: int = 2) -> int:
    """Seed `ingest` with the last seq of each device in the spool's tail; records read."""
    started = time.monotonic()
    last: dict[str, tuple[int, float]] = {}
    count = 0
    for segment in list_segments(directory)[-segments:]:
        offset, size = 0, segment.size
        while offset < size:
            try:
                payloads, _, used, corrupt = read_segment(
                    segment.path, offset, size - offset, 1 << 20, CHUNK_BYTES,
                    max_record_bytes)
            except FileNotFoundError:
                break
            for payload in payloads:
                match = _RECORD.fullmatch(payload)
                if match is not None:
                    last[match[1].decode()] = (int(match[2]), int(match[3]) / 1000)
            count += len(payloads)
            if corrupt or not used:
                break
            offset += used
    for device_id, (seq, ts) in last.items():
        ingest.seed(device_id, seq, ts)
    if count:
        log.info("telemetry seq state of %d devices taken from the last %d spool records in "
                 "%.2f s", len(last), count, time.monotonic() - started)
    return count
