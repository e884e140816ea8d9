"""The telemetry worker's connection to the gateway's database, through the DB-API directly.

Why not SQLAlchemy, which the rest of the gateway uses: the worker writes a handful of fixed
statements (rollups, latest values, the spool cursor, alerts, the rules snapshot) and
importing SQLAlchemy costs it 15 MB, a tenth of issue 9's memory budget for both processes.
The schema stays SQLAlchemy's (gateway.telemetry.tables, migrated by the gateway before it
starts the worker); this module only speaks the two dialects' SQL: `sqlite3` from the
standard library for the embedded default, psycopg 3 for PostgreSQL.

Statements are written once with `?` placeholders and rewritten to `%s` for psycopg. The
SQLite connection is opened with the gateway engine's settings (gateway.db_url: WAL,
synchronous FULL, the busy timeout) and writes in BEGIN IMMEDIATE as it does, so the two
processes share the file on the same terms. A connection that failed is dropped and opened
again on next use: a restarted PostgreSQL costs the sink one retry, as with SQLAlchemy's
pre-ping.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from gateway.db_url import SQLITE_PRAGMAS, SQLITE_TIMEOUT_S, sqlite_file

log = logging.getLogger(__name__)

Row = tuple[Any, ...]


class LocalDbError(Exception):
    """The database refused or could not be reached; the caller retries with backoff."""


class Cursor(Protocol):
    """What both drivers' cursors offer here (the DB-API subset in use)."""

    rowcount: int

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


def sqlite_path(url: str) -> str:
    """The file of an SQLite URL, or `:memory:` for an in-memory database, which the
    gateway's tables are not in: the worker's local store and alerts then fail (and retry,
    logged), while ingest, the spool and InfluxDB work, as a throwaway run expects."""
    path = sqlite_file(url)
    if path is None:
        log.warning("database.url is an in-memory SQLite database, which the telemetry worker "
                    "cannot share with the gateway: no rollups or alerts will be stored (name "
                    "a file, e.g. sqlite:///scgw.db)")
        return ":memory:"
    return str(path)


def postgres_conninfo(url: str) -> str:
    """psycopg takes `postgresql://` URLs; SQLAlchemy's names the driver in the scheme."""
    scheme, _, rest = url.partition("://")
    if not (scheme in ("postgres", "postgresql") or scheme.startswith("postgresql+")):
        raise LocalDbError(f"database.url: expected postgresql://, found {scheme}://")
    return f"postgresql://{rest}"


class LocalDb:
    """One connection, used by one thread at a time (each sink owns its own LocalDb)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self._target = sqlite_path(url) if self.dialect == "sqlite" else postgres_conninfo(url)
        self._conn: Any = None

    # ---- connection ---------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        conn: Any
        if self.dialect == "sqlite":
            if self._target != ":memory:":
                Path(self._target).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._target, timeout=SQLITE_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
            for pragma in SQLITE_PRAGMAS:
                conn.execute(pragma)
        else:
            import psycopg  # only where PostgreSQL is configured: ~25 MB

            conn = psycopg.connect(self._target, autocommit=True)
        self._conn = conn
        return conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.dialect == "sqlite":
            return (sqlite3.Error,)
        import psycopg

        return (psycopg.Error,)

    # ---- statements ---------------------------------------------------------------------

    def sql(self, statement: str) -> str:
        """`?` placeholders in the driver's style."""
        return statement if self.dialect == "sqlite" else statement.replace("?", "%s")

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[Cursor]:
        """A cursor; a driver error becomes LocalDbError and drops the connection."""
        try:
            cursor = self._connect().cursor()
        except self._errors() as exc:
            self.close()
            raise LocalDbError(f"{type(exc).__name__}: {exc}") from exc
        try:
            yield cursor
        except self._errors() as exc:
            self.close()
            raise LocalDbError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                cursor.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """BEGIN (IMMEDIATE on SQLite: the write lock up front) ... COMMIT, or ROLLBACK on any
        exception."""
        with self._guarded() as cursor:
            cursor.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            try:
                yield cursor
            except BaseException:
                with contextlib.suppress(Exception):
                    cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """A read in a transaction of its own (autocommit)."""
        with self._guarded() as cursor:
            cursor.execute(self.sql(statement), params)
            return [tuple(row) for row in cursor.fetchall()]
