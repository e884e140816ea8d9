"""`scgw import ...`: bulk loading of the directory from files (docs/import.md).

`residents` exits 0 when the file was imported (or, with --dry-run, would import cleanly),
1 when any row is refused (every refused row is printed with its line; nothing is written),
2 when it cannot run (file unreadable, no site file or database, schema not migrated).

The database comes from the site file (`--config`, default ./site.yaml), whose buildings
and floors are synced too, exactly as `scgw db upgrade --config` and `scgw run --config`
see it: an import that looked for a default `scgw.db` in the current directory refused to
run after a perfectly good `db upgrade`. `--database-url` only overrides the site file's
database; without any site file the import runs on the URL given and syncs no buildings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from gateway.access.importer import import_residents, read_csv_file, summary
from gateway.config import ConfigError, operator_settings
from gateway.store.db import is_sqlite, make_engine
from gateway.store.directory import units

app = typer.Typer(help="Import residents, units and cards from files.", no_args_is_help=True)


@app.callback()
def _import() -> None:
    """Import residents, units and cards from files."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


@app.command("residents")
def residents_command(
    file: Annotated[Path, typer.Argument(help="CSV file (columns: docs/import.md).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the file and show what would change.")
    ] = False,
    config_path: Annotated[
        Path | None,
        typer.Option("--config", "-c",
                     help="Site YAML (default ./site.yaml): its database, and its buildings "
                          "and floors are synced."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", envvar="SCGW__DATABASE__URL",
                     help="Override the site file's database (SQLAlchemy URL)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every change.")] = False,
) -> None:
    """Import units, residents and their cards; nothing is written unless every row is valid."""
    try:
        settings = operator_settings(config_path, database_url=database_url)
    except ConfigError as exc:
        raise _fail("\n".join(f"{exc.source}: {p}" for p in exc.problems)) from None
    config, url = settings.config, settings.database_url
    try:
        text = read_csv_file(file.read_bytes())
    except OSError as exc:
        raise _fail(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise _fail(f"{file}: not UTF-8 text (byte {exc.start}); save the sheet as "
                    "CSV UTF-8", 1) from None
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if not path or path == ":memory:" or not Path(path).exists():
            raise _fail(f"no database at {url}: run `scgw db upgrade` first")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(units.name):
                raise _fail("no directory tables: run `scgw db upgrade` first")
        report = import_residents(engine, text, dry_run=dry_run, config=config)
    except SQLAlchemyError as exc:
        raise _fail(f"database error: {exc.__class__.__name__}: {exc}") from None
    finally:
        engine.dispose()
    if not report.ok:
        for error in report.errors:
            typer.echo(f"{file}:{error.line}: {error.message}", err=True)
        raise _fail(f"{file}: {len(report.errors)} row(s) refused; nothing was imported", 1)
    if verbose or dry_run:
        for change in report.changes:
            typer.echo(change)
    verb = "would import" if dry_run else "imported"
    for line in summary(report):
        typer.echo(f"{file}: {verb} {line}")
