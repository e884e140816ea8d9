"""rules.scoring: precision, recall, detection delay and false alarms against fault labels."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest

from rules.model import Transition, alert_id
from rules.scoring import Fault, score

DAY = 86_400.0


def tr(rule: str, device: str, ts: float, state: str = "firing",
       started_at: float | None = None) -> Transition:
    start = ts if started_at is None else started_at
    return Transition(alert_id=alert_id(rule, device, start), rule_id=rule, device_id=device,
                      metric="power_w", state=state,  # type: ignore[arg-type]
                      severity="warning", value=1.0, started_at=start, ts=ts, message="")


DEVICES = ("d1", "d2", "d3", "d4")
SPAN = (0.0, 2 * DAY)


def test_known_precision_recall_and_delay() -> None:
    faults = [Fault("spike", "d1", 1000.0, 1300.0), Fault("dropout", "d2", 5000.0, 8000.0),
              Fault("stuck_sensor", "d3", 10_000.0, 12_000.0)]
    transitions = [
        tr("r-spike", "d1", 1100.0),
        tr("r-spike", "d1", 1250.0),  # a second alert for the same fault: a second TP
        tr("r-spike", "d1", 1400.0, state="resolved"),  # resolutions are not alerts
        tr("r-nodata", "d2", 5600.0),
        tr("r-other", "d4", 20_000.0),  # nothing wrong on d4: a false positive
    ]
    report = score(transitions, faults, DEVICES, SPAN)
    assert (report.firings, report.tp, report.fp, report.collateral) == (4, 3, 1, 0)
    assert report.precision == pytest.approx(3 / 4)
    assert report.recall == pytest.approx(2 / 3)
    by_type = {t.type: t for t in report.per_type}
    assert by_type["spike"].detected == 1 and by_type["spike"].tp_alerts == 2
    assert by_type["spike"].median_delay_s == pytest.approx(100.0)
    assert by_type["dropout"].median_delay_s == pytest.approx(600.0)
    assert by_type["stuck_sensor"].recall == 0.0
    assert by_type["stuck_sensor"].median_delay_s is None
    assert report.step_median_delay_s == pytest.approx(350.0)
    results = {r.fault.device_id: r for r in report.fault_results}
    assert results["d1"].tp_alerts == 2 and results["d1"].first_rule == "r-spike"
    assert not results["d3"].detected
    # the FP is unattributed (its rule never found anything): overall precision only
    assert by_type["spike"].precision == 1.0
    assert any("r-other" in note for note in report.notes)


@pytest.mark.parametrize(("ts", "true_positive"), [
    (880.0, True),  # start - tolerance: just inside
    (879.9, False),  # just outside
    (1300.0 + 1800.0, True),  # end + grace
    (1300.0 + 1800.1, False),
])
def test_tolerance_and_grace_edges(ts: float, true_positive: bool) -> None:
    report = score([tr("r", "d1", ts)], [Fault("spike", "d1", 1000.0, 1300.0)], DEVICES, SPAN,
                   tolerance_s=120.0, grace_s=1800.0)
    assert report.tp == (1 if true_positive else 0)
    assert report.fp == (0 if true_positive else 1)
    assert report.recall == (1.0 if true_positive else 0.0)
    if true_positive:
        assert report.fault_results[0].delay_s == pytest.approx(ts - 1000.0)


def test_alert_on_another_device_is_not_a_detection() -> None:
    report = score([tr("r", "d2", 1100.0)], [Fault("spike", "d1", 1000.0, 1300.0)], DEVICES,
                   SPAN)
    assert (report.tp, report.fp, report.recall) == (0, 1, 0.0)


def test_no_alerts() -> None:
    faults = [Fault("spike", "d1", 1000.0, 1300.0)]
    report = score([], faults, DEVICES, SPAN)
    assert report.firings == 0 and report.precision is None and report.recall == 0.0
    assert report.fault_free_alerts == 0
    assert report.fault_free_alerts_per_device_day == 0.0
    empty = score([], [], DEVICES, SPAN)
    assert empty.recall is None and empty.per_type == ()
    assert empty.fault_free_device_days == pytest.approx(8.0)


def test_collateral_alerts_on_related_devices() -> None:
    """A unit's spike seen by its upstream meter: neither a detection nor a false alarm."""
    fault = Fault("spike", "hvac-1", 1000.0, 1300.0, related=("meter-sub", "meter-main"))
    transitions = [tr("r-unit", "hvac-1", 1060.0), tr("r-meter", "meter-main", 1100.0),
                   tr("r-meter", "meter-main", 50_000.0)]  # later: a plain false alarm
    report = score(transitions, [fault], ["hvac-1", "meter-sub", "meter-main"], SPAN)
    assert (report.tp, report.collateral, report.fp) == (1, 1, 1)
    assert report.precision == pytest.approx(1 / 2)
    assert report.precision_strict == pytest.approx(1 / 3)
    rules = {r.rule_id: r for r in report.per_rule}
    assert rules["r-meter"].collateral == 1 and rules["r-meter"].fp == 1


def test_fault_free_device_days_exclude_fault_windows() -> None:
    fault = Fault("dropout", "d1", DAY, DAY + 3600.0, related=("d2",))
    report = score([tr("r", "d3", 100.0)], [fault], ["d1", "d2", "d3"], SPAN,
                   tolerance_s=120.0, grace_s=1800.0)
    window = 3600.0 + 120.0 + 1800.0
    assert report.fault_free_device_days == pytest.approx((3 * 2 * DAY - 2 * window) / DAY)
    assert report.fault_free_alerts == 1
    assert report.fault_free_alerts_per_device_day == pytest.approx(
        1 / report.fault_free_device_days)


def test_gradual_faults_stay_out_of_step_delays() -> None:
    faults = [Fault("slow_drift", "d1", 0.0, 10 * DAY), Fault("spike", "d2", 1000.0, 1200.0)]
    transitions = [tr("r-base", "d1", 3 * DAY), tr("r-spike", "d2", 1060.0)]
    report = score(transitions, faults, DEVICES, (0.0, 10 * DAY))
    by_type = {t.type: t for t in report.per_type}
    assert not by_type["slow_drift"].step and by_type["spike"].step
    assert by_type["slow_drift"].median_delay_s == pytest.approx(3 * DAY)
    assert report.step_median_delay_s == pytest.approx(60.0)
    assert report.step_p90_delay_s == pytest.approx(60.0)


def test_per_type_precision_follows_the_rule_that_finds_the_type() -> None:
    faults = [Fault("spike", "d1", 1000.0, 1200.0), Fault("spike", "d2", 5000.0, 5200.0),
              Fault("dropout", "d3", 9000.0, 9600.0)]
    transitions = [tr("r-spike", "d1", 1030.0), tr("r-spike", "d2", 5030.0),
                   tr("r-spike", "d4", 30_000.0),  # counts against spikes
                   tr("r-nodata", "d3", 9300.0)]
    report = score(transitions, faults, DEVICES, SPAN)
    by_type = {t.type: t for t in report.per_type}
    assert by_type["spike"].precision == pytest.approx(2 / 3)
    assert by_type["dropout"].precision == 1.0
    assert {r.rule_id: r.attributed_type for r in report.per_rule} == {
        "r-spike": "spike", "r-nodata": "dropout"}


def test_one_alert_inside_two_overlapping_faults_detects_both_once() -> None:
    faults = [Fault("clogging_filter", "d1", 0.0, 3 * DAY), Fault("counter_jump", "d1", DAY,
                                                                   DAY + 600.0)]
    report = score([tr("r", "d1", DAY + 30.0)], faults, DEVICES, (0.0, 3 * DAY))
    assert report.tp == 1 and report.detected == 2
    assert {r.rule_id: r.matched_types for r in report.per_rule}["r"] == {
        "clogging_filter": 1, "counter_jump": 1}


def test_fault_like_objects_and_serialisation() -> None:
    Label = namedtuple("Label", "type device_id start end")
    report = score([tr("r", "d1", 1010.0), tr("r", "d2", 99_000.0)],
                   [Label("spike", "d1", 1000.0, 1100.0)], {"d1": "hvac", "d2": "meter"}, SPAN)
    assert report.tp == 1 and report.devices == 2
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["overall"]["precision"] == 0.5
    assert doc["faults"][0]["type"] == "spike" and doc["faults"][0]["delay_s"] == 10.0
    assert doc["per_rule"][0]["false_positives"][0]["device_id"] == "d2"
    text = report.to_text()
    assert "spike" in text and "per device-day" in text
    assert Fault.from_dict(Fault("x", "d", 1.0, 2.0, ("m",)).to_dict()) == Fault(
        "x", "d", 1.0, 2.0, ("m",))
