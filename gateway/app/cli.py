"""The `scgw` command line (CONTRACT.md section 6)."""

from __future__ import annotations

import asyncio
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gateway.config import ConfigError, SiteConfig, file_problems, load_config

app = typer.Typer(help="scgw: the smart-community edge gateway.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema, backup and restore.", no_args_is_help=True)
app.add_typer(db_app, name="db")
err = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="Site YAML file.")]


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="Site YAML file.")]) -> None:
    """Validate a site file; print every problem with its key, line and what was expected."""
    try:
        config = load_config(path)
        problems = file_problems(config, path)
        if problems:
            raise ConfigError(str(path), problems)
        _check_profiles(config)
    except ConfigError as exc:
        err.print(f"[red]{exc.source}: {len(exc.problems)} problem(s)[/red]")
        for problem in exc.problems:
            # soft_wrap: one problem per line at any width, so it can be grepped and pasted.
            err.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"{path}: OK (site {config.site.id}, {len(config.buildings)} buildings, "
        f"{len(config.devices)} devices)"
    )
    typer.echo(f"  telemetry: {_telemetry_summary(config)}")


def _telemetry_summary(config: SiteConfig) -> str:
    """Where readings will go, so an operator sees a defaulted spool dir or a missing
    InfluxDB before the first outage does; secrets are said to be set, never shown."""
    telemetry = config.telemetry
    spool = (f"spool {config.spool_directory} (max {telemetry.spool_max_mb} MB, fsync every "
             f"{telemetry.fsync_interval_s:g} s), local store {telemetry.local_retention_days} d")
    influx = config.influxdb
    if influx is None:
        sink = "no InfluxDB (local store only)"
    elif influx.api == "v1":
        auth = f"user {influx.username}" if influx.username else "no login"
        sink = f"InfluxDB v1 {influx.url} database {influx.database} ({auth})"
    else:
        auth = "token set" if influx.token is not None else "no token"
        sink = f"InfluxDB v2 {influx.url} org {influx.org} bucket {influx.bucket} ({auth})"
    rules = ", ".join(config.rules.files) or "bundled defaults"
    return f"{spool}; {sink}; rules: {rules}"


def _check_profiles(config: SiteConfig) -> None:
    """Every Modbus device's profile must load: a bad register map fails here, not at 3 am."""
    from device_drivers.modbus.errors import ProfileError
    from device_drivers.modbus.profile import load_profile

    problems = []
    for device in config.devices:
        if device.profile is None:
            continue
        try:
            load_profile(device.profile)
        except ProfileError as exc:
            problems.append(f"device {device.device_id}: profile {device.profile!r}: {exc}")
    if problems:
        raise ConfigError("profiles", problems)


@app.command()
def run(
    config_path: ConfigPath = Path("site.yaml"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the gateway until SIGTERM or Ctrl-C."""
    from gateway.app.runtime import Gateway, run_until_signal

    _setup_logging(verbose)
    try:
        config = load_config(config_path)
        problems = file_problems(config, config_path)  # rule files, spool: fail now, not later
        if problems:
            raise ConfigError(str(config_path), problems)
        gateway = Gateway(config, freeze_after_start=True)
    except ConfigError as exc:
        err.print(f"cannot start: {exc.source}: {len(exc.problems)} problem(s)", style="red",
                  markup=False, highlight=False)
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    asyncio.run(run_until_signal(gateway))


@db_app.command("upgrade")
def db_upgrade(
    config_path: Annotated[
        Path | None, typer.Option("--config", "-c", help="Site YAML (default ./site.yaml).")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(envvar="SCGW__DATABASE__URL",
                     help="Override the site file's database (SQLAlchemy URL)."),
    ] = None,
) -> None:
    """Create or migrate the database schema to the latest revision.

    The database is the site file's, so the schema lands where `scgw run` and the import
    will look; without a site file a `--database-url` must be given, never a default.
    """
    from gateway.config import operator_settings
    from gateway.store import db

    try:
        url = operator_settings(config_path, database_url=database_url).database_url
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"{exc.source}: {problem}", err=True)
        raise typer.Exit(2) from None
    db.upgrade(url)
    typer.echo(f"schema at {db.current_revision(url)} ({db.display_url(url)})")


def _mount_subcommands() -> None:
    """Sub-apps owned by their features (canteen, audit, import), then plugins.

    Commands that sit above the gateway (`scgw demo`, `scgw simulate` from the simulators)
    register through the `scgw.cli` entry-point group, so the gateway never imports them
    and a production install without the simulators simply lacks those commands.
    """
    from gateway.app.cli_audit import app as audit_app
    from gateway.app.cli_canteen import app as canteen_app
    from gateway.app.cli_db import register as register_db
    from gateway.app.cli_import import app as import_app
    from gateway.app.cli_mqtt import register as register_mqtt_config
    from gateway.app.cli_ops import register as register_systemd_unit
    from gateway.app.cli_rules import app as rules_app
    from gateway.app.cli_users import app as users_app

    register_db(db_app)  # `scgw db backup` / `scgw db restore`
    app.add_typer(canteen_app, name="canteen")
    app.add_typer(audit_app, name="audit")
    app.add_typer(import_app, name="import")
    register_mqtt_config(app)  # `scgw mqtt-config`
    register_systemd_unit(app)  # `scgw systemd-unit`
    app.add_typer(rules_app, name="rules")
    app.add_typer(users_app, name="users")
    for plugin in entry_points(group="scgw.cli"):
        try:
            register = plugin.load()
        except ImportError as exc:  # an optional extra that is not installed
            logging.getLogger(__name__).debug("CLI plugin %s unavailable: %s", plugin.name, exc)
            continue
        register(app)


def _invoked_command(argv: list[str]) -> str | None:
    """The sub-command of this process's command line, if it is `scgw` (or `python -m`)."""
    program = Path(argv[0]).name if argv else ""
    if program not in ("scgw", "cli.py"):  # the console script, `python -m gateway.app.cli`
        return None  # imported by a test or a tool: everything is mounted
    return next((arg for arg in argv[1:] if not arg.startswith("-")), None)


# `scgw run` is the one long-lived command: it does not pay for the operator tools and the
# simulators' commands (2 MB of the gateway's resident memory, docs/benchmarks.md).
if _invoked_command(sys.argv) != "run":
    _mount_subcommands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
