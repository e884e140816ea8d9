"""kill -9 of the process applying payments, at random moments, hundreds of times.

A fork server (tests.ledger_stress_worker) spawns a payment worker; the client sends a
burst, lets a random number of answers through, SIGKILLs the worker somewhere inside the
next payment (deciding, writing or committing), restarts it and re-sends everything that
was not answered plus a few that were. At the end every payment has an answer, every
answer to a retry equals the first one, and the ledger holds exactly the debits that were
answered as approved (or as covered part of an offline shortfall) and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.store.db import make_engine, upgrade
from tests.ledger_stress_worker import run_kill_trials, verify_kill_run

TRIALS = int(os.environ.get("SCGW_KILL_TRIALS", "200"))


@pytest.mark.parametrize("group", [1, 8], ids=["one-per-commit", "group-commit"])
def test_payments_survive_sigkill_exactly_once(
    database_url: str, tmp_path: Path, group: int
) -> None:
    upgrade(database_url)
    trials = TRIALS if group == 1 else TRIALS // 4
    report = run_kill_trials(database_url, trials, seed=group, group=group, workdir=tmp_path)
    assert report.trials == trials
    answers = [seen[0] for seen in report.answers.values()]
    assert len(answers) == len(report.amounts)
    # The stream must exercise every outcome, and kills must land between answers.
    assert any(a["approved"] for a in answers)
    assert any(a["reason"] == "insufficient_funds" and not a.get("shortfall_cents")
               for a in answers)
    assert any(a.get("shortfall_cents") for a in answers)
    assert any(a["reason"] == "unknown_card" for a in answers)
    assert any(len(seen) > 1 for seen in report.answers.values())
    if group == 1:
        assert report.partial_trials > 0
    engine = make_engine(database_url)
    try:
        assert verify_kill_run(engine, report) == []
    finally:
        engine.dispose()
