"""The worker's health report as /readyz and /metrics show it (gateway.telemetry.health)."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Registry
from gateway.telemetry.health import TelemetryHealth

REPORT = {
    "online": True,
    "ingest": {"accepted": 10, "duplicates": 2, "gaps": 1, "seq_resets": 0,
               "refused": {"not_finite": 3, "unknown_device": 1}},
    "spool": {"bytes": 4096, "dropped": 5,
              "consumers": {"local": {"depth_records": 0, "oldest_age_s": 0.0},
                            "influxdb": {"depth_records": 900, "oldest_age_s": 75.0}}},
    "sinks": {"local": {"state": "ok", "lag_s": 0.0, "written": 10, "retries": 0,
                        "quarantined": 0, "last_error": None},
              "influxdb": {"state": "retrying", "lag_s": 75.0, "written": 4, "retries": 7,
                           "quarantined": 2, "last_error": "connection refused"}},
}


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_problems_name_the_sink_that_is_behind_and_by_how_much() -> None:
    clock = Clock()
    health = TelemetryHealth(clock)
    assert health.problems() == ["telemetry worker: no health report yet"]
    health.update(json.dumps(REPORT).encode())
    assert health.problems() == ["influxdb: behind by 75 s (retrying) connection refused"]
    denied = {**REPORT, "sinks": {"influxdb": {"state": "auth_failed", "lag_s": 3.0}}}
    health.update(json.dumps(denied).encode())
    assert health.problems() == ["influxdb: authentication refused (401/403), 3 s behind"]
    clock.now += 60
    assert health.problems() == ["telemetry worker: last health report 60 s ago"]
    health.update(b"{not json")  # ignored, the last good report stays
    assert health.report == denied


def test_a_worker_handing_over_is_not_down_unless_the_next_one_stays_silent() -> None:
    clock = Clock()
    health = TelemetryHealth(clock)
    health.update(json.dumps({**REPORT, "online": False, "sinks": {}}).encode())
    assert health.problems() == ["telemetry worker: offline"]  # stopped for good
    health.update(json.dumps({**REPORT, "online": False, "handing_over": True,
                              "sinks": {}}).encode())
    assert health.problems() == []  # a fresh worker reports within a second or two
    clock.now += 16
    assert health.problems() == ["telemetry worker: offline"]


def test_metrics_export_the_workers_counters_by_reason_and_sink() -> None:
    health = TelemetryHealth(Clock())
    metrics = Registry()
    health.register_metrics(metrics)
    health.update(json.dumps(REPORT).encode())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render())
               for s in family.samples}
    types = {f.name: f.type for f in text_string_to_metric_families(metrics.render())}
    assert samples[("scgw_telemetry_readings_total", ())] == 10
    assert samples[("scgw_telemetry_refused_total", (("reason", "not_finite"),))] == 3
    assert samples[("scgw_spool_dropped_total", ())] == 5
    assert samples[("scgw_spool_oldest_age_seconds", (("sink", "influxdb"),))] == 75
    assert samples[("scgw_sink_quarantined_total", (("sink", "influxdb"),))] == 2
    assert samples[("scgw_sink_retries_total", (("sink", "influxdb"),))] == 7
    assert types["scgw_telemetry_refused"] == "counter"
    assert types["scgw_spool_depth_records"] == "gauge"
