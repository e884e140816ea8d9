"""`scgw demo`: registered on the gateway's CLI through the `scgw.cli` entry point."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command()(demo)


class DemoRunning(Exception):
    """Another `scgw demo` holds the data directory."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold DIR/.lock for the demo's life.

    A second demo in the same directory used to delete and re-migrate the database under
    the running one. flock, not a pid file: the kernel drops the lock when the holder dies,
    even by kill -9, so a crash never leaves the directory blocked. The descriptor is not
    inherited (Python's default), so the broker and workers never hold it past the demo.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DemoRunning(
                f"scgw demo: another demo (pid {holder}) is running in {data_dir}; stop it "
                f"or pass another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # A killed demo's demo.json names a broker and API that are gone: not until this
        # demo writes its own.
        (data_dir / "demo.json").unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


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
    """A whole virtual community on this machine: broker, simulators, gateway, API.

    One demo per --data-dir; Ctrl-C or SIGTERM stops all of it.
    """
    from simulators.demo.community import run_demo

    if broker not in ("auto", "mosquitto", "amqtt"):
        raise typer.BadParameter("auto, mosquitto or amqtt", param_hint="--broker")

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        with data_dir_lock(data_dir):
            asyncio.run(run_demo(data_dir, port, duration, announce=typer.echo,
                                 influxdb_url=influxdb_url, broker_kind=broker))
    except DemoRunning as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # a second Ctrl-C during the shutdown: no traceback either
        typer.echo("scgw demo interrupted", err=True)
        raise typer.Exit(130) from None
