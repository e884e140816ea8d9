"""A durable, bounded, multi-consumer queue on disk between telemetry ingest and its sinks.

An append-only segment log rather than SQLite or memory: ingest never waits on a sink, an
outage loses nothing, kill -9 loses at most `fsync_interval_s` (one buffered `write()` per
flush, one `fsync()` per interval, never per record). Each consumer (InfluxDB writer, local
store) has its own durable cursor, so a stalled sink never blocks the other. A segment file
goes once every cursor passed it; when the spool is full the oldest goes anyway and what it
still held is counted per consumer. Records carry a CRC (spool_format.py), so a torn tail is
cut on open, not replayed. Segment names hold `<byte offset>-<record number>`, so positions
survive restarts with only the last segment scanned. Design notes: docs/telemetry.md.

Thread-safety: every public method may be called from any thread (one internal lock).
`append` copies into a memory buffer (and every `flush_bytes` does one `write()`), cheap
enough for the event loop; `fsync` runs on the spool's own thread outside the lock, and
`read` does its file I/O outside it too. Replays (cursors persist lazily) are harmless:
a point is identified by its series and timestamp.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from gateway.telemetry.spool_format import (
    CRC,
    HEAD,
    Batch,
    ConsumerStats,
    Position,
    Segment,
    SpoolStats,
    create_segment,
    list_segments,
    load_cursor,
    pread,
    read_segment,
    save_cursor,
    scan,
)

__all__ = ["Batch", "ConsumerStats", "Position", "Spool", "SpoolClosedError", "SpoolStats"]

log = logging.getLogger(__name__)

_CONSUMER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class SpoolClosedError(RuntimeError):
    """The spool was closed: readers and appenders should wind down."""


class Spool:
    """Durable queue of opaque records with one independent cursor per named consumer.

    `consumers` names every reader (e.g. `("influxdb", "local")`); cursor files of names
    not listed are removed so a sink taken out of the configuration does not pin segments.
    A new consumer starts at the oldest retained record.
    """

    def __init__(
        self,
        directory: Path | str,
        consumers: Sequence[str],
        *,
        max_bytes: int = 512 * 1024 * 1024,
        fsync_interval_s: float = 1.0,
        segment_bytes: int | None = None,
    ) -> None:
        for name in consumers:
            if not _CONSUMER_RE.fullmatch(name):
                raise ValueError(f"consumer name {name!r} must match {_CONSUMER_RE.pattern}")
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes or max(64 * 1024, min(64 << 20, max_bytes // 8))
        if self.segment_bytes * 2 > max_bytes:
            raise ValueError("max_bytes must hold at least two segments")
        self.flush_bytes = min(256 * 1024, self.segment_bytes // 4)
        self.max_record_bytes = self.segment_bytes
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._data = threading.Condition(self._lock)
        self._buf, self._buf_records, self._buf_first_time = bytearray(), 0, 0.0
        self.appended = self.dropped = self.truncated_bytes = 0
        self._closed = False
        self._segments = self._recover()
        active = self._segments[-1]
        self._fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
        self._tail = Position(active.start.offset + active.size, self._tail_recno)
        self._synced_recno = self._tail.recno
        self._cursors: dict[str, Position] = {}
        self._dropped_by: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._load_cursors(consumers)
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="spool-fsync", daemon=True)
        self._flusher.start()

    # ---- opening --------------------------------------------------------------------------

    def _recover(self) -> list[Segment]:
        """List segments, truncate a torn tail of the last one, and log what was lost."""
        (self.directory / "cursors").mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:  # two writers interleaving records would corrupt the log
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"spool {self.directory} is in use by another process") from None
        segments = list_segments(self.directory)
        if not segments:
            segments.append(create_segment(self.directory, Position(0, 0)))
        last = segments[-1]
        records, used = scan(last.path, self.max_record_bytes)
        self._tail_recno = last.start.recno + records
        if used < last.size:
            self.truncated_bytes = last.size - used
            os.truncate(last.path, used)
            last.size = used
            log.warning(
                "spool %s: cut %d bytes of torn or corrupt tail from %s after record %d; "
                "records appended after it (at most one fsync interval) are lost",
                self.directory, self.truncated_bytes, last.path.name, self._tail_recno)
        return segments

    def _load_cursors(self, consumers: Sequence[str]) -> None:
        head, tail = self._segments[0].start, self._tail
        for path in (self.directory / "cursors").glob("*.pos"):
            if path.stem not in consumers:
                log.info("spool: removing cursor of unconfigured consumer %r", path.stem)
                path.unlink()
        for name in consumers:
            try:
                pos = load_cursor(self.directory / "cursors" / f"{name}.pos") or head
            except ValueError:
                log.warning("spool: unreadable cursor of %r; replaying from the oldest record",
                            name)
                pos = head
            # Behind the head: acknowledged before those segments went. Beyond the tail: the
            # tail was cut after a crash and the sink already has those records.
            self._cursors[name] = min(max(pos, head), tail)
            self._dropped_by[name] = 0

    # ---- appending ------------------------------------------------------------------------

    def append(self, records: Iterable[bytes]) -> int:
        """Queue records (each non-empty, at most `max_record_bytes`); returns how many.

        Data reaches the OS every `flush_bytes` or within `fsync_interval_s`, and the disk
        within `fsync_interval_s`. Never waits for a consumer (when full, drops the oldest);
        blocks at most for one `write()` and, once per segment, the fsync that seals it.
        """
        now = time.time()
        count = pending = 0
        pack, crc, flush_bytes = HEAD.pack, zlib.crc32, self.flush_bytes
        with self._lock:
            if self._closed:
                raise SpoolClosedError("spool is closed")
            if not self._buf_records:
                self._buf_first_time = now
            buf = self._buf
            try:
                for payload in records:
                    length = len(payload)
                    if not 0 < length <= self.max_record_bytes:
                        raise ValueError(
                            f"record of {length} bytes (1..{self.max_record_bytes})")
                    head = pack(length, now)
                    buf += head
                    buf += CRC.pack(crc(payload, crc(head)))
                    buf += payload
                    pending += 1
                    if len(buf) >= flush_bytes:  # bounded memory, also for huge calls
                        self._buf_records += pending
                        count, pending = count + pending, 0
                        self._write_out()
                        buf, self._buf_first_time = self._buf, now
            finally:  # records before a refused one stay appended and counted
                self._buf_records += pending
                count += pending
                self.appended += count
                if count:
                    self._data.notify_all()
        return count

    def _write_out(self) -> None:
        """Hand the buffer to the OS (survives kill -9); rotate and enforce max_bytes. Locked.

        On a write error (disk full) the file is cut back to its last whole record and the
        buffer kept for the next try; past 8 x `flush_bytes` it is dropped and counted, so a
        full disk costs readings, never the gateway's memory or its ingest loop.
        """
        if not self._buf:
            return
        while (self._tail.offset - self._segments[0].start.offset + len(self._buf)
               > self.max_bytes and len(self._segments) > 1):
            self._drop_oldest()
        active = self._segments[-1]
        try:
            view = memoryview(self._buf)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            os.ftruncate(self._fd, active.size)
            if len(self._buf) > 8 * self.flush_bytes:
                self.dropped += self._buf_records
                for name in self._dropped_by:
                    self._dropped_by[name] += self._buf_records
                self._buf, self._buf_records = bytearray(), 0
            log.error("spool %s: cannot write (%s); %d records dropped so far",
                      self.directory, exc, self.dropped)
            return
        active.size += len(self._buf)
        self._tail = Position(self._tail.offset + len(self._buf),
                              self._tail.recno + self._buf_records)
        self._buf, self._buf_records = bytearray(), 0
        if active.size >= self.segment_bytes:
            os.fsync(self._fd)
            self._synced_recno = self._tail.recno
            segment = create_segment(self.directory, self._tail)
            os.close(self._fd)
            self._segments.append(segment)
            self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)

    def _drop_oldest(self) -> None:
        gone, after = self._segments.pop(0), self._segments[0].start
        slowest = min((p.recno for p in self._cursors.values()), default=after.recno)
        lost = max(0, after.recno - max(gone.start.recno, slowest))
        for name, pos in self._cursors.items():
            if pos.offset < after.offset:
                self._dropped_by[name] += after.recno - max(pos.recno, gone.start.recno)
                self._cursors[name] = after
                self._dirty.add(name)
        self.dropped += lost
        gone.path.unlink(missing_ok=True)
        if lost:
            log.warning("spool full (%d bytes): dropped %d oldest records (%d in total)",
                        self.max_bytes, lost, self.dropped)

    # ---- durability -----------------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            try:
                self.sync()
            except Exception:  # the flusher must outlive one bad disk moment
                log.exception("spool: periodic sync failed")

    def sync(self) -> None:
        """Write out the buffer, fsync it, and persist moved cursors. Thread-safe."""
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                self._write_out()
                fd, recno = os.dup(self._fd), self._tail.recno
                cursors = {name: self._cursors[name] for name in self._dirty}
                self._dirty.clear()
            try:
                os.fsync(fd)  # outside the lock: appends go on while the disk catches up
            finally:
                os.close(fd)
            self._synced_recno = max(self._synced_recno, recno)
            for name, pos in cursors.items():
                save_cursor(self.directory / "cursors" / f"{name}.pos", pos)

    def close(self) -> None:
        """Stop the flusher, sync everything, release the file. Idempotent.

        Call it on shutdown: an unclosed spool loses its buffer (at most one interval).
        """
        self._stop.set()
        if self._flusher.is_alive() and self._flusher is not threading.current_thread():
            self._flusher.join()
        self.sync()
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
                os.close(self._lock_fd)  # releases the flock
                self._data.notify_all()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- consuming ------------------------------------------------------------------------

    def _locate(self, name: str, flush: bool = True,
                start: Position | None = None) -> tuple[Path, Position, int] | None:
        """Under the lock: (segment path, position, readable bytes there) or None if drained.

        `start` (at or after the cursor) reads from there instead of the cursor.
        """
        cursor = self._cursors[name]
        pos = cursor if start is None or start.offset < cursor.offset else start
        if flush and pos.offset >= self._tail.offset and self._buf:
            self._write_out()  # a waiting reader should not wait for the timer
        while pos.offset < self._tail.offset:
            starts = [s.start.offset for s in self._segments]
            index = bisect.bisect_right(starts, pos.offset) - 1
            if index < 0:  # only after a drop raced a read; the cursor was moved already
                pos = self._segments[0].start
                continue
            seg = self._segments[index]
            readable = seg.start.offset + seg.size - pos.offset
            if readable > 0:
                return seg.path, pos, readable
            if index + 1 >= len(self._segments):
                return None
            pos = self._segments[index + 1].start
            if pos.offset > cursor.offset and start is None:
                self._cursors[name] = pos
        return None

    def read(self, name: str, max_records: int = 5000, max_bytes: int = 1 << 20,
             start: Position | None = None) -> Batch:
        """Up to `max_records` records after `name`'s cursor (or after `start`, when given and
        not behind the cursor); empty when drained.

        `max_bytes` bounds the read from disk: 5,000 records of a typical reading (~120 bytes)
        take 0.6 MB, and reading 4 MB to keep that much made every batch of a backlog allocate
        and drop 3.4 MB per sink thread (measured: the worker's RSS after draining a 500,000
        reading flood 71 MB with 4 MB reads, 64 MB with 1 MB). A record larger than it still
        comes whole.

        Reading does not move the cursor: call `ack(name, batch.end)` after the sink took the
        batch. A sink that commits less often than it reads (the rules engine, which saves its
        state every few seconds) reads ahead with `start` and acks what it has committed, so
        a restart replays the rest. A batch never spans two segment files.
        """
        while True:
            with self._lock:
                if self._closed:
                    raise SpoolClosedError("spool is closed")
                found = self._locate(name, start=start)
                if found is None:
                    cursor = self._cursors[name]
                    pos = cursor if start is None or start.offset < cursor.offset else start
                    return Batch([], pos, pos)
                path, pos, readable = found
                seg_offset = pos.offset - int(path.name[:20])
            try:
                payloads, times, used, corrupt = read_segment(
                    path, seg_offset, readable, max_records, max_bytes, self.max_record_bytes)
            except FileNotFoundError:
                continue  # dropped under us: the drop moved the cursor, read again
            end = Position(pos.offset + used, pos.recno + len(payloads))
            if corrupt:
                end = self._skip_corrupt(name, path, end)
            return Batch(payloads, pos, end, times[0] if times else None)

    def read_gathered(self, name: str, *, fill: int, linger_s: float, stop: threading.Event,
                      start: Position | None = None) -> Batch | None:
        """`read`, except that a trickle (fewer than `fill` records) waits until its oldest
        record is `linger_s` old and is read again with what came meanwhile: a sink with a
        fixed cost per batch (a commit, an engine call) then pays it a few times a second,
        not once per reading, and a flood, already in big batches, never waits. None when
        `stop` was set while waiting."""
        batch = self.read(name, start=start)
        if batch.records and batch.first_appended is not None and len(batch.records) < fill:
            pause = batch.first_appended + linger_s - time.time()
            if pause > 0:
                if stop.wait(min(pause, linger_s)):
                    return None
                with self._lock:  # what came meanwhile may still be in the write buffer
                    if self._buf and not self._closed:
                        self._write_out()
                batch = self.read(name, start=start)
        return batch

    def _skip_corrupt(self, name: str, path: Path, at: Position) -> Position:
        """A bad CRC inside written data (disk fault): skip to the next segment, count it."""
        with self._lock:
            later = [s.start for s in self._segments if s.start.offset > at.offset]
            nxt = later[0] if later else self._tail
            lost = max(0, nxt.recno - at.recno)
            self._dropped_by[name] += lost
        log.error("spool: corrupt record in %s at offset %d for %r; skipping %d records",
                  path.name, at.offset, name, lost)
        return nxt

    def ack(self, name: str, end: Position) -> None:
        """Record that `name` has everything before `end`; frees fully consumed segments.

        An `end` behind the cursor (the spool dropped that data meanwhile) is ignored.
        """
        with self._lock:
            if end > self._tail:
                raise ValueError(f"ack beyond the written tail: {end} > {self._tail}")
            if end.offset <= self._cursors[name].offset:
                return
            self._cursors[name] = end
            self._dirty.add(name)
            if not self._cursors:
                return
            slowest = min(p.offset for p in self._cursors.values())
            while len(self._segments) > 1 and self._segments[1].start.offset <= slowest:
                self._segments.pop(0).path.unlink(missing_ok=True)

    def position(self, name: str) -> Position:
        with self._lock:
            return self._cursors[name]

    def wait(self, name: str, timeout: float, start: Position | None = None) -> bool:
        """Block until `name` has unread records (after `start`, when given) (True) or
        `timeout` passes (False)."""
        with self._data:
            return self._data.wait_for(
                lambda: self._closed or max(self._cursors[name].offset,
                                            start.offset if start is not None else 0)
                < self._tail.offset + len(self._buf), timeout)

    # ---- observing ------------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        """Depths, ages and drop counts for /metrics and /readyz."""
        now = time.time()
        with self._lock:
            end = Position(self._tail.offset + len(self._buf),
                           self._tail.recno + self._buf_records)
            cursors = dict(self._cursors)
            found = {name: self._locate(name, flush=False) for name in cursors}
            buf_time = self._buf_first_time if self._buf_records else None
            disk = self._tail.offset - self._segments[0].start.offset
            result = SpoolStats(disk, len(self._buf), len(self._segments), self.appended,
                                self.dropped, self._tail.recno, self._synced_recno,
                                self.truncated_bytes)
        for name, pos in cursors.items():
            age: float | None = None
            where = found[name]
            if where is not None:
                path, at, _ = where
                try:
                    head = pread(path, at.offset - int(path.name[:20]), HEAD.size)
                    age = now - HEAD.unpack(head)[1]
                except (FileNotFoundError, struct.error):
                    age = None
            elif buf_time is not None and pos.offset < end.offset:
                age = now - buf_time
            result.consumers[name] = ConsumerStats(
                name, end.recno - pos.recno, end.offset - pos.offset,
                None if age is None else max(0.0, age), self._dropped_by[name])
        return result
