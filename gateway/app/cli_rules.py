"""`scgw rules ...`: check rule files, replay recorded readings (CONTRACT.md section 6).

`check FILE...` exits 0 when every file is valid, 1 listing every problem (file, line, rule
id, key), 2 when a file cannot be read. `replay` runs the engine the live gateway runs
(rules.engine.Engine, with the site's calendars, time zone and devices when `--config` is
given) over JSON lines of readings and prints the alert transitions as JSON lines on stdout;
bad input lines are reported on stderr with their line number and skipped (exit 1 at the
end when there were any). `evaluate` comes from the simulators (the `scgw.cli.rules` entry
point group), which own the labelled scenarios.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.config import ConfigError, SiteConfig, load_config
from gateway.telemetry.rules_site import load_rule_set, site_context
from gateway.telemetry.worker_config import WorkerConfig
from rules.loader import RuleFileError

app = typer.Typer(help="Anomaly rules: check files, replay recordings.", no_args_is_help=True)

@app.callback()
def _rules() -> None:
    """Anomaly rules: check files, replay recordings."""


def _fail(problems: list[str], code: int) -> typer.Exit:
    for problem in problems:
        typer.echo(problem, err=True)
    return typer.Exit(code)


@app.command()
def check(files: Annotated[list[Path], typer.Argument(help="Rule files (YAML).")]) -> None:
    """Validate rule files; print every problem with file, line, rule id and key."""
    try:
        rules = load_rule_set(files)
    except OSError as exc:
        raise _fail([f"{exc.filename}: cannot read: {exc.strerror}"], 2) from None
    except RuleFileError as exc:
        raise _fail([*exc.problems, f"{len(exc.problems)} problem(s)"], 1) from None
    typer.echo(f"OK: {len(rules)} rules in {len(files)} file(s)")


def _site(config_path: Path | None) -> SiteConfig | None:
    if config_path is None:
        return None
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise _fail([f"{exc.source}: {p}" for p in exc.problems], 2) from None


@app.command()
def replay(
    readings: Annotated[Path, typer.Option("--readings", help="JSON lines, '-' for stdin.")],
    rules_files: Annotated[list[Path] | None, typer.Option(
        "--rules", help="Rule file (repeatable); default: the bundled rules.")] = None,
    config_path: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Site YAML: time zone, calendars, devices.")] = None,
) -> None:
    """Run the live gateway's engine over recorded readings; print alert transitions."""
    config = _site(config_path)
    try:
        rule_set = load_rule_set(rules_files or (config.rules.files if config else []))
    except OSError as exc:
        raise _fail([f"{exc.filename}: cannot read: {exc.strerror}"], 2) from None
    except RuleFileError as exc:
        raise _fail(exc.problems, 2) from None
    # Here, not at the top: the engine brings numpy, and every `scgw` command (`scgw run`
    # included, whose process never evaluates rules) imports this module.
    from gateway.app.rules_replay import replay_stream
    from rules.engine import Engine

    engine = Engine(rule_set, site_context(WorkerConfig.from_site(config) if config else None))
    kinds = {d.device_id: d.kind for d in config.devices} if config else {}
    try:
        source: Any = sys.stdin if str(readings) == "-" else readings.open(encoding="utf-8")
    except OSError as exc:
        raise _fail([f"{readings}: cannot read: {exc.strerror}"], 2) from None
    with source:
        count, bad, emitted = replay_stream(source, engine, kinds, sys.stdout, sys.stderr)
    typer.echo(f"{count} readings, {emitted} transitions, {bad} bad lines", err=True)
    if bad:
        raise typer.Exit(1)


def _mount_plugins() -> None:
    """`scgw rules evaluate` and any other rules command owned above the gateway."""
    for plugin in entry_points(group="scgw.cli.rules"):
        try:
            register = plugin.load()
        except ImportError as exc:
            logging.getLogger(__name__).debug("rules plugin %s unavailable: %s", plugin.name, exc)
            continue
        register(app)


_mount_plugins()
