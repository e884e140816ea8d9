"""Database URLs and SQLite connection settings without SQLAlchemy: the site model and the
telemetry worker need to know where an SQLite file is, and the gateway's engine and the
worker's DB-API connection must open it on the same terms; neither should load SQLAlchemy
for it."""

from __future__ import annotations

from pathlib import Path

SQLITE_TIMEOUT_S = 30  # how long a writer waits for the other process's write lock
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL",
                  "PRAGMA foreign_keys=ON")


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite SQLAlchemy URL; None for other databases and in-memory SQLite.

    Parsed by hand (SQLAlchemy's make_url would pull SQLAlchemy into every config load):
    `sqlite:///rel.db` is relative, `sqlite:////abs.db` absolute, a `?query` is not part of
    the path, and `sqlite://`, `sqlite:///:memory:` and `file::memory:` URIs are memory.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] != "sqlite" or not rest.startswith("/"):
        return None
    path = rest[1:].split("?", 1)[0]
    if path.startswith("file:"):
        path = path[len("file:"):]
    if not path or path == ":memory:" or path.startswith(":memory:"):
        return None
    return Path(path)
