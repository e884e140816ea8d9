"""Labelled energy fault scenarios: a virtual community's telemetry with injected faults.

`load_scenario(path)` reads a scenario YAML (see `simulators.faults.scenario`),
`generate(scenario)` yields its readings in timestamp order, `labels(scenario)` says which
faults were injected where and when (`rules.scoring.Fault`), `write_jsonl` writes the replay
format, `site_context` the site facts the rules engine needs. `scgw rules evaluate` runs the
engine over a scenario and scores it (`simulators.faults.cli`).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rules.scoring import Fault
    from simulators.faults.generator import generate
    from simulators.faults.placement import labels
    from simulators.faults.replay import read_jsonl, site_context, write_jsonl, write_labels
    from simulators.faults.scenario import (
        Scenario,
        ScenarioError,
        load_scenario,
        loads_scenario,
    )

_HOMES = {
    "Fault": "rules.scoring", "generate": "simulators.faults.generator",
    "labels": "simulators.faults.placement", "read_jsonl": "simulators.faults.replay",
    "site_context": "simulators.faults.replay", "write_jsonl": "simulators.faults.replay",
    "write_labels": "simulators.faults.replay", "Scenario": "simulators.faults.scenario",
    "ScenarioError": "simulators.faults.scenario", "load_scenario": "simulators.faults.scenario",
    "loads_scenario": "simulators.faults.scenario",
}


def __getattr__(name: str) -> Any:
    """Imported on first use: the generator brings numpy, and `scgw` (the gateway process
    included) imports `simulators.faults.cli`, a module of this package, at every start."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "Fault", "Scenario", "ScenarioError", "generate", "labels", "load_scenario", "loads_scenario",
    "read_jsonl", "site_context", "write_jsonl", "write_labels",
]
