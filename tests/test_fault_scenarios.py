"""simulators.faults: scenario files, the deterministic generator, its labels, evaluate."""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from device_drivers.vocabulary import Reading
from rules.scoring import FAULT_TYPES, Fault
from simulators.faults import (
    Scenario,
    ScenarioError,
    generate,
    labels,
    load_scenario,
    loads_scenario,
    read_jsonl,
    site_context,
    write_jsonl,
)
from simulators.faults.generator import Generator
from simulators.faults.scenario import parse_duration

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"

BASE = """
seed: {seed}
start: 2026-03-09T00:00:00+08:00
duration: 2d
timezone: Asia/Shanghai
buildings:
  - id: b1
    template: standard
    households: 60
    residential_submeters: 2
    hvac: [lobby, office]
    fresh_air: 1
    air_purifiers: 1
"""

FAULTS = """
faults:
  - {type: stuck_sensor, device: hvac-b1-lobby, start: "2026-03-09T10:00:00+08:00",
     duration: 2h, metric: power_w}
  - {type: stuck_sensor, device: meter-b1-main, start: "2026-03-10T03:00:00+08:00",
     duration: 1h, metric: all}
  - {type: spike, device: hvac-b1-office, start: "2026-03-09T15:00:00+08:00", duration: 6m,
     magnitude: 4}
  - {type: after_hours, device: hvac-b1-lobby, start: "2026-03-09T23:00:00+08:00",
     duration: 5h}
  - {type: counter_reset, device: meter-b1-res1, start: "2026-03-09T12:00:00+08:00",
     magnitude: 0}
  - {type: counter_jump, device: fa-b1-1, start: "2026-03-10T14:00:00+08:00",
     magnitude: 50000}
  - {type: dropout, device: ap-b1-1, start: "2026-03-09T18:00:00+08:00", duration: 90m}
  - {type: submeter_mismatch, device: meter-b1-res2, start: "2026-03-10T08:00:00+08:00",
     duration: 6h, magnitude: 0.3}
  - {type: clogging_filter, device: fa-b1-1, start: "2026-03-09T06:00:00+08:00",
     duration: 30h, magnitude: 0.3}
"""


@dataclass
class Series:
    ts: np.ndarray
    seq: np.ndarray
    metrics: dict[str, np.ndarray]


def by_device(readings: list[Reading]) -> dict[str, Series]:
    raw: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in readings:
        d = raw[r.device_id]
        d["ts"].append(r.ts)
        d["seq"].append(float(r.seq or 0))
        for k, v in r.metrics.items():
            d[k].append(v)
    out = {}
    for dev, d in raw.items():
        arrays = {k: np.asarray(v) for k, v in d.items()}
        ts, seq = arrays.pop("ts"), arrays.pop("seq")
        out[dev] = Series(ts, seq, arrays)
    return out


@pytest.fixture(scope="module")
def clean() -> tuple[Scenario, list[Reading]]:
    scenario = loads_scenario(BASE.format(seed=5), "clean")
    return scenario, list(generate(scenario))


@pytest.fixture(scope="module")
def faulty() -> tuple[Scenario, list[Reading]]:
    scenario = loads_scenario(BASE.format(seed=5) + FAULTS, "faulty")
    return scenario, list(generate(scenario))


def at(scenario: Scenario, text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=scenario.tz).timestamp()


# ---- determinism and stream shape ------------------------------------------------------------


def test_same_seed_same_readings_other_seed_other(clean: tuple[Scenario, list[Reading]]) -> None:
    _, readings = clean
    again = list(generate(loads_scenario(BASE.format(seed=5), "clean")))
    assert again == readings
    other = list(generate(loads_scenario(BASE.format(seed=6), "other")))
    assert [r.metrics for r in other[:200]] != [r.metrics for r in readings[:200]]
    assert len(readings) > 20_000


def test_stream_is_time_ordered_with_increasing_seq(clean: tuple[Scenario, list[Reading]]
                                                    ) -> None:
    scenario, readings = clean
    ts = np.array([r.ts for r in readings])
    assert np.all(np.diff(ts) >= 0)
    assert scenario.t0 <= ts[0] and ts[-1] < scenario.t1
    series = by_device(readings)
    assert set(series) == set(scenario.device_kinds())
    for s in series.values():
        assert np.all(np.diff(s.seq) >= 1)
        gaps = np.diff(s.ts)
        assert np.all(gaps > 50) and np.median(gaps) == pytest.approx(60.0, abs=0.5)
        # about one reading a minute, a few lost
        assert 0.98 * 2 * 1440 < s.ts.size <= 2 * 1440
    kinds = {r.device_id: r.kind for r in readings}
    assert kinds == scenario.device_kinds()


def test_energy_integrates_power(clean: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = clean
    for dev, s in by_device(readings).items():
        energy, power = s.metrics["energy_wh"], s.metrics["power_w"]
        assert np.all(np.diff(energy) >= 0), dev  # no reset, no wrap in this scenario
        integral = np.sum((power[1:] + power[:-1]) / 2 * np.diff(s.ts)) / 3600.0
        counted = energy[-1] - energy[0]
        resolution = 10.0 if scenario.device_kinds()[dev] == "meter" else 1.0
        assert counted == pytest.approx(integral, rel=0.02, abs=20 * resolution), dev
        assert np.all(np.mod(energy, resolution) == 0)


def test_main_meter_is_the_sum_of_sub_meters_plus_a_little(
        clean: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = clean
    series = by_device(readings)
    b = scenario.buildings[0]
    main = series[b.main.id]
    subs = [series[m.id] for m in b.submeters]
    main_e = main.metrics["energy_wh"][-1] - main.metrics["energy_wh"][0]
    subs_e = sum(s.metrics["energy_wh"][-1] - s.metrics["energy_wh"][0] for s in subs)
    assert 1.0 < main_e / subs_e < 1.06  # unmetered loads, losses, calibration
    # and per quarter hour (meters sample at different instants; lifts switch in seconds)
    def quarter_means(s: Series) -> np.ndarray:
        bucket = ((s.ts - scenario.t0) // 900).astype(int)
        return np.bincount(bucket, s.metrics["power_w"]) / np.bincount(bucket)

    ratio = quarter_means(main) / sum(quarter_means(s) for s in subs)
    assert 1.0 < float(np.median(ratio)) < 1.06
    assert float(np.percentile(np.abs(ratio - np.median(ratio)), 95)) < 0.05


def test_fault_free_units_run_only_in_open_hours(clean: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = clean
    cal = scenario.calendar_for("b1").weekly[0][0]  # 06:00-23:00
    for dev, s in by_device(readings).items():
        if "running" not in s.metrics:
            continue
        local = [datetime.fromtimestamp(t, scenario.tz) for t in s.ts[s.metrics["running"] > 0]]
        minutes = np.array([d.hour * 60 + d.minute for d in local])
        assert minutes.size > 0, dev
        assert np.all((minutes >= cal[0]) & (minutes < cal[1])), dev
        # and their power at night is standby only
        night = s.metrics["running"] == 0
        assert np.percentile(s.metrics["power_w"][night], 99) < 60.0, dev


def test_realistic_ranges(clean: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = clean
    series = by_device(readings)
    for dev, s in series.items():
        m = s.metrics
        assert np.all(m["power_w"] >= 0)
        if dev.startswith("meter"):
            assert np.all((m["voltage_v"] > 215) & (m["voltage_v"] < 245))
        if "filter_dp_pa" in m:
            running = m["running"] > 0
            assert np.all(m["filter_dp_pa"][~running] <= 3)
            assert np.median(m["filter_dp_pa"][running]) > 5
        if "temperature_c" in m:
            assert np.all((m["temperature_c"] > -10) & (m["temperature_c"] < 45))
    # the residential risers: a larger evening than night draw
    res = series["meter-b1-res1"]
    hours = np.array([datetime.fromtimestamp(t, scenario.tz).hour for t in res.ts])
    evening = res.metrics["power_w"][(hours >= 19) & (hours < 21)].mean()
    night = res.metrics["power_w"][(hours >= 2) & (hours < 4)].mean()
    assert evening > 2.5 * night


# ---- faults and their labels -----------------------------------------------------------------


def label_of(scenario: Scenario, fault_type: str, device: str | None = None) -> Fault:
    found = [f for f in labels(scenario) if f.type == fault_type
             and (device is None or device in (f.device_id, *f.related))]
    assert len(found) == 1, found
    return found[0]


def window(s: Series, a: float, b: float) -> np.ndarray:
    return (s.ts >= a) & (s.ts < b)


def test_stuck_metric_repeats_exactly_inside_its_label_only(
        faulty: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = faulty
    series = by_device(readings)
    f = next(x for x in labels(scenario) if x.type == "stuck_sensor"
             and x.device_id == "hvac-b1-lobby")
    power = series[f.device_id].metrics["power_w"]
    inside = window(series[f.device_id], f.start, f.end)
    assert inside.sum() > 100 and np.unique(power[inside]).size == 1
    before = window(series[f.device_id], f.start - 2 * 3600, f.start)
    after = window(series[f.device_id], f.end, f.end + 2 * 3600)
    assert np.unique(power[before]).size > 20 and np.unique(power[after]).size > 20
    # the value it sticks at is the last one before the label starts
    last_before = power[np.flatnonzero(series[f.device_id].ts < f.start)[-1]]
    assert power[inside][0] == last_before
    # other metrics keep moving; a meter stuck with `all` freezes every metric
    assert np.unique(series[f.device_id].metrics["temperature_c"][inside]).size > 1
    g = next(x for x in labels(scenario) if x.type == "stuck_sensor"
             and x.device_id == "meter-b1-main")
    inside = window(series[g.device_id], g.start, g.end)
    for name, values in series[g.device_id].metrics.items():
        assert np.unique(values[inside]).size == 1, name


def test_dropout_silences_exactly_the_label_window(faulty: tuple[Scenario, list[Reading]]
                                                   ) -> None:
    scenario, readings = faulty
    series = by_device(readings)
    f = label_of(scenario, "dropout")
    s = series[f.device_id]
    assert not window(s, f.start, f.end).any()
    assert window(s, f.start - 300, f.start).any() and window(s, f.end, f.end + 300).any()
    gap = s.ts[np.searchsorted(s.ts, f.end)] - s.ts[np.searchsorted(s.ts, f.start) - 1]
    assert f.end - f.start <= gap < f.end - f.start + 200
    assert f.related == ()


def test_counter_reset_and_jump(faulty: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = faulty
    series = by_device(readings)
    reset = label_of(scenario, "counter_reset")
    s = series[reset.device_id]
    i = int(np.searchsorted(s.ts, reset.start))
    assert s.metrics["energy_wh"][i - 1] > 1e6 and s.metrics["energy_wh"][i] < 1000
    assert np.all(np.diff(s.metrics["energy_wh"][i:]) >= 0)  # counts on from there
    jump = label_of(scenario, "counter_jump")
    s = series[jump.device_id]
    i = int(np.searchsorted(s.ts, jump.start))
    step = s.metrics["energy_wh"][i] - s.metrics["energy_wh"][i - 1]
    assert step == pytest.approx(50_000, abs=100)
    assert np.all(np.diff(s.metrics["energy_wh"]) >= 0)


def test_spike_is_several_times_rated_and_seen_upstream(
        faulty: tuple[Scenario, list[Reading]], clean: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = faulty
    series = by_device(readings)
    f = label_of(scenario, "spike")
    unit = next(u for u in scenario.units() if u.id == f.device_id)
    inside = window(series[f.device_id], f.start + 60, f.end)
    assert np.all(series[f.device_id].metrics["power_w"][inside] > 3.5 * unit.rated_w)
    assert f.related == (unit.submeter, "meter-b1-main")
    # the sub-meter carries the extra draw; energy stays consistent with power
    sub = series[unit.submeter]
    clean_sub = by_device(clean[1])[unit.submeter]
    mask = window(sub, f.start + 60, f.end)
    extra = (sub.metrics["power_w"][mask].mean()
             - clean_sub.metrics["power_w"][window(clean_sub, f.start + 60, f.end)].mean())
    assert extra > 2.5 * unit.rated_w


def test_after_hours_unit_runs_through_the_night_of_its_label(
        faulty: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = faulty
    series = by_device(readings)
    f = label_of(scenario, "after_hours")
    s = series[f.device_id]
    inside = window(s, f.start, f.end)
    assert np.all(s.metrics["running"][inside] == 1)
    assert np.median(s.metrics["power_w"][inside]) > 300
    # the same hours of the other night: off
    other = window(s, f.start + 86400, min(f.end + 86400, scenario.t1))
    other |= window(s, f.start - 86400, f.end - 86400)
    assert other.any() and np.all(s.metrics["running"][other] == 0)
    assert at(scenario, "2026-03-09T23:00:00") == f.start


def test_submeter_mismatch_is_labelled_on_the_main_meter(
        faulty: tuple[Scenario, list[Reading]], clean: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = faulty
    f = label_of(scenario, "submeter_mismatch")
    assert f.device_id == "meter-b1-main" and f.related == ("meter-b1-res2",)
    sub = by_device(readings)["meter-b1-res2"]
    ref = by_device(clean[1])["meter-b1-res2"]
    ratio = (sub.metrics["power_w"][window(sub, f.start, f.end)].mean()
             / ref.metrics["power_w"][window(ref, f.start, f.end)].mean())
    assert ratio == pytest.approx(0.7, abs=0.03)
    e = sub.metrics["energy_wh"]
    e_ref = ref.metrics["energy_wh"]
    d = e[window(sub, f.start, f.end)]
    d_ref = e_ref[window(ref, f.start, f.end)]
    assert (d[-1] - d[0]) / (d_ref[-1] - d_ref[0]) == pytest.approx(0.7, abs=0.03)


def test_clogging_filter_raises_the_pressure_drop_ratio(
        faulty: tuple[Scenario, list[Reading]]) -> None:
    scenario, readings = faulty
    f = label_of(scenario, "clogging_filter")
    s = by_device(readings)[f.device_id]
    running = s.metrics["fan_speed_pct"] >= 60
    ratio = s.metrics["filter_dp_pa"] / np.maximum(s.metrics["fan_speed_pct"], 1) ** 2
    first = ratio[running & window(s, f.start, f.start + 6 * 3600)]
    late = ratio[running & window(s, f.end - 8 * 3600, f.end)]
    assert np.median(late) > 1.25 * np.median(first)
    after = ratio[running & window(s, f.end, scenario.t1)]
    assert after.size and np.median(after) < np.median(first)  # a fresh filter


def test_slow_drift_label_and_growth() -> None:
    text = BASE.format(seed=5).replace("duration: 2d", "duration: 6d") + """
faults:
  - {type: slow_drift, device: hvac-b1-lobby, start: "2026-03-11T00:00:00+08:00",
     duration: 4d, magnitude: 0.05}
"""
    scenario = loads_scenario(text, "drift")
    ref = loads_scenario(BASE.format(seed=5).replace("duration: 2d", "duration: 6d"), "ref")
    f = label_of(scenario, "slow_drift")
    assert f.end - f.start == 4 * 86400 and f.related == ("meter-b1-common", "meter-b1-main")

    def energy(s: Scenario, a: float, b: float) -> float:
        e = by_device([r for r in generate(s) if r.device_id == "hvac-b1-lobby"])[
            "hvac-b1-lobby"]
        inside = e.metrics["energy_wh"][window(e, a, b)]
        return float(inside[-1] - inside[0])

    # the compressor draws 15-20 % more on the last day; fan and controls do not drift
    last_day = (f.end - 86400, f.end)
    assert 1.08 < energy(scenario, *last_day) / energy(ref, *last_day) < 1.2
    first_day = (f.start - 86400, f.start)
    assert energy(scenario, *first_day) == energy(ref, *first_day)


def test_labels_and_random_placement_are_deterministic_without_overlaps() -> None:
    scenario = load_scenario(SCENARIOS / "community_faults.yaml")
    again = load_scenario(SCENARIOS / "community_faults.yaml")
    assert labels(scenario) == labels(again)
    found = labels(scenario)
    counts = Counter(f.type for f in found)
    assert set(counts) == set(FAULT_TYPES)
    for fault_type in FAULT_TYPES:
        assert counts[fault_type] >= 5
        assert len({f.device_id for f in found if f.type == fault_type}) >= 3
    per_device: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for spec in scenario.faults:
        per_device[spec.device].append((spec.start, spec.start + spec.duration_s))
    for items in per_device.values():
        items.sort()
        for (_, end), (start, _) in itertools.pairwise(items):
            assert end <= start
    for label in found:
        assert scenario.t0 <= label.start < label.end <= scenario.t1


FAULT_SCENARIOS = ("community_faults", "community_fault_free", "summer_faults", "tiny_faults",
                   "tiny_fault_free")
"""The labelled fault scenarios; the folder also holds the demo's community scenario
(`community.yaml`, `scgw simulate`), which has a schema of its own."""


def test_every_bundled_scenario_loads() -> None:
    files = [SCENARIOS / f"{name}.yaml" for name in FAULT_SCENARIOS]
    assert all(path.is_file() for path in files)
    for path in files:
        scenario = load_scenario(path)
        assert scenario.buildings and scenario.duration_s > 0
    free = load_scenario(SCENARIOS / "community_fault_free.yaml")
    assert labels(free) == [] and free.duration_s >= 21 * 86400
    assert len(free.device_kinds()) >= 40


def test_counter_rolls_over_at_32_bits() -> None:
    text = BASE.format(seed=5) + """
    main_meter: {id: meter-b1-main, energy_start_wh: 4294900000}
"""
    scenario = loads_scenario(text, "wrap")
    s = by_device([r for r in generate(scenario) if r.device_id == "meter-b1-main"])[
        "meter-b1-main"]
    e = s.metrics["energy_wh"]
    drops = np.flatnonzero(np.diff(e) < 0)
    assert drops.size == 1
    assert e[drops[0]] > 2**32 - 5000 and e[drops[0] + 1] < 5000
    assert np.all(e < 2**32) and labels(scenario) == []


# ---- files, site, errors ---------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path, faulty: tuple[Scenario, list[Reading]]) -> None:
    _, readings = faulty
    path = tmp_path / "readings.jsonl"
    assert write_jsonl(readings[:5000], path) == 5000
    assert list(read_jsonl(path)) == readings[:5000]
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"device_id", "kind", "ts", "seq", "metrics"}


def test_site_context(faulty: tuple[Scenario, list[Reading]]) -> None:
    scenario, _ = faulty
    ctx = site_context(scenario)
    assert ctx.timezone == "Asia/Shanghai"
    assert ctx.devices["hvac-b1-lobby"].kind == "hvac"
    assert ctx.devices["meter-b1-main"].building == "b1"
    assert set(ctx.devices) == set(scenario.device_kinds())
    assert ctx.calendar_for("b1").weekly[0] == ((360, 1380),)


@pytest.mark.parametrize(("patch", "message"), [
    ("bogus: 1\n", "unknown key"),
    ("faults: [{type: spike, device: nope, start: '2026-03-09T10:00:00'}]\n", "not a device"),
    ("faults: [{type: clogging_filter, device: hvac-b1-lobby, start: '2026-03-09T10:00'}]\n",
     "filter"),
    ("faults: [{type: after_hours, device: meter-b1-main, start: '2026-03-09T23:00'}]\n",
     "needs a unit"),
    ("faults: [{type: stuck_sensor, device: hvac-b1-lobby, start: '2026-03-09T10:00', "
     "metric: co2_ppm}]\n", "metric"),
    ("faults: [{type: melt, device: hvac-b1-lobby, start: '2026-03-09T10:00'}]\n", "type"),
    ("faults: [{type: spike, device: hvac-b1-lobby, start: '2027-01-01T10:00'}]\n",
     "outside the scenario"),
    ("random_faults: [{type: clogging_filter, count: 2, devices: [meter-*]}]\n",
     "no device suits"),
])
def test_scenario_errors_name_the_key(patch: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        loads_scenario(BASE.format(seed=1) + patch, "bad")


def test_unit_schedule_outside_open_hours_is_refused() -> None:
    text = BASE.format(seed=1).rstrip() + """
    units: [{id: hvac-b1-lobby, kind: hvac, space: lobby, hours: "05:00-22:00"}]
"""
    with pytest.raises(ScenarioError, match="outside building b1's open hours"):
        loads_scenario(text, "bad")


def test_durations() -> None:
    assert parse_duration("1d12h", "x") == 129_600
    assert parse_duration("90s", "x") == 90 and parse_duration(45, "x") == 45
    with pytest.raises(ScenarioError):
        parse_duration("soon", "x")


def test_generator_memory_is_per_day() -> None:
    """Readings come out day by day: asking for the first one does not build the rest."""
    scenario = load_scenario(SCENARIOS / "community_faults.yaml")
    stream = Generator(scenario).readings()
    first = next(stream)
    assert first.ts >= scenario.t0 and math.isfinite(first.metrics["power_w"])


# ---- evaluate --------------------------------------------------------------------------------


def test_evaluate_tiny_scenario_with_the_default_rules() -> None:
    pytest.importorskip("rules.engine")
    from simulators.faults.evaluate import evaluate_scenario, load_rules

    scenario = load_scenario(SCENARIOS / "tiny_faults.yaml")
    result = evaluate_scenario(scenario, load_rules([]), batch_size=5000)
    report = result.report
    assert result.readings > 20_000 and report.faults == len(labels(scenario))
    assert report.firings == len([t for t in result.transitions if t.state == "firing"])
    doc = report.to_dict()
    assert {t["type"] for t in doc["per_type"]} == set(FAULT_TYPES)


def test_evaluate_command(tmp_path: Path) -> None:
    pytest.importorskip("rules.engine")
    from simulators.faults.cli import register_rules

    app = typer.Typer()
    rules_app = typer.Typer()
    app.add_typer(rules_app, name="rules")

    @rules_app.command("check")
    def check() -> None:  # a second command, so typer keeps the group
        """placeholder"""

    register_rules(rules_app)
    runner = CliRunner()
    scenario = SCENARIOS / "tiny_fault_free.yaml"
    result = runner.invoke(app, ["rules", "evaluate", "--scenario", str(scenario), "--json"])
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.output)
    assert doc["overall"]["faults"] == 0 and doc["fault_free"]["device_days"] == pytest.approx(
        14.0)
    result = runner.invoke(app, ["rules", "evaluate", "--scenario", str(scenario)])
    assert result.exit_code == 0 and "per device-day" in result.output


def test_fnmatch_device_globs_in_random_faults() -> None:
    text = BASE.format(seed=3) + """
random_faults:
  - {type: dropout, count: 3, devices: ["hvac-*"], duration: [20m, 40m]}
"""
    scenario = loads_scenario(text, "globs")
    found = labels(scenario)
    assert len(found) == 3
    assert all(fnmatch.fnmatch(f.device_id, "hvac-*") for f in found)
    assert all(1200 <= f.end - f.start <= 2400 for f in found)


def test_labels_name_where_a_fault_is_also_visible() -> None:
    text = BASE.format(seed=3) + """
faults:
  - {type: stuck_sensor, device: meter-b1-res1, start: "2026-03-09T10:00:00+08:00",
     duration: 1h, metric: power_w}
  - {type: stuck_sensor, device: meter-b1-res2, start: "2026-03-09T10:00:00+08:00",
     duration: 1h, metric: voltage_v}
  - {type: counter_jump, device: meter-b1-common, start: "2026-03-09T10:00:00+08:00",
     magnitude: 10000}
  - {type: after_hours, device: fa-b1-1, start: "2026-03-09T23:00:00+08:00", duration: 2h}
  - {type: submeter_mismatch, device: meter-b1-main, start: "2026-03-10T10:00:00+08:00",
     duration: 2h, magnitude: 8000}
"""
    found = {(f.type, f.device_id): f.related for f in labels(loads_scenario(text, "rel"))}
    assert found == {
        ("stuck_sensor", "meter-b1-res1"): ("meter-b1-main",),  # unbalances the building
        ("stuck_sensor", "meter-b1-res2"): (),
        ("counter_jump", "meter-b1-common"): (),
        ("after_hours", "fa-b1-1"): ("meter-b1-common", "meter-b1-main"),
        ("submeter_mismatch", "meter-b1-main"): (),
    }
