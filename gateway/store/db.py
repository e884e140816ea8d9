"""Engines and schema migration.

SQLite gets WAL and `synchronous=FULL` so a committed payment survives a power cut, and a
busy timeout so concurrent writers queue instead of failing. PostgreSQL is used as is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url

from gateway.db_url import SQLITE_PRAGMAS, SQLITE_TIMEOUT_S

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# Gateways sharing one PostgreSQL database may start together; the first to take this
# advisory lock migrates, the others then find the schema at head (their upgrade is a no-op).
_MIGRATION_LOCK = 734913

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine configured for the gateway's durability needs."""
    if is_sqlite(url):
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_TIMEOUT_S, "check_same_thread": False},
            **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Autocommit at the driver level so SQLAlchemy's BEGIN below is the only one.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            for pragma in SQLITE_PRAGMAS:
                cursor.execute(pragma)
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: a read-then-write transaction (a
            # debit checking the balance) can never be overtaken by another writer.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if "application_name" not in make_url(url).query:  # names us in pg_stat_activity
        kwargs["connect_args"] = {"application_name": "scgw", **kwargs.get("connect_args", {})}
    return create_engine(url, pool_pre_ping=True, **kwargs)


def alembic_config(url: str) -> Config:
    # alembic is imported only where the schema is touched: the telemetry worker and the
    # CLI's other commands never pay its ~10 MB.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database schema to `revision` (idempotent, safe to run concurrently)."""
    from alembic import command

    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        command.upgrade(alembic_config(url), revision)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_MIGRATION_LOCK})")
            try:
                command.upgrade(alembic_config(url), revision)
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK})")
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The revision the database is at; several heads (a branched history) joined by '+'.

    Never raises for several heads: it reports what is there, so a database stamped by an
    old branched history can still be inspected.
    """
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
    finally:
        engine.dispose()
    return "+".join(sorted(heads)) or None


def display_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def read_engine(engine: Engine) -> Engine:
    """An engine for reading the store whose SQLite transactions are deferred.

    The gateway's engine begins every SQLite transaction IMMEDIATE (right for a debit), so a
    series over a month or the latest-values refresh would hold the write lock and stall
    canteen payments and the telemetry worker for as long as it reads. In WAL mode a deferred
    read gets a consistent snapshot without blocking any writer. Same engine for PostgreSQL
    and in-memory SQLite (where a second engine would be another database). The caller
    disposes what it got when it is not `engine`.
    """
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return engine
    reader = create_engine(engine.url, connect_args={"timeout": SQLITE_TIMEOUT_S,
                                                     "check_same_thread": False})

    @event.listens_for(reader, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA query_only=ON")

    @event.listens_for(reader, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    return reader
