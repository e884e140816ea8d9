"""The spool's on-disk format (records, segment and cursor files) and its plain data types.

Kept apart from `spool.Spool` so what recovery and the kill -9 tests reason about can be read
on one screen. A record is `length u32 | append time f64 | crc32 u32 | payload`, little
endian, the CRC over length, time and payload. The append time lets the spool report the age
of a consumer's oldest unacknowledged record without decoding any payload. Segment files are
`<byte offset>-<record number>.seg` (20 digits each); cursors are `cursors/<name>.pos`
holding `offset recno`, replaced atomically.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

HEAD = struct.Struct("<Id")  # length, append time: the part of the header the CRC covers
CRC = struct.Struct("<I")
HEADER_BYTES = HEAD.size + CRC.size
_SEGMENT_RE = re.compile(r"^(\d{20})-(\d{20})\.seg$")


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
    first_appended: float | None = None
    """Wall-clock time the first record was appended (lets a writer linger for a batch)."""


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


CUT, BAD = 0, -1  # what `record_end` says of a record cut off by the data's end, or broken


def record_end(data: bytes | memoryview, pos: int, end: int, max_len: int) -> int:
    """Where the record framed at `pos` ends in `data[:end]`: CUT if it goes past `end`
    (the caller knows whether that is a torn tail or its own read limit), BAD if its
    length is impossible or its CRC fails. The one definition of a valid record."""
    length: int = HEAD.unpack_from(data, pos)[0]
    if not 0 < length <= max_len:
        return BAD
    body = pos + HEADER_BYTES
    if body + length > end:
        return CUT
    if CRC.unpack_from(data, pos + HEAD.size)[0] != zlib.crc32(
            data[body:body + length], zlib.crc32(data[pos:pos + HEAD.size])):
        return BAD
    return body + length


def parse(data: bytes, limit: int, max_len: int) -> tuple[list[bytes], list[float], int, bool]:
    """Records framed in `data`: (payloads, append times, bytes used, hit a bad record)."""
    payloads: list[bytes] = []
    times: list[float] = []
    pos, end = 0, len(data)
    while len(payloads) < limit and pos + HEADER_BYTES <= end:
        stop = record_end(data, pos, end, max_len)
        if stop == BAD:
            return payloads, times, pos, True
        if stop == CUT:
            break
        payloads.append(data[pos + HEADER_BYTES:stop])
        times.append(HEAD.unpack_from(data, pos)[1])
        pos = stop
    return payloads, times, pos, False


def pread(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(length)


RecordVisitor = Callable[[bytearray, int, int], None]
SCAN_CHUNK_BYTES = 1 << 20


def scan(path: Path, max_len: int, visit: RecordVisitor | None = None,
         chunk: int = SCAN_CHUNK_BYTES) -> tuple[int, int]:
    """(records, bytes) of the valid prefix of a segment file; `visit(buffer, start, end)`
    sees each record's payload as a slice of the buffer, valid only during the call.

    One reused buffer and no object per record: recovery and the worker's seeding read a
    whole 64 MB segment at start, and a list of its payloads per chunk (as `parse` returns
    for the sinks' batches) left a fresh worker 4-17 MB larger for good.
    """
    count = valid = 0
    size = path.stat().st_size
    buffer = bytearray(chunk)
    with path.open("rb") as handle:
        while valid < size:
            data = buffer
            handle.seek(valid)
            got = handle.readinto(memoryview(data)[:size - valid])
            first = HEAD.unpack_from(data, 0)[0] if got >= HEADER_BYTES else 0
            if len(data) < HEADER_BYTES + first <= HEADER_BYTES + max_len:
                data = bytearray(HEADER_BYTES + first)  # one record larger than a chunk
                handle.seek(valid)
                got = handle.readinto(data)
            pos = 0
            with memoryview(data) as view:  # slices of a view copy nothing
                while pos + HEADER_BYTES <= got:
                    stop = record_end(view, pos, got, max_len)
                    if stop == BAD:
                        return count, valid + pos
                    if stop == CUT:
                        break
                    if visit is not None:
                        visit(data, pos + HEADER_BYTES, stop)
                    count += 1
                    pos = stop
            if pos == 0:  # a record cut off by the end of the file: a torn tail
                return count, valid
            valid += pos
    return count, valid


def read_segment(path: Path, offset: int, readable: int, max_records: int, max_bytes: int,
                 max_len: int) -> tuple[list[bytes], list[float], int, bool]:
    """Records from `offset` of a segment with `readable` bytes written there.

    Returns (payloads, append times, bytes used, corrupt). One record larger than
    `max_bytes` is still returned whole. `corrupt` means a bad record, or a file shorter
    than what was written to it: the caller skips the rest of the segment.
    """
    want = min(readable, max_bytes)
    data = pread(path, offset, want)
    payloads, times, used, bad = parse(data, max_records, max_len)
    if not payloads and not bad and used + HEADER_BYTES <= len(data) < readable:
        want = min(readable, HEADER_BYTES + HEAD.unpack_from(data, used)[0])
        data = pread(path, offset, want)
        payloads, times, used, bad = parse(data, max_records, max_len)
    cut = len(data) < want
    torn = len(data) == readable and used < readable and len(payloads) < max_records
    return payloads, times, used, bad or cut or torn


def list_segments(directory: Path) -> list[Segment]:
    """The segment files of a spool directory in log order."""
    segments = []
    for path in sorted(directory.iterdir()):
        match = _SEGMENT_RE.match(path.name)
        if match:
            start = Position(int(match[1]), int(match[2]))
            segments.append(Segment(start, path, path.stat().st_size))
    return segments


def create_segment(directory: Path, start: Position) -> Segment:
    path = directory / f"{start.offset:020d}-{start.recno:020d}.seg"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the new name must survive a power cut before data lands in it
    finally:
        os.close(dir_fd)
    return Segment(start, path, 0)


def load_cursor(path: Path) -> Position | None:
    """A persisted cursor; None if there is none, ValueError if it is unreadable."""
    try:
        offset, recno = path.read_text().split()
    except FileNotFoundError:
        return None
    return Position(int(offset), int(recno))


def save_cursor(path: Path, pos: Position) -> None:
    """Replace a cursor file atomically (write, rename): never a half-written cursor."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pos.offset} {pos.recno}\n")
    tmp.replace(path)

