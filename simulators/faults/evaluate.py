"""Run the rules engine over a scenario and score its alerts against the labels."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from device_drivers.vocabulary import Reading
from rules.model import Rule, Transition
from rules.scoring import DEFAULT_GRACE_S, DEFAULT_TOLERANCE_S, Report, score
from simulators.faults.generator import generate
from simulators.faults.placement import labels
from simulators.faults.replay import site_context
from simulators.faults.scenario import Scenario

BATCH: int = 10_000


@dataclass(frozen=True, slots=True)
class Evaluation:
    report: Report
    transitions: tuple[Transition, ...]
    readings: int
    generate_s: float
    engine_s: float


def load_rules(paths: Sequence[Path]) -> list[Rule]:
    """The rules of these files, or the bundled defaults when none are given."""
    from rules.loader import default_rules, load_rule_files

    if not paths:
        return default_rules()
    return load_rule_files([(str(p), p.read_text(encoding="utf-8")) for p in paths])


def evaluate_scenario(scenario: Scenario, rules: Sequence[Rule], *, batch_size: int = BATCH,
                      tolerance_s: float = DEFAULT_TOLERANCE_S,
                      grace_s: float = DEFAULT_GRACE_S) -> Evaluation:
    """Generate the scenario, feed the engine in time-ordered batches, score the result."""
    from rules.engine import Engine

    engine = Engine(list(rules), site_context(scenario))
    transitions: list[Transition] = []
    batch: list[Reading] = []
    count = 0
    engine_s = 0.0
    started = time.perf_counter()
    for reading in generate(scenario):
        batch.append(reading)
        if len(batch) >= batch_size:
            t = time.perf_counter()
            transitions.extend(engine.process(batch))
            engine_s += time.perf_counter() - t
            count += len(batch)
            batch = []
    if batch:
        t = time.perf_counter()
        transitions.extend(engine.process(batch))
        engine_s += time.perf_counter() - t
        count += len(batch)
    total_s = time.perf_counter() - started
    report = score(transitions, labels(scenario), scenario.device_kinds(),
                   (scenario.t0, scenario.t1), tolerance_s=tolerance_s, grace_s=grace_s)
    return Evaluation(report, tuple(transitions), count, total_s - engine_s, engine_s)
