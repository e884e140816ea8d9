"""`scgw rules evaluate`: how well rules find the labelled faults of a scenario.

The gateway's CLI mounts it through `register_rules(rules_app)`; `python -m
simulators.faults` offers the same command beside `generate` and `labels`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the scoring brings numpy, and every `scgw` command imports this module
    from rules.scoring import Report


def register_rules(rules_app: typer.Typer) -> None:
    """Add `evaluate` to the `scgw rules` group."""
    rules_app.command("evaluate")(evaluate)


ScenarioOpt = Annotated[Path, typer.Option("--scenario", "-s", help="Scenario YAML file.",
                                           exists=True, dir_okay=False)]
RulesOpt = Annotated[list[Path] | None, typer.Option(
    "--rules", "-r", help="Rule file (repeatable); default: the bundled rules.", exists=True,
    dir_okay=False)]


def evaluate(
    scenario: ScenarioOpt,
    rules: RulesOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    tolerance: Annotated[str, typer.Option(
        help="An alert this long before a fault's start still counts.")] = "2m",
    grace: Annotated[str, typer.Option(
        help="An alert this long after a fault's end still counts.")] = "30m",
    batch: Annotated[int, typer.Option(help="Readings per engine call.")] = 10_000,
    details: Annotated[bool, typer.Option(
        "--details", help="Also list every fault and the first false alerts per rule.")] = False,
) -> None:
    """Generate SCENARIO, run the rules over it, print precision, recall and delay per fault
    type and the false alerts per device-day on fault-free data."""
    from simulators.faults.evaluate import evaluate_scenario, load_rules
    from simulators.faults.scenario import ScenarioError, load_scenario, parse_duration

    err = Console(stderr=True)
    try:
        spec = load_scenario(scenario)
        tolerance_s = parse_duration(tolerance, "--tolerance")
        grace_s = parse_duration(grace, "--grace")
    except ScenarioError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    rule_list = load_rules(rules or [])
    result = evaluate_scenario(spec, rule_list, batch_size=batch, tolerance_s=tolerance_s,
                               grace_s=grace_s)
    if json_out:
        doc: dict[str, Any] = {"scenario": spec.name, "rules": len(rule_list),
                               "readings": result.readings,
                               "generate_s": round(result.generate_s, 2),
                               "engine_s": round(result.engine_s, 2), **result.report.to_dict()}
        typer.echo(json.dumps(doc, indent=1))
        return
    console = Console()
    if not console.is_terminal:  # piped: wide enough for the tables, no wrapping
        console = Console(width=160)
    console.print(f"scenario [bold]{spec.name}[/bold]: {result.readings:,} readings from "
                  f"{len(spec.device_kinds())} devices over {spec.duration_s / 86400:g} days, "
                  f"{len(rule_list)} rules, {result.report.faults} labelled faults "
                  f"(generate {result.generate_s:.1f} s, engine {result.engine_s:.1f} s)")
    print_report(console, result.report, details=details)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _delay(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 3600:
        return f"{value / 60:.1f} min"
    if abs(value) < 172_800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86_400:.1f} d"


def print_report(console: Console, report: Report, *, details: bool = False) -> None:
    table = Table(title="detection per fault type (* gradual: not a step fault)")
    for name, justify in (("fault type", "left"), ("n", "right"), ("detected", "right"),
                          ("recall", "right"), ("precision", "right"),
                          ("median delay", "right"), ("p90 delay", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for t in report.per_type:
        table.add_row(t.type + ("" if t.step else " *"), str(t.faults), str(t.detected),
                      _ratio(t.recall), _ratio(t.precision), _delay(t.median_delay_s),
                      _delay(t.p90_delay_s))
    table.add_section()
    table.add_row("overall (delays: step faults)", str(report.faults), str(report.detected),
                  _ratio(report.recall), _ratio(report.precision),
                  _delay(report.step_median_delay_s), _delay(report.step_p90_delay_s),
                  style="bold")
    console.print(table)
    per_day = report.fault_free_alerts_per_device_day
    console.print(
        f"alerts: {report.firings} firing = {report.tp} true + {report.collateral} collateral "
        f"(upstream of a fault) + {report.fp} false; precision {_ratio(report.precision)}, "
        f"strict {_ratio(report.precision_strict)}")
    console.print(
        f"fault-free data: {report.fault_free_alerts} false alerts over "
        f"{report.fault_free_device_days:.1f} device-days = "
        f"{'-' if per_day is None else f'{per_day:.4f}'} per device-day")
    if report.per_rule:
        rules = Table(title="per rule")
        for name in ("rule", "fired", "true", "collateral", "false", "precision", "finds"):
            rules.add_column(name, justify="left" if name in ("rule", "finds") else "right")
        for r in report.per_rule:
            finds = ", ".join(f"{k} {v}" for k, v in sorted(r.matched_types.items()))
            rules.add_row(r.rule_id, str(r.firings), str(r.tp), str(r.collateral), str(r.fp),
                          _ratio(r.precision), finds)
        console.print(rules)
    for note in report.notes:
        console.print(note)
    if details:
        faults = Table(title="faults")
        for name in ("type", "device", "start", "duration", "found by", "delay"):
            faults.add_column(name)
        for fr in report.fault_results:
            f = fr.fault
            faults.add_row(f.type, f.device_id, f"{f.start:.0f}", _delay(f.end - f.start),
                           fr.first_rule or "[red]missed[/red]", _delay(fr.delay_s))
        console.print(faults)
        for r in report.per_rule:
            for a in r.false_positives:
                console.print(f"false: {a.rule_id} {a.device_id} ts={a.ts:.0f} value={a.value}")
