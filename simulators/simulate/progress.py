"""What a running simulation shows: a live table on a terminal, a plain summary otherwise."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from zoneinfo import ZoneInfo

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from simulators.simulate.runner import Stats


def _clock(ts: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts, tz).strftime("%a %Y-%m-%d %H:%M:%S %Z")


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "-"


def lines(stats: Stats, tz: ZoneInfo) -> list[tuple[str, str]]:
    """The figures, as (label, value) rows: the same for the live table and the summary."""
    if stats.end is not None and stats.end > stats.start:
        share = min(1.0, (stats.now - stats.start) / (stats.end - stats.start))
        progress = f"{share:.0%} of {(stats.end - stats.start) / 3600:.1f} h"
    else:
        progress = f"{(stats.now - stats.start) / 3600:.2f} h (until stopped)"
    return [
        ("simulated clock", f"{_clock(stats.now, tz)}  ({progress})"),
        ("devices connected", str(stats.devices)),
        ("messages published", _counts(stats.published)),
        ("access decisions", f"granted {stats.decisions['granted']}, denied "
                             f"{stats.decisions['denied']}"
                             + (f" ({_counts(stats.denials)})" if stats.denials else "")),
        ("canteen sales", _counts(stats.payments)
         + f"; spent {stats.spent_cents / 100:.2f}"),
        ("offline uploads", _counts(stats.batch)),
        ("top-ups", f"{stats.topups} ({stats.topup_cents / 100:.2f})"),
        ("alerts seen", f"{sum(stats.alerts.values())} firing, {stats.resolved} resolved"
                        + (f": {_counts(stats.alerts)}" if stats.alerts else "")),
        ("errors", _counts(stats.errors)),
    ]


def render(stats: Stats, tz: ZoneInfo, title: str) -> Group:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for label, value in lines(stats, tz):
        table.add_row(label, value)
    return Group(Text(title, style="bold"), table)


def summary(stats: Stats, tz: ZoneInfo) -> str:
    return "\n".join(f"{label}: {value}" for label, value in lines(stats, tz))


@contextlib.asynccontextmanager
async def display(stats: Stats, tz: ZoneInfo, title: str,
                  console: Console | None = None) -> AsyncIterator[None]:
    """A live view on a terminal (refreshed 4 times a second); nothing otherwise, the
    caller prints `summary` at the end."""
    console = console or Console()
    if not console.is_terminal:
        yield
        return
    with Live(render(stats, tz, title), console=console, refresh_per_second=4,
              transient=False) as live:
        async def refresh() -> None:
            while True:
                live.update(render(stats, tz, title))
                await asyncio.sleep(0.25)

        task = asyncio.create_task(refresh(), name="simulate-progress")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            live.update(render(stats, tz, title))
