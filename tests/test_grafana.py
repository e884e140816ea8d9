"""Every query of the shipped Grafana dashboard runs on the real InfluxDB 1.x and finds the data.

The dashboard (deploy/grafana/dashboards/scgw-energy.json) is only as good as its InfluxQL,
and Grafana reports a broken query as an empty panel, not an error. So this test writes known
telemetry and alerts in the schema of CONTRACT.md section 4 (plus the optional `building`
tag), takes EVERY query out of the JSON (every panel target, every template variable), renders
Grafana's macros the way Grafana does ($timeFilter as an absolute millisecond range,
$__interval, multi-value variables inside `/^$var$/` as an escaped alternation), runs each
through `/query`, and checks the answer against sums computed here from the same readings. A
panel added without a check here fails the test, as does a query that errors or comes back
empty. Run with two selections of the variables: everything, and one value each.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.telemetry.line_protocol import alert_line
from tests.influx_servers import InfluxDB, influxdb_server

GRAFANA = Path(__file__).parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "scgw-energy.json"
SITE = "maple-court"
INTERVAL = "1m"  # what $__interval becomes; the panels' minimum interval
STEP_S = 10  # one reading per device every 10 s: six per 1-minute bucket


@dataclass(frozen=True)
class Device:
    device_id: str
    kind: str
    building: str | None
    base_w: float


DEVICES = [
    Device("meter-main", "meter", None, 1000.0),
    Device("meter-b2-pv", "meter", "b2", 200.0),
    Device("hvac-b1-lobby", "hvac", "b1", 50.0),
    Device("erv-b1", "fresh_air", "b1", 20.0),
    Device("purifier-b2-gym", "air_purifier", "b2", 30.0),
]
KINDS = sorted({d.kind for d in DEVICES})

# Whole minutes, ending a minute before now: the "now" panel looks at the last 5 minutes.
# Set again by `_timeline()` when the data is written: the suite may run for many minutes
# between importing this module and writing, and "now" must be the writing's now.
NOW_S = END_S = START_S = 0
RANGE_MS = (0, 0)


def _timeline() -> None:
    global NOW_S, END_S, START_S, RANGE_MS, POINTS, ALERTS  # see the comment above
    NOW_S = int(time.time())
    END_S = NOW_S // 60 * 60 - 60
    START_S = END_S - 30 * 60
    RANGE_MS = ((NOW_S - 3600) * 1000, (NOW_S + 60) * 1000)  # the dashboard's "last hour"
    POINTS = _readings()
    ALERTS = _alerts()


@dataclass(frozen=True)
class Point:
    device: Device
    ts_s: int
    metrics: dict[str, float]
    seq: int


def _readings() -> list[Point]:
    """Power changes every minute (and is constant within one), so a per-minute mean is
    exact and a query that sums readings instead of per-device means is off by six times."""
    points = []
    for k in range((END_S - START_S) // STEP_S):
        for device in DEVICES:
            metrics = {"power_w": device.base_w + k // 6, "energy_wh": 1000.0 + k}
            if device.kind == "hvac":
                metrics["temperature_c"] = 20.0 + (k % 6) / 2
            points.append(Point(device, START_S + k * STEP_S, metrics, k))
    return points


def _alerts() -> list[dict[str, Any]]:
    return [
    {"rule_id": "power-high", "device_id": "meter-main", "severity": "warning",
     "state": "firing", "value": 1500.0, "message": "power 1500 W above 1400 W",
     "ts": float(START_S + 300)},
    {"rule_id": "power-high", "device_id": "meter-main", "severity": "warning",
     "state": "resolved", "value": 1200.0, "message": "power back below 1400 W",
     "ts": float(START_S + 900)},
    {"rule_id": "filter-clogged", "device_id": "erv-b1", "severity": "critical",
     "state": "firing", "value": 250.5, "message": 'filter dp 250.5 Pa, "replace"',
     "ts": float(START_S + 1200)},
    ]


POINTS: list[Point] = []
ALERTS: list[dict[str, Any]] = []


def telemetry_line(point: Point) -> str:
    """A `telemetry` point as the gateway writes it, with the optional `building` tag the
    per-building panels group by (left out for devices without a building)."""
    tags = {"site": SITE, "device_id": point.device.device_id, "kind": point.device.kind}
    if point.device.building:
        tags["building"] = point.device.building
    fields = [f"{name}={value!r}" for name, value in point.metrics.items()]
    return (f"telemetry,{','.join(f'{k}={v}' for k, v in sorted(tags.items()))} "
            f"{','.join(fields)},seq={point.seq}i {point.ts_s * 1000}")


@pytest.fixture(scope="module")
def influxdb() -> Iterator[InfluxDB]:
    with influxdb_server() as server:
        _timeline()
        lines = [telemetry_line(p) for p in POINTS]
        lines += [line for alert in ALERTS if (line := alert_line(alert, SITE)) is not None]
        assert len(lines) == len(POINTS) + len(ALERTS)
        response = server.write("\n".join(lines))
        assert response.status_code == 204, response.text
        yield server


# --- the dashboard's queries and Grafana's rendering of them ------------------------------

@dataclass(frozen=True)
class Query:
    where: str  # "panel 3 'Community power'" or "variable device"
    key: str  # panel title or variable name
    text: str
    extra: dict[str, Any]  # the target or variable object


def _panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from _panels(panel)  # panels inside rows


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    queries = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            assert target.get("rawQuery"), f"panel {panel['title']!r}: use raw InfluxQL"
            queries.append(Query(f"panel {panel['id']} {panel['title']!r}", panel["title"],
                                 target["query"], target))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        queries.append(Query(f"variable {variable['name']}", variable["name"], text, variable))
    return queries


def _grafana_regex_escape(value: str) -> str:
    """@grafana/data escapeRegex: what Grafana applies to variable values in a regex."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


def render(text: str, selection: dict[str, list[str]]) -> str:
    """Grafana's interpolation for the InfluxDB data source, for the forms the dashboard uses.

    Variables inside `/^$var$/` become one escaped value or `(a|b|...)`; `$timeFilter` an
    absolute range in ms; `$__interval` the interval. Any other `$name` (or `${name}`) is a
    form this test does not know, and fails rather than being run half-rendered.
    """
    def regex(match: re.Match[str]) -> str:
        values = selection[match.group(1) or match.group(2)]
        escaped = [_grafana_regex_escape(v) for v in values]
        return "/^" + (escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})") + "$/"

    text = re.sub(r"/\^\$(?:\{(\w+)\}|(\w+))\$/", regex, text)
    text = re.sub(r"\$(?:timeFilter\b|\{timeFilter\})",
                  f"time >= {RANGE_MS[0]}ms and time <= {RANGE_MS[1]}ms", text)
    text = re.sub(r"\$(?:__interval\b|\{__interval\})", INTERVAL, text)
    leftover = re.findall(r"\$(?!/)\{?\w+", text)
    assert not leftover, f"unrendered Grafana variables {leftover} in {text!r}"
    return text


def run(server: InfluxDB, text: str) -> list[dict[str, Any]]:
    """The series of one statement; a syntax error or an error result fails with the query."""
    reply = httpx.post(f"{server.url}/query", data={"q": text, "db": server.database,
                                                     "epoch": "ms"}, timeout=30.0)
    assert reply.status_code == 200, f"{reply.status_code} {reply.text} for {text}"
    results = reply.json()["results"]
    assert len(results) == 1, text
    assert "error" not in results[0], f"{results[0]['error']} for {text}"
    series: list[dict[str, Any]] = results[0].get("series", [])
    assert series and any(s.get("values") for s in series), f"no data for {text}"
    return series


# --- what each query must return, computed from the points written -----------------------

def _bucket_ms(ts_s: int) -> int:
    return ts_s // 60 * 60 * 1000


def sum_of_means(include: Callable[[Device], bool], group: Callable[[Device], str]
                 ) -> dict[str, dict[int, float]]:
    """{group: {bucket ms: sum over devices of their mean power_w in the bucket}}."""
    per_device: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for p in POINTS:
        if include(p.device):
            per_device[(group(p.device), p.device.device_id, _bucket_ms(p.ts_s))].append(
                p.metrics["power_w"])
    sums: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for (name, _, bucket), values in per_device.items():
        sums[name][bucket] += sum(values) / len(values)
    return {name: dict(buckets) for name, buckets in sums.items()}


def columns(series: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(series["columns"], row, strict=True)) for row in series["values"]]


def by_time(series: dict[str, Any], column: str) -> dict[int, float]:
    return {row["time"]: row[column] for row in columns(series)}


def only_value(series: list[dict[str, Any]]) -> Any:
    rows = [row for s in series for row in s["values"]]
    assert len(rows) == 1, series
    return rows[0][1]


def check_community_now(series: list[dict[str, Any]], selection: dict[str, list[str]]) -> None:
    last = max(p.ts_s for p in POINTS)
    expected = sum(p.metrics["power_w"] for p in POINTS
                   if p.device.kind == "meter" and p.ts_s == last)
    assert only_value(series) == pytest.approx(expected)


def check_alerts_firing(series: list[dict[str, Any]], selection: dict[str, list[str]]) -> None:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for alert in sorted(ALERTS, key=lambda a: a["ts"]):
        latest[(alert["rule_id"], alert["device_id"])] = alert
    expected = sum(1 for a in latest.values() if a["state"] == "firing")
    assert expected == 1 and only_value(series) == expected


def check_community_power(series: list[dict[str, Any]], selection: dict[str, list[str]]
                          ) -> None:
    expected = sum_of_means(lambda d: d.kind == "meter", lambda d: "all")["all"]
    assert len(series) == 1
    assert by_time(series[0], series[0]["columns"][1]) == pytest.approx(expected)
    assert len(expected) == 30


def _check_groups(series: list[dict[str, Any]], tag: str,
                  expected: dict[str, dict[int, float]]) -> None:
    got = {s["tags"][tag]: by_time(s, s["columns"][1]) for s in series}
    assert got.keys() == expected.keys()
    for name, buckets in expected.items():
        assert got[name] == pytest.approx(buckets), name


def check_per_building(series: list[dict[str, Any]], selection: dict[str, list[str]]) -> None:
    expected = sum_of_means(
        lambda d: d.building in selection["building"] and d.kind in selection["kind"],
        lambda d: str(d.building))
    assert expected  # the selection must pick some data, or the check proves nothing
    _check_groups(series, "building", expected)


def check_per_kind(series: list[dict[str, Any]], selection: dict[str, list[str]]) -> None:
    expected = sum_of_means(lambda d: d.kind in selection["kind"], lambda d: d.kind)
    _check_groups(series, "kind", expected)


def check_device_metrics(series: list[dict[str, Any]], selection: dict[str, list[str]]
                         ) -> None:
    got = {s["tags"]["device_id"]: columns(s) for s in series}
    assert got.keys() == set(selection["device"])
    for device_id, rows in got.items():
        for metric in selection["metric"]:
            values: dict[int, list[float]] = defaultdict(list)
            for p in POINTS:
                if p.device.device_id == device_id and metric in p.metrics:
                    values[_bucket_ms(p.ts_s)].append(p.metrics[metric])
            expected = {bucket: sum(v) / len(v) for bucket, v in values.items()}
            assert {row["time"]: row[f"mean_{metric}"] for row in rows} == pytest.approx(
                expected), (device_id, metric)


def check_alert_table(series: list[dict[str, Any]], selection: dict[str, list[str]]) -> None:
    rows = [row for s in series for row in columns(s)]
    expected = sorted(ALERTS, key=lambda a: a["ts"], reverse=True)
    assert [{k: row[k] for k in ("state", "severity", "rule_id", "device_id", "value",
                                 "message")} | {"ts": row["time"] / 1000}
            for row in rows] == [{k: a[k] for k in ("state", "severity", "rule_id",
                                                    "device_id", "value", "message", "ts")}
                                 for a in expected]


def _values(series: list[dict[str, Any]], column: str) -> list[str]:
    return [row[column] for s in series for row in columns(s)]


def check_building_variable(series: list[dict[str, Any]], selection: dict[str, list[str]]
                            ) -> None:
    assert _values(series, "value") == sorted({d.building for d in DEVICES if d.building})


def check_kind_variable(series: list[dict[str, Any]], selection: dict[str, list[str]]) -> None:
    assert _values(series, "value") == KINDS


def check_device_variable(series: list[dict[str, Any]], selection: dict[str, list[str]]
                          ) -> None:
    assert _values(series, "value") == sorted(
        d.device_id for d in DEVICES if d.kind in selection["kind"])


def check_metric_variable(series: list[dict[str, Any]], selection: dict[str, list[str]],
                          variable: dict[str, Any]) -> None:
    """SHOW FIELD KEYS, through the variable's own regex as Grafana applies it."""
    keys = _values(series, "fieldKey")
    pattern = variable.get("regex") or "/.*/"
    assert pattern.startswith("/") and pattern.endswith("/")
    shown = [k for k in keys if re.search(pattern[1:-1], k)]
    assert shown == ["energy_wh", "power_w", "temperature_c"]  # not `seq`


CHECKS: dict[str, Callable[..., None]] = {
    "Community power now": check_community_now,
    "Alerts firing": check_alerts_firing,
    "Community power": check_community_power,
    "Power per building": check_per_building,
    "Power per kind": check_per_kind,
    "$metric of $device": check_device_metrics,
    "Alerts (firing and resolved)": check_alert_table,
    "building": check_building_variable,
    "kind": check_kind_variable,
    "device": check_device_variable,
}

SELECTIONS = {
    # "All" of an include-all variable is every value it lists; two devices and metrics.
    "everything": {"building": ["b1", "b2"], "kind": KINDS,
                   "device": ["hvac-b1-lobby", "meter-main"], "metric": ["energy_wh", "power_w"]},
    "one-each": {"building": ["b1"], "kind": ["hvac"], "device": ["hvac-b1-lobby"],
                 "metric": ["temperature_c"]},
}


@pytest.mark.parametrize("selection_name", list(SELECTIONS))
def test_every_dashboard_query_returns_the_data_written(
    influxdb: InfluxDB, selection_name: str
) -> None:
    selection = SELECTIONS[selection_name]
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 11  # 7 panels, 4 variables
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == set(selection)
    checked = []
    for query in queries:
        series = run(influxdb, render(query.text, selection))
        if query.key == "metric":
            check_metric_variable(series, selection, query.extra)
        else:
            assert query.key in CHECKS, f"{query.where} has no check in tests/test_grafana.py"
            CHECKS[query.key](series, selection)
        checked.append(query.key)
    assert set(checked) == set(CHECKS) | {"metric"}


def test_render_formats_variables_like_grafana() -> None:
    selection = {"device": ["a.b", "c-d"], "metric": ["x"]}
    assert render('WHERE "device_id" =~ /^$device$/ AND $timeFilter GROUP BY time($__interval)',
                  selection) == (
        f'WHERE "device_id" =~ /^(a\\.b|c-d)$/ AND time >= {RANGE_MS[0]}ms and time <= '
        f"{RANGE_MS[1]}ms GROUP BY time(1m)")
    assert render("SELECT mean(/^${metric}$/)", selection) == "SELECT mean(/^x$/)"
    with pytest.raises(AssertionError, match="unrendered"):
        render("WHERE \"device_id\" = '$device'", selection)


def test_dashboard_uses_the_provisioned_data_source() -> None:
    """Every panel, target and variable names the data source by the uid provisioning gives
    it, so the dashboard works on a fresh Grafana without picking a data source by hand."""
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "scgw.yaml").read_text())
    (datasource,) = source["datasources"]
    assert datasource["type"] == "influxdb" and datasource["jsonData"]["version"] == "InfluxQL"
    assert datasource["jsonData"]["dbName"] == datasource["database"] == "scgw"
    assert datasource["url"] == "${SCGW_INFLUXDB_URL}"
    assert datasource["secureJsonData"]["password"] == "${SCGW_INFLUXDB_PASSWORD}"
    assert "password" not in datasource  # only in secureJsonData, encrypted by Grafana
    dashboard = json.loads(DASHBOARD.read_text())
    refs = [p["datasource"] for p in _panels(dashboard)]
    refs += [t["datasource"] for p in _panels(dashboard) for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert refs and all(r == {"type": "influxdb", "uid": datasource["uid"]} for r in refs)
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "scgw.yaml").read_text())
    (files,) = provider["providers"]
    assert files["type"] == "file" and files["options"]["path"]
    # Grafana expands $VARS in provisioning files: a literal `$` there must be written `$$`.
    for path in (GRAFANA / "provisioning").rglob("*.yaml"):
        for name in re.findall(r"\$\{?(\w+)", path.read_text()):
            assert name.startswith("SCGW_"), (path, name)
