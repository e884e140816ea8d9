"""`scgw demo`: registered on the gateway's CLI through the `scgw.cli` entry point."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    data_dir: Annotated[Path, typer.Option(help="Where demo.json and the database go.")] = Path(
        ".demo"
    ),
    port: Annotated[int, typer.Option(help="API port (0 picks a free one).")] = 8000,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: run until Ctrl-C).")
    ] = None,
    influxdb_url: Annotated[
        str | None, typer.Option(help="Also write telemetry to this InfluxDB 1.x (/write).")
    ] = None,
    broker: Annotated[
        str, typer.Option(help="auto (Mosquitto if installed, else the embedded amqtt), "
                          "mosquitto or amqtt. Either way logins are required.")
    ] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """A whole virtual community on this machine: broker, simulators, gateway, API."""
    from simulators.demo.community import run_demo

    if broker not in ("auto", "mosquitto", "amqtt"):
        raise typer.BadParameter("auto, mosquitto or amqtt", param_hint="--broker")

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    asyncio.run(run_demo(data_dir, port, duration, announce=typer.echo, influxdb_url=influxdb_url,
                         broker_kind=broker))
