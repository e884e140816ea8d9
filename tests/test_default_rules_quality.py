"""The bundled default rules meet the quality bar of issue 10 on data generated here.

A short two-building scenario with several faults of every type the defaults are meant to
find (placed from a fixed seed by the scenario generator, as the bundled scenarios are)
and a fault-free one are generated and scored through the same code path as
`scgw rules evaluate` (`simulators.faults.evaluate.evaluate_scenario`).

Slow drift is on hvac units that run every day (lobby, gym) and fast enough (6-8 % a day
for under two days, +10-15 % at its end) to pass `hvac-base-power-drift`'s +8 % within the
short scenario; a fresh-air unit's drift below +40 % is a documented limit
(`fan-power-drift`). Clogging filters here load fast (25-35 % a day: dust from a building
site next door) so that they reach the alert within the short scenario.

The faults stay inside what docs/rules.md says the defaults see, so that a miss here is a
regression rather than a documented limit: stuck readings last at least 2.5 h
(`unit-temperature-stuck` needs 2 h unchanged), spikes are on hvac, fresh-air units and
meters (kind ceilings cannot see a spike on a 50 W purifier without its rated power) and
counter jumps exceed the 3.5 kWh hvac margin. The bundled scenarios, with the generator's
full ranges, give the figures of the whole envelope (`scgw rules evaluate`).
"""

from __future__ import annotations

import pytest

from simulators.faults import loads_scenario

pytest.importorskip("rules.engine")

BUILDINGS = """
timezone: Asia/Shanghai
reporting: {interval: 60s, jitter: 2s, loss: 0.001, blips_per_week: 1, blip_max: 6m}
weather: {mean_c: 11, trend_c_per_day: 0.2, amplitude_c: 4.5, day_sd_c: 2, pm25_mean: 45}
events: {early_start_per_week: 1, off_day_per_month: 1, setpoint_change_per_week: 1}
buildings:
  - {id: b1, template: standard, households: 96, hvac: [lobby, gym], fresh_air: 2,
     air_purifiers: 2}
  - {id: b2, template: standard, households: 120, residential_submeters: 2,
     hvac: [lobby, office], fresh_air: 1, air_purifiers: 2}
"""

FAULTY = """
name: quality-faults
seed: 1010
start: 2026-03-09T00:00:00+08:00
duration: 9d
""" + BUILDINGS + """
random_faults:
  - {type: spike, count: 4, devices: ["hvac-*", "fa-*", "meter-*"]}
  - {type: stuck_sensor, count: 6, duration: [2h30m, 6h]}
  - {type: after_hours, count: 4}
  - {type: counter_reset, count: 4}
  - {type: counter_jump, count: 4, magnitude: [4000, 100000]}
  - {type: dropout, count: 4}
  - {type: submeter_mismatch, count: 3}
  - {type: clogging_filter, count: 3, magnitude: [0.25, 0.35]}
  - {type: slow_drift, count: 3, devices: ["hvac-*-lobby", "hvac-*-gym"], duration: [40h, 44h],
     magnitude: [0.06, 0.08]}
"""

FAULT_FREE = """
name: quality-fault-free
seed: 2020
start: 2026-03-16T00:00:00+08:00
duration: 7d
""" + BUILDINGS


def test_default_rules_meet_the_quality_bar() -> None:
    from simulators.faults.evaluate import evaluate_scenario, load_rules

    rules = load_rules([])
    faulty = evaluate_scenario(loads_scenario(FAULTY), rules).report.to_dict()
    overall = faulty["overall"]
    assert overall["faults"] >= 25
    types = {t["type"]: t for t in faulty["per_type"] if t["faults"]}
    assert len(types) == 9, sorted(types)
    missed = [(f["type"], f["device_id"]) for f in faulty["faults"] if not f["detected"]]
    assert overall["precision"] >= 0.9, faulty["per_rule"]
    assert overall["recall"] >= 0.9, missed
    assert min(t["recall"] for t in types.values()) >= 0.8, missed
    assert overall["step_median_delay_s"] <= 600

    clean = evaluate_scenario(loads_scenario(FAULT_FREE), rules).report.to_dict()
    assert clean["fault_free"]["device_days"] > 100
    assert clean["fault_free"]["alerts_per_device_day"] < 0.05, clean["per_rule"]
