"""`scgw audit ...`: checks on the hash-chained access audit log.

`verify` exits 0 when the chain is intact, 1 when it is broken (naming the first bad row),
2 when it cannot check (no database, no audit table). Print the head it reports somewhere
safe: passing it back as `--anchor ID:HASH` later also catches deleted newest rows and a
recomputed chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from gateway.access.audit import audit_log, verify
from gateway.config import DatabaseConfig
from gateway.store.db import is_sqlite, make_engine

DEFAULT_DATABASE_URL = DatabaseConfig().url

app = typer.Typer(help="Tamper-evident access audit log.", no_args_is_help=True)

DatabaseUrl = Annotated[
    str,
    typer.Option(
        "--database-url",
        envvar="SCGW__DATABASE__URL",
        help="SQLAlchemy URL of the gateway database.",
    ),
]


@app.callback()
def _audit() -> None:
    """Tamper-evident access audit log."""


def _parse_anchor(value: str) -> tuple[int, str]:
    row_id, sep, row_hash = value.partition(":")
    if not sep or not row_id.isdigit() or len(row_hash) != 64:
        raise typer.BadParameter("expected ID:HASH as printed by a previous verify")
    return int(row_id), row_hash.lower()


def _reading_engine(url: str) -> Engine:
    """On SQLite, a plain engine: make_engine's BEGIN IMMEDIATE would hold the write lock
    (and stall payments) for the whole walk; a WAL reader needs no lock at all."""
    return create_engine(url) if is_sqlite(url) else make_engine(url)


@app.command("verify")
def verify_command(
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    anchor: Annotated[
        str | None,
        typer.Option(help="ID:HASH of a row noted earlier; it must still be in the chain."),
    ] = None,
) -> None:
    """Check that no audit row was edited, deleted or inserted."""
    parsed_anchor = _parse_anchor(anchor) if anchor is not None else None
    if is_sqlite(database_url):
        path = database_url.split("///", 1)[-1]
        if not path or path == ":memory:" or not Path(path).exists():
            typer.echo(f"no database at {database_url}", err=True)
            raise typer.Exit(2)
    engine = _reading_engine(database_url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(audit_log.name):
                typer.echo("no audit table: run `scgw db upgrade` first", err=True)
                raise typer.Exit(2)
            result = verify(conn, anchor=parsed_anchor)
    except SQLAlchemyError as exc:
        typer.echo(f"cannot read the audit log: {exc.__class__.__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    if not result.ok:
        typer.echo(
            f"audit chain BROKEN at row {result.first_bad_id}: {result.problem} "
            f"({result.rows} rows before it are intact)",
            err=True,
        )
        raise typer.Exit(1)
    head = f"head {result.head_id}:{result.head_hash}" if result.rows else "empty log"
    typer.echo(f"audit chain OK: {result.rows} rows, {head}")
