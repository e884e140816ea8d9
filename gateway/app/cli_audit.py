"""`scgw audit ...`: checks on the hash-chained access audit log.

`verify` exits 0 when the chain is intact and no decision is missing, 1 when it is broken
(naming the first bad row) or when a gateway's sequence numbers have gaps (decisions that
were numbered but never reached the log, e.g. lost in a crash), 2 when it cannot check (no
site file or database, no audit table). Print the head it
reports somewhere safe: passing it back as `--anchor ID:HASH` later also catches deleted
newest rows and a recomputed chain.

The database comes from the site file (`--config`, default ./site.yaml) like every other
operator command, so the check reads the database the gateway writes; `--database-url`
only overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gateway.config import ConfigError, OperatorSettings, operator_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

app = typer.Typer(help="Tamper-evident access audit log.", no_args_is_help=True)

ConfigPath = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Site YAML (default ./site.yaml): its database."),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="SCGW__DATABASE__URL",
        help="Override the site file's database (SQLAlchemy URL).",
    ),
]


def _settings(config_path: Path | None, database_url: str | None) -> OperatorSettings:
    try:
        return operator_settings(config_path, database_url=database_url)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"{exc.source}: {problem}", err=True)
        raise typer.Exit(2) from None


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
    from sqlalchemy import create_engine

    from gateway.store.db import is_sqlite, make_engine

    return create_engine(url) if is_sqlite(url) else make_engine(url)


@app.command("verify")
def verify_command(
    config_path: ConfigPath = None,
    database_url: DatabaseUrl = None,
    anchor: Annotated[
        str | None,
        typer.Option(help="ID:HASH of a row noted earlier; it must still be in the chain."),
    ] = None,
) -> None:
    """Check that no audit row was edited, deleted or inserted."""
    # Imported here: every other `scgw` command (a replay of a million readings, say) would
    # otherwise pay SQLAlchemy's import at start-up.
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.access.audit import audit_log, verify
    from gateway.store.db import is_sqlite

    parsed_anchor = _parse_anchor(anchor) if anchor is not None else None
    database_url = _settings(config_path, database_url).database_url
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
    if not result.ok and result.gaps:
        typer.echo(f"audit chain intact ({result.rows} rows) but decisions are MISSING:",
                   err=True)
        for gap in result.gaps:
            typer.echo(f"  {gap}", err=True)
        raise typer.Exit(1)
    if not result.ok:
        typer.echo(
            f"audit chain BROKEN at row {result.first_bad_id}: {result.problem} "
            f"({result.rows} rows before it are intact)",
            err=True,
        )
        raise typer.Exit(1)
    head = f"head {result.head_id}:{result.head_hash}" if result.rows else "empty log"
    typer.echo(f"audit chain OK: {result.rows} rows, {head}")
