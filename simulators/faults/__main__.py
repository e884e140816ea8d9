"""`python -m simulators.faults`: generate a scenario's readings and labels, or evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from simulators.faults.cli import evaluate

app = typer.Typer(help="Labelled energy fault scenarios.", no_args_is_help=True)
app.command("evaluate")(evaluate)

ScenarioArg = Annotated[Path, typer.Argument(help="Scenario YAML file.", exists=True,
                                             dir_okay=False)]


@app.command("generate")
def generate_cmd(
    scenario: ScenarioArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Readings, JSON lines.")],
    labels_out: Annotated[Path | None, typer.Option("--labels", help="Labels, JSON.")] = None,
) -> None:
    """Write the scenario's readings in the replay format (CONTRACT.md section 6)."""
    from simulators.faults import generate, load_scenario, write_jsonl, write_labels

    spec = load_scenario(scenario)
    started = time.perf_counter()
    count = write_jsonl(generate(spec), out)
    took = time.perf_counter() - started
    if labels_out is not None:
        write_labels(spec, labels_out)
    typer.echo(f"{out}: {count:,} readings in {took:.1f} s ({count / max(took, 1e-9):,.0f}/s)")


@app.command("labels")
def labels_cmd(scenario: ScenarioArg) -> None:
    """Print the scenario's fault labels as JSON."""
    from simulators.faults.replay import labels_document
    from simulators.faults.scenario import load_scenario

    typer.echo(json.dumps(labels_document(load_scenario(scenario)), indent=1))


@app.command("site")
def site_cmd(scenario: ScenarioArg) -> None:
    """Print the scenario's buildings and devices as a site-file fragment."""
    from simulators.faults.replay import site_yaml
    from simulators.faults.scenario import load_scenario

    typer.echo(site_yaml(load_scenario(scenario)), nl=False)


if __name__ == "__main__":
    app()
