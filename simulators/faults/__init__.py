"""Labelled energy fault scenarios: a virtual community's telemetry with injected faults.

`load_scenario(path)` reads a scenario YAML (see `simulators.faults.scenario`),
`generate(scenario)` yields its readings in timestamp order, `labels(scenario)` says which
faults were injected where and when (`rules.scoring.Fault`), `write_jsonl` writes the replay
format, `site_context` the site facts the rules engine needs. `scgw rules evaluate` runs the
engine over a scenario and scores it (`simulators.faults.cli`).
"""

from rules.scoring import Fault
from simulators.faults.generator import generate
from simulators.faults.placement import labels
from simulators.faults.replay import read_jsonl, site_context, write_jsonl, write_labels
from simulators.faults.scenario import Scenario, ScenarioError, load_scenario, loads_scenario

__all__ = [
    "Fault", "Scenario", "ScenarioError", "generate", "labels", "load_scenario", "loads_scenario",
    "read_jsonl", "site_context", "write_jsonl", "write_labels",
]
