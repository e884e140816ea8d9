"""The spool's on-disk record format and the plain data its API hands out.

Kept apart from `spool.Spool` so the format (what recovery and the kill -9 tests reason
about) can be read on one screen: `length u32 | append time f64 | crc32 u32 | payload`,
little endian, the CRC over length, time and payload. The append time lets the spool report
the age of a consumer's oldest unacknowledged record without decoding any payload.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

HEAD = struct.Struct("<Id")  # length, append time: the part of the header the CRC covers
CRC = struct.Struct("<I")
HEADER_BYTES = HEAD.size + CRC.size


class Position(NamedTuple):
    """A place in the log: global byte offset and global record number (both monotonic)."""

    offset: int
    recno: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Records read for one consumer; acknowledge `end` once the sink has them."""

    records: list[bytes]
    start: Position
    end: Position


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    name: str
    depth_records: int
    depth_bytes: int
    oldest_age_s: float | None
    """Seconds since the oldest unacknowledged record was appended; None when drained."""
    dropped: int
    """Records this consumer never got because the spool was full."""


@dataclass(frozen=True, slots=True)
class SpoolStats:
    disk_bytes: int
    buffered_bytes: int
    segments: int
    appended: int
    dropped: int
    """Records deleted (spool full) before at least one consumer had them."""
    written_recno: int
    """Records handed to the OS: these survive kill -9."""
    synced_recno: int
    """Records fsynced: these survive a power cut."""
    truncated_bytes: int
    """Bytes of torn or corrupt tail cut off when the spool was opened."""
    consumers: dict[str, ConsumerStats] = field(default_factory=dict)


@dataclass(slots=True)
class Segment:
    start: Position
    path: Path
    size: int


def frame(payload: bytes, now: float) -> bytes:
    """One record as stored; exposed for tests that craft torn tails."""
    head = HEAD.pack(len(payload), now)
    return head + CRC.pack(zlib.crc32(payload, zlib.crc32(head))) + payload


def parse(data: bytes, limit: int, max_len: int) -> tuple[list[bytes], list[float], int, bool]:
    """Records framed in `data`: (payloads, append times, bytes used, hit a bad record).

    A record cut off by the end of `data` is not "bad" here: the caller knows whether `data`
    ended at the end of what was written (torn tail) or at its own read limit.
    """
    payloads: list[bytes] = []
    times: list[float] = []
    pos, end, unpack, crc = 0, len(data), HEAD.unpack_from, zlib.crc32
    while len(payloads) < limit and pos + HEADER_BYTES <= end:
        length, appended = unpack(data, pos)
        if not 0 < length <= max_len:
            return payloads, times, pos, True
        body = pos + HEADER_BYTES
        if body + length > end:
            break
        if CRC.unpack_from(data, pos + HEAD.size)[0] != crc(data[body:body + length],
                                                     crc(data[pos:pos + HEAD.size])):
            return payloads, times, pos, True
        payloads.append(data[body:body + length])
        times.append(appended)
        pos = body + length
    return payloads, times, pos, False


def pread(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(length)
