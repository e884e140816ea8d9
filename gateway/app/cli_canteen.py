"""`scgw canteen ...`: the day's reconciliation and settlement reports, as CSV.

`settle` cross-checks its totals against the revenue account's entries and exits 1 if they
differ, so a settlement that does not match the ledger is never handed over silently.
Exit 2 means the report could not be made (no site file or database, no ledger tables, bad
option).

The database and the time zone the day is counted in come from the site file (`--config`,
default ./site.yaml; `site.timezone`), the same ones the gateway uses; `--database-url` and
`--tz` only override them. There is no built-in default: a settlement of the wrong database,
or of a UTC day instead of the site's, would look plausible and be wrong. A settlement reads
one snapshot of the ledger (REPEATABLE READ on PostgreSQL), so it never reports a false
mismatch for a day still receiving postings.
"""

from __future__ import annotations

from datetime import date, tzinfo
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from gateway.canteen import reports
from gateway.canteen.tables import canteen_journal
from gateway.config import ConfigError, operator_settings
from gateway.store.db import is_sqlite, make_engine

app = typer.Typer(help="Canteen ledger: reconciliation and settlement.", no_args_is_help=True)

ConfigPath = Annotated[
    Path | None,
    typer.Option("--config", "-c",
                 help="Site YAML (default ./site.yaml): its database and time zone."),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="SCGW__DATABASE__URL",
                 help="Override the site file's database (SQLAlchemy URL)."),
]
Day = Annotated[str, typer.Option("--date", help="Calendar day, YYYY-MM-DD.")]
TimeZone = Annotated[
    str | None,
    typer.Option("--tz", envvar="SCGW__SITE__TIMEZONE",
                 help="Override the site's IANA time zone the day is counted in."),
]
Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the CSV here instead of stdout.")
]


def _site(
    config_path: Path | None, database_url: str | None, tz: str | None
) -> tuple[str, tzinfo, str]:
    """The database URL, the zone and a label naming where they came from."""
    try:
        settings = operator_settings(config_path, database_url=database_url, timezone=tz,
                                     need_timezone=True)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"{exc.source}: {problem}", err=True)
        raise typer.Exit(2) from None
    assert settings.timezone is not None  # need_timezone: given, or from the site file
    site = f"site {settings.site_id}, " if settings.site_id else ""
    return settings.database_url, _parse_tz(settings.timezone), f"{site}{settings.timezone}"


@app.callback()
def _canteen() -> None:
    """Canteen ledger: reconciliation and settlement."""


def _parse_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date (YYYY-MM-DD)",
                                 param_hint="--date") from None


def _parse_tz(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise typer.BadParameter(f"unknown time zone {name!r}", param_hint="--tz") from None


def _engine(url: str) -> Engine:
    """make_engine even for reading: on SQLite its BEGIN IMMEDIATE gives the settlement and
    its cross-check one snapshot (holding the write lock for a few milliseconds)."""
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if not path or path == ":memory:" or not Path(path).exists():
            typer.echo(f"no database at {url}", err=True)
            raise typer.Exit(2)
    return make_engine(url)


def _connect(engine: Engine) -> Connection:
    conn = engine.connect()
    present = inspect(conn).has_table(canteen_journal.name)
    conn.rollback()
    if not present:
        conn.close()
        typer.echo("no canteen ledger tables: run `scgw db upgrade` first", err=True)
        raise typer.Exit(2)
    return conn


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


@app.command("reconcile")
def reconcile_command(
    day: Day, config_path: ConfigPath = None, database_url: DatabaseUrl = None,
    tz: TimeZone = None, output: Output = None,
) -> None:
    """Offline sales posted that day that their purse could not cover, with the shortfall."""
    when = _parse_day(day)
    database_url, zone, label = _site(config_path, database_url, tz)
    engine = _engine(database_url)
    try:
        with _connect(engine) as conn:
            rows = reports.reconcile(conn, when, zone)
    except SQLAlchemyError as exc:
        typer.echo(f"cannot read the ledger: {exc.__class__.__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    _emit(reports.reconcile_csv(rows), output)
    total = sum(r.shortfall_cents for r in rows)
    typer.echo(f"{when} ({label}): {len(rows)} uncovered offline payment(s), "
               f"shortfall {total} cents", err=True)


@app.command("settle")
def settle_command(
    day: Day, config_path: ConfigPath = None, database_url: DatabaseUrl = None,
    tz: TimeZone = None, output: Output = None,
) -> None:
    """Per-terminal sales, refunds and net for the day; the TOTAL row equals the ledger."""
    when = _parse_day(day)
    database_url, zone, label = _site(config_path, database_url, tz)
    engine = _engine(database_url)
    try:
        _connect(engine).close()  # the ledger tables are there
        with reports.snapshot(engine) as conn:
            # One snapshot (REPEATABLE READ on PostgreSQL): the rows and the cross-check see
            # the same postings even while the day is still receiving them.
            rows = reports.settle(conn, when, zone)
            ledger_net = reports.revenue_on(conn, when, zone)
    except SQLAlchemyError as exc:
        typer.echo(f"cannot read the ledger: {exc.__class__.__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    _emit(reports.settlement_csv(when, rows), output)
    net = sum(r.net_cents for r in rows)
    if net != ledger_net:
        typer.echo(f"settlement total {net} != ledger revenue {ledger_net} cents", err=True)
        raise typer.Exit(1)
    typer.echo(f"{when} ({label}): {len(rows)} terminal(s), net {net} cents, equals the ledger",
               err=True)
