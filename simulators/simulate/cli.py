"""`scgw simulate`: registered on the gateway's CLI through the `scgw.cli` entry point."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import typer

if TYPE_CHECKING:
    from simulators.simulate.spec import Spec

STAFF_PASSWORD_ENV = "SCGW_SIM_STAFF_PASSWORD"  # noqa: S105 (the name of a variable)


def register(app: typer.Typer) -> None:
    app.command()(simulate)


def _broker(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise typer.BadParameter("mqtt://HOST[:PORT] (TLS: run a local bridge)",
                                 param_hint="--mqtt")
    return parts.hostname, parts.port or 1883


def simulate(
    scenario: Annotated[Path, typer.Option(help="Community scenario YAML (docs/simulate.md).")],
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    speed: Annotated[float, typer.Option(help="Simulated seconds per wall second "
                                         "(60: an hour a minute).", min=0.01)] = 60.0,
    mqtt: Annotated[str, typer.Option(help="Broker URL.")] = "mqtt://127.0.0.1:1883",
    credentials: Annotated[Path | None, typer.Option(
        help="credentials.json of `scgw mqtt-config`: each device logs in as itself.")] = None,
    duration: Annotated[str | None, typer.Option(
        help="Simulated time to run (90s, 2h, 1d); default: the scenario's.")] = None,
    phones: Annotated[Path | None, typer.Option(
        help="JSON {resident_id: {credential_id, secret (hex)}}: residents also use phones.")]
        = None,
    api: Annotated[str | None, typer.Option(
        help=f"Gateway API for canteen top-ups, with --staff-user and ${STAFF_PASSWORD_ENV}.")]
        = None,
    staff_user: Annotated[str | None, typer.Option(help="Staff login for top-ups.")] = None,
    export: Annotated[Path | None, typer.Option(
        help="Write DIR/site-devices.yaml and DIR/residents.csv for this scenario and exit.")]
        = None,
    check: Annotated[bool, typer.Option("--check", help="Only validate the scenario.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Play a whole virtual community against a broker and gateway, faster than real time."""
    from simulators.faults.scenario import ScenarioError, parse_duration
    from simulators.simulate.spec import SpecError, load_spec

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        spec = load_spec(scenario)
    except SpecError as exc:
        for problem in exc.problems:
            typer.echo(problem, err=True)
        raise typer.Exit(2) from None
    if seed is not None:
        spec = replace(spec, seed=seed)
    if check:
        typer.echo(f"{scenario}: ok")
        return
    if export is not None:
        _export(spec, export)
        return
    try:
        duration_s = None if duration is None else parse_duration(duration, "--duration")
    except ScenarioError as exc:
        raise typer.BadParameter(str(exc), param_hint="--duration") from None
    host, port = _broker(mqtt)
    password = os.environ.get(STAFF_PASSWORD_ENV)
    if api is not None and (staff_user is None or not password):
        raise typer.BadParameter(f"top-ups need --staff-user and ${STAFF_PASSWORD_ENV}",
                                 param_hint="--api")
    try:
        code = asyncio.run(_run(spec, host, port, credentials, speed, duration_s, phones,
                                (api, staff_user or "", password or "") if api else None))
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _export(spec: Spec, out: Path) -> None:
    import yaml

    from simulators.simulate.site import residents_csv, site_dict

    out.mkdir(parents=True, exist_ok=True)
    (out / "site-devices.yaml").write_text(
        "# buildings and devices of the scenario: merge into the site file\n"
        + yaml.safe_dump(site_dict(spec), sort_keys=False), encoding="utf-8")
    (out / "residents.csv").write_text(residents_csv(spec), encoding="utf-8")
    typer.echo(f"wrote {out / 'site-devices.yaml'} and {out / 'residents.csv'} "
               f"(scgw import residents {out / 'residents.csv'} --config site.yaml)")


async def _run(spec: Spec, host: str, port: int, credentials: Path | None, speed: float,
               duration_s: float | None, phones_file: Path | None,
               staff: tuple[str, str, str] | None) -> int:
    import contextlib

    import aiomqtt
    from rich.console import Console

    from simulators.simulate.devices import Logins, load_phones
    from simulators.simulate.progress import display, summary
    from simulators.simulate.runner import Simulation
    from simulators.simulate.staff import staff_topups

    try:
        logins = Logins.from_file(credentials) if credentials else Logins.anonymous()
        phones = load_phones(phones_file) if phones_file else {}
    except (OSError, ValueError, KeyError) as exc:
        typer.echo(f"cannot read {credentials or phones_file}: {exc}", err=True)
        return 2
    sim = Simulation(spec, host, port, logins, speed=speed, duration_s=duration_s,
                     phones=phones)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    console = Console()
    title = f"scgw simulate {spec.name} (seed {spec.seed}, x{speed:g}) on {host}:{port}"
    try:
        async with contextlib.AsyncExitStack() as stack:
            if staff is not None:
                sim.topup = await stack.enter_async_context(staff_topups(*staff))
            async with display(sim.stats, spec.tz, title, console):
                await sim.run(stop)
    except aiomqtt.MqttError as exc:
        typer.echo(f"cannot connect to the broker at {host}:{port}: {exc} (a broker with "
                   "logins needs --credentials)", err=True)
        return 1
    if not console.is_terminal:
        sys.stdout.write(summary(sim.stats, spec.tz) + "\n")
    return 0
