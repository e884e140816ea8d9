"""Each device's last seq after a restart, read back from the tail of the spool.

Why: the worker appends a reading to the spool before it sends the PUBACK. Killed between the
two, the broker delivers that message again to the restarted worker (persistent session).
InfluxDB would overwrite the point harmlessly, but the local store's 1-minute rollups add
counts and sums: the reading would be counted twice. Messages in flight at a crash were
appended in the last moments before it, so the last records of the spool hold every
device's last seq that a redelivery can repeat; seeding `Ingest` with them turns such a
redelivery into a counted duplicate. The newest segment file is read, with the one before
it when the newest has just been started, in bounded chunks, before the session resumes.

The records are our own lines (`telemetry,device_id=..,kind=..,site=.. f=..,seq=Ni ms`)
for registered devices, whose ids need no escaping, so a regular expression reads them.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from gateway.telemetry.ingest import Ingest
from gateway.telemetry.spool_format import list_segments, scan

log = logging.getLogger(__name__)

_RECORD = re.compile(rb"telemetry,device_id=([a-z0-9_-]+),[^ ]* (?:[^ ]*,)?seq=(\d+)i (\d+)")
TAIL_BYTES = 4 << 20


def seed_from_spool(directory: Path, ingest: Ingest, max_record_bytes: int) -> int:
    """Seed `ingest` with the last seq of each device in the spool's tail; records read.

    The newest segment, and the one before it when the newest holds less than TAIL_BYTES
    (thousands of records, far more than a session has in flight). A full segment is 64 MB
    at the default spool size, half a million records, read in 1.3 s, keeping only each
    device's latest seq (spool_format.scan).
    """
    started = time.monotonic()
    last: dict[bytes, tuple[bytes, bytes]] = {}

    def visit(buffer: bytearray, start: int, end: int) -> None:
        match = _RECORD.fullmatch(buffer, start, end)
        if match is not None:
            last[match[1]] = (match[2], match[3])

    count = 0
    tail = list_segments(directory)[-2:]
    if len(tail) == 2 and tail[1].size >= TAIL_BYTES:
        tail = tail[1:]
    for segment in tail:
        try:
            count += scan(segment.path, max_record_bytes, visit)[0]
        except FileNotFoundError:  # dropped by the spool's size bound meanwhile
            continue
    for device_id, (seq, ts_ms) in last.items():
        ingest.seed(device_id.decode(), int(seq), int(ts_ms) / 1000)
    if count:
        log.info("telemetry seq state of %d devices taken from the last %d spool records in "
                 "%.2f s", len(last), count, time.monotonic() - started)
    return count
