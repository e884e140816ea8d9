"""The telemetry worker's health as the main process sees it: for /readyz and /metrics.

The worker publishes a retained JSON report on `{root}/gateway/{site}/telemetry` every few
seconds (gateway.telemetry.worker). The main process keeps the latest one; a report that
stops arriving is itself a problem, because a dead worker means readings pile up unseen.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.metrics import Registry

log = logging.getLogger(__name__)

STALE_AFTER_S = 15.0
BEHIND_AFTER_S = 30.0  # a sink whose oldest unwritten reading is older than this is behind


class TelemetryHealth:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.report: dict[str, Any] = {}
        self.received_at: float | None = None

    def update(self, payload: bytes) -> None:
        try:
            report = json.loads(payload)
        except ValueError:
            log.warning("telemetry health report is not JSON; ignored")
            return
        if isinstance(report, dict):
            self.report = report
            self.received_at = self._clock()

    def problems(self) -> list[str]:
        """One line per thing that is wrong, naming the sink and how far behind it is."""
        now = self._clock()
        if self.received_at is None:
            return ["telemetry worker: no health report yet"]
        age = now - self.received_at
        if self.report.get("online") is False:
            # A hand-over to a fresh worker (gateway.telemetry.recycle) takes about a second:
            # not down unless the next worker fails to report in the usual time.
            if self.report.get("handing_over") is True and age <= STALE_AFTER_S:
                return []
            return ["telemetry worker: offline"]
        if age > STALE_AFTER_S:
            return [f"telemetry worker: last health report {age:.0f} s ago"]
        problems = []
        for name, sink in sorted(self._sinks().items()):
            state = str(sink.get("state", "unknown"))
            lag = float(sink.get("lag_s") or 0.0)
            if state == "auth_failed":
                problems.append(f"{name}: authentication refused (401/403), {lag:.0f} s behind")
            elif state == "error":
                problems.append(f"{name}: {sink.get('last_error') or 'failing'}")
            elif lag > BEHIND_AFTER_S or state == "retrying":
                error = sink.get("last_error") or ""
                problems.append(f"{name}: behind by {lag:.0f} s ({state}) {error}".rstrip())
        return problems

    def _sinks(self) -> dict[str, dict[str, Any]]:
        sinks = self.report.get("sinks", {})
        return {str(k): v for k, v in sinks.items() if isinstance(v, dict)} if isinstance(
            sinks, dict) else {}

    def _number(self, *path: str) -> float:
        node: Any = self.report
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return float(node) if isinstance(node, int | float) else 0.0

    def register_metrics(self, metrics: Registry) -> None:
        """The worker's counters, re-exported so one scrape of the gateway shows them."""
        counters = {
            "scgw_telemetry_readings_total": (("ingest", "accepted"), "Readings accepted."),
            "scgw_telemetry_duplicates_total": (("ingest", "duplicates"),
                                                "Readings dropped as repeats (same seq)."),
            "scgw_telemetry_gaps_total": (("ingest", "gaps"), "Telemetry sequence gaps seen."),
            "scgw_telemetry_seq_resets_total": (("ingest", "seq_resets"),
                                                "Devices whose telemetry seq restarted."),
            "scgw_spool_dropped_total": (("spool", "dropped"),
                                         "Spooled readings dropped because the spool was full."),
            "scgw_alerts_fired_total": (("sinks", "rules", "fired"),
                                        "Alerts the rules engine fired."),
            "scgw_alerts_resolved_total": (("sinks", "rules", "resolved"),
                                           "Alerts the rules engine resolved."),
            "scgw_device_events_evaluated_total": (("ingest", "events"),
                                                   "Device events taken in for the rules."),
        }
        for name, (path, help_text) in counters.items():
            metrics.counter_func(name, help_text, lambda p=path: self._number(*p))  # type: ignore[misc]
        metrics.gauge("scgw_spool_bytes", "Bytes in the telemetry spool.",
                      lambda: self._number("spool", "bytes"))
        metrics.labelled_func(
            "scgw_telemetry_refused_total", "Telemetry refused, by reason.", ("reason",),
            lambda: {(str(k),): float(v) for k, v in self._section("ingest", "refused").items()},
            counter=True)
        metrics.labelled_func(
            "scgw_spool_depth_records", "Spooled readings each sink has not written yet.",
            ("sink",), lambda: self._per_consumer("depth_records"), counter=False)
        metrics.labelled_func(
            "scgw_spool_oldest_age_seconds", "Age of the oldest reading a sink has not written.",
            ("sink",), lambda: self._per_consumer("oldest_age_s"), counter=False)
        for field, help_text in (("written", "Readings written, by sink."),
                                 ("retries", "Write attempts retried, by sink."),
                                 ("quarantined", "Points refused by a sink and set aside.")):
            metrics.labelled_func(f"scgw_sink_{field}_total", help_text, ("sink",),
                                  functools.partial(self._per_sink, field), counter=True)
        metrics.gauge("scgw_telemetry_worker_up", "1 while the worker reports on time.",
                      lambda: 0.0 if any(p.startswith("telemetry worker")
                                         for p in self.problems()) else 1.0)

    def _per_sink(self, field: str) -> dict[tuple[str, ...], float]:
        return {(name,): float(s.get(field) or 0) for name, s in self._sinks().items()}

    def _section(self, *path: str) -> dict[str, Any]:
        node: Any = self.report
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def _per_consumer(self, field: str) -> dict[tuple[str, ...], float]:
        consumers = self._section("spool", "consumers")
        return {(str(name),): float(c.get(field) or 0) for name, c in consumers.items()
                if isinstance(c, dict)}
