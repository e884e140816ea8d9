"""The audit writer's spill file: decisions the database could not take yet, on local disk.

When the database is locked or unreachable, gates keep opening: the access service falls
back to its in-memory replay guard and the decision goes out. Before it goes out, its audit
entry (and the token use it spent) is appended here and fsynced, so a kill -9 during the
outage loses nothing: the next start of any gateway on this directory replays the file into
the database (rows already there, by instance and sequence number, are skipped) and deletes
it. While the process lives, entries stay queued in memory as well and are written as soon
as the database answers; the file is emptied once nothing in it is still unwritten.

One file per gateway instance (`<instance>.jsonl`), locked with flock while its writer
lives, so two processes sharing the directory never replay each other's live file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.access.spent import TokenClaim

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class SpilledItem:
    entry: dict[str, Any]  # AuditEntry fields
    claim: TokenClaim | None


def _line(entry: dict[str, Any], claim: TokenClaim | None) -> bytes:
    record = {"v": 1, "entry": entry, "claim": None if claim is None else asdict(claim)}
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _parse(raw: bytes) -> SpilledItem | None:
    try:
        record = json.loads(raw)
        claim = record.get("claim")
        return SpilledItem(dict(record["entry"]),
                           TokenClaim(**claim) if isinstance(claim, dict) else None)
    except (ValueError, KeyError, TypeError):
        return None


class SpillFile:
    """This instance's spill file; created on first use, locked for the writer's life."""

    def __init__(self, directory: Path, instance_id: str) -> None:
        self.directory = directory
        self.path = directory / f"{instance_id}{SUFFIX}"
        self._fd: int | None = None
        self._lock = threading.Lock()  # appends come from the event loop and a worker thread
        self._dirty = False  # written but not fsynced
        self.size = 0

    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd
            self.size = os.fstat(fd).st_size
        return self._fd

    def append(self, items: Iterable[tuple[dict[str, Any], TokenClaim | None]],
               fsync: bool = True) -> int:
        """Append (and fsync unless told not to); returns how many were written.

        Without the fsync the lines are in the kernel when this returns: a kill -9 of the
        gateway does not lose them, a power cut before the next `sync` could."""
        data = b"".join(_line(entry, claim) for entry, claim in items)
        if not data:
            return 0
        with self._lock:
            fd = self._open()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
            self._dirty = self._dirty or not fsync
            self.size += len(data)
        return data.count(b"\n")

    def sync(self) -> None:
        """fsync what `append(fsync=False)` wrote."""
        with self._lock:
            if self._fd is not None and self._dirty:
                os.fsync(self._fd)
                self._dirty = False

    @property
    def dirty(self) -> bool:
        return self._dirty

    def clear(self) -> None:
        """Everything spilled has reached the database. (No fsync: should a power cut bring
        the lines back, replaying them changes nothing, entries being keyed by instance and
        sequence number and token uses by their reference.)"""
        with self._lock:
            if self._fd is not None and self.size:
                os.ftruncate(self._fd, 0)
                self.size = 0
                self._dirty = False

    def close(self, remove_if_empty: bool = True) -> None:
        if self._fd is None:
            return
        if remove_if_empty and self.size == 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


@dataclass
class Leftover:
    """A dead instance's spill file, locked by us until its items are in the database."""

    path: Path
    fd: int
    items: list[SpilledItem]

    def done(self) -> None:
        """Its items are in the database: the file goes (the lock is released on exit)."""
        with contextlib.suppress(OSError):
            self.path.unlink()


def _read_items(fd: int) -> list[SpilledItem]:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    items = []
    for raw in b"".join(chunks).split(b"\n"):
        if not raw.strip():
            continue
        item = _parse(raw)
        if item is None:  # a torn last line from a crash mid-write: never acknowledged
            log.warning("audit spill: skipping an unreadable line")
            continue
        items.append(item)
    return items


@contextlib.contextmanager
def leftovers(directory: Path | None, own_instance: str) -> Iterator[list[Leftover]]:
    """Spill files of instances that are gone (their lock is free), locked while in use."""
    found: list[Leftover] = []
    try:
        if directory is not None and directory.is_dir():
            for path in sorted(directory.glob(f"*{SUFFIX}")):
                if path.stem == own_instance:
                    continue
                fd = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue  # a live gateway's file
                found.append(Leftover(path, fd, _read_items(fd)))
        yield found
    finally:
        for leftover in found:
            os.close(leftover.fd)
