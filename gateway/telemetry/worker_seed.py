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
import zlib
from pathlib import Path

from gateway.telemetry.ingest import Ingest
from gateway.telemetry.spool_format import CRC, HEAD, HEADER_BYTES, list_segments

log = logging.getLogger(__name__)

_RECORD = re.compile(rb"telemetry,device_id=([a-z0-9_-]+),[^ ]* (?:[^ ]*,)?seq=(\d+)i (\d+)")
CHUNK_BYTES = 1 << 20
TAIL_BYTES = 4 << 20


def seed_from_spool(directory: Path, ingest: Ingest, max_record_bytes: int) -> int:
    """Seed `ingest` with the last seq of each device in the spool's tail; records read.

    The newest segment, and the one before it when the newest holds less than TAIL_BYTES
    (thousands of records, far more than a session has in flight). A full segment is 64 MB
    at the default spool size, half a million records, read in 1.3 s. The records go through
    one reused buffer and only each device's latest seq is kept: a list of every record, as
    the spool's own reader returns, left a fresh worker 17 MB larger after a flood (the few
    survivors scattered over the allocator's arenas keep them all).
    """
    started = time.monotonic()
    last: dict[bytes, tuple[bytes, bytes]] = {}
    count = 0
    buffer = bytearray(CHUNK_BYTES)
    tail = list_segments(directory)[-2:]
    if len(tail) == 2 and tail[1].size >= TAIL_BYTES:
        tail = tail[1:]
    for segment in tail:
        try:
            count += _scan(segment.path, segment.size, buffer, last, max_record_bytes)
        except FileNotFoundError:  # dropped by the spool's size bound meanwhile
            continue
    for device_id, (seq, ts_ms) in last.items():
        ingest.seed(device_id.decode(), int(seq), int(ts_ms) / 1000)
    if count:
        log.info("telemetry seq state of %d devices taken from the last %d spool records in "
                 "%.2f s", len(last), count, time.monotonic() - started)
    return count


def _scan(path: Path, size: int, buffer: bytearray, last: dict[bytes, tuple[bytes, bytes]],
          max_len: int) -> int:
    """The records of one segment, framed as spool_format.parse reads them, up to a bad or
    torn one (the rest of a segment after it is not trusted)."""
    count, offset = 0, 0
    with path.open("rb") as handle:
        while offset < size:
            chunk = buffer
            handle.seek(offset)
            got = handle.readinto(memoryview(chunk)[:size - offset])
            first = HEAD.unpack_from(chunk, 0)[0] if got >= HEADER_BYTES else 0
            if len(chunk) < HEADER_BYTES + first and first <= max_len:
                chunk = bytearray(HEADER_BYTES + first)  # one record larger than a chunk
                handle.seek(offset)
                got = handle.readinto(chunk)
            pos, view = 0, memoryview(chunk)
            while pos + HEADER_BYTES <= got:
                length = HEAD.unpack_from(chunk, pos)[0]
                body = pos + HEADER_BYTES
                if not 0 < length <= max_len:
                    return count
                if body + length > got:
                    break
                if CRC.unpack_from(chunk, pos + HEAD.size)[0] != zlib.crc32(
                        view[body:body + length], zlib.crc32(view[pos:pos + HEAD.size])):
                    return count
                match = _RECORD.fullmatch(chunk, body, body + length)
                if match is not None:
                    last[match[1]] = (match[2], match[3])
                count += 1
                pos = body + length
            view.release()
            if pos == 0:  # torn: a record cut off by the end of what was written
                return count
            offset += pos
    return count
