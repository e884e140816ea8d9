"""InfluxDB writers against real servers: InfluxDB 1.x (`/write`) and VictoriaMetrics (v2).

Readings go through the real spool; arrival is checked per device by seq. Conditions are
awaited with deadlines (`wait_until`), never slept on.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from device_drivers.vocabulary import Reading
from gateway.telemetry.influx_http import Response, V1Transport, V2Transport
from gateway.telemetry.line_protocol import alert_line, parse_line, reading_line
from gateway.telemetry.records import decode_record, encode_alert, encode_reading
from gateway.telemetry.spool import Spool
from gateway.telemetry.writers import InfluxWriter, WriterState, build_writer
from simulators.demo.broker import free_port
from tests.influx_servers import (
    InfluxDB,
    VictoriaMetrics,
    influxdb_server,
    victoria_metrics_server,
    wait_until,
)

SITE = "maple-court"
BASE = round(time.time()) - 3600.0


def readings(device: str, first: int, count: int, **extra: float) -> list[bytes]:
    out = []
    for seq in range(first, first + count):
        reading = Reading(device, "meter", BASE + seq * 0.01,
                          {"power_w": 1000.0 + seq, "energy_wh": 5e5 + seq, **extra}, seq)
        record = encode_reading(reading, SITE)
        assert record is not None
        out.append(record)
    return out


@pytest.fixture
def influxdb() -> Iterator[InfluxDB]:
    with influxdb_server() as server:
        yield server


@pytest.fixture
def influxdb_auth() -> Iterator[InfluxDB]:
    with influxdb_server(auth=True) as server:
        yield server


@pytest.fixture
def victoria_metrics() -> Iterator[VictoriaMetrics]:
    with victoria_metrics_server() as server:
        yield server


@contextmanager
def running(writer: InfluxWriter) -> Iterator[InfluxWriter]:
    thread = threading.Thread(target=writer.run, name="writer", daemon=True)
    thread.start()
    try:
        yield writer
    finally:
        writer.stop()
        thread.join(timeout=60)
        writer.transport.close()
        assert not thread.is_alive()


def drained(spool: Spool) -> bool:
    return spool.stats().consumers["influxdb"].depth_records == 0


def influx_seq_stats(server: InfluxDB) -> dict[str, tuple[int, int, int, int]]:
    """device_id -> (points, distinct seqs, min seq, max seq) in InfluxDB."""
    series = server.query(
        "SELECT count(seq), count(distinct(seq)), min(seq), max(seq) FROM telemetry "
        f"WHERE site = '{SITE}' GROUP BY device_id", database=server.database)
    return {s["tags"]["device_id"]: tuple(s["values"][0][1:]) for s in series}


# ---- line protocol and records (no server) ------------------------------------------------


def test_reading_line_schema_and_what_it_leaves_out() -> None:
    reading = Reading("ahu-1", "hvac", 1_760_000_000.5,
                      {"power_w": 12.0, "bad": math.nan, "worse": math.inf, "seq": 9.0,
                       "time": 1.0, "running": 1}, 42)
    assert reading_line(reading, SITE) == (
        "telemetry,device_id=ahu-1,kind=hvac,site=maple-court power_w=12.0,running=1.0,"
        "seq=42i 1760000000500")
    assert reading_line(Reading("a", "meter", 1.0, {"x": math.nan}, None), SITE) is None
    assert reading_line(Reading("a", "meter", math.nan, {"x": 1.0}, 1), SITE) is None
    huge = Reading("a", "meter", 1.0, {"x": 10**400, "y": 2}, None)  # an int beyond float
    assert reading_line(huge, SITE) == (
        "telemetry,device_id=a,kind=meter,site=maple-court y=2.0 1000")


def test_escaping_round_trips_through_the_parser() -> None:
    reading = Reading("dev ice,1=2", "me\\ter", 1_760_000_000.25, {"odd key,=": 1.5}, 7)
    record = encode_reading(reading, "site x")
    assert record is not None and b"\n" not in record
    decoded = decode_record(record)
    assert decoded == Reading("dev ice,1=2", "me/ter", 1_760_000_000.25, {"odd key,=": 1.5}, 7)
    alert = {"rule_id": "night-run", "device_id": "ahu-1", "severity": "warning",
             "state": "firing", "value": 3.5, "ts": 1_760_000_001.0,
             "message": 'quote " backslash \\ comma, = and\nnewline'}
    line = alert_line(alert, SITE)
    assert line is not None and "\n" not in line
    measurement, tags, fields, ts = parse_line(line)
    assert (measurement, ts) == ("alerts", 1_760_000_001_000)
    assert tags == {"device_id": "ahu-1", "rule_id": "night-run", "severity": "warning",
                    "site": SITE}
    assert fields["message"] == 'quote " backslash \\ comma, = and\\nnewline'
    assert fields["state"] == "firing" and fields["value"] == 3.5


# ---- the writer's decisions, with a scripted transport (no server) ------------------------


class Scripted:
    """A transport that refuses lines containing b"bad" without saying which (bisect)."""

    description = "scripted"

    def __init__(self, answers: list[Response] | None = None) -> None:
        self.answers = answers or []
        self.bodies: list[bytes] = []
        self.accepted: list[bytes] = []

    def post(self, body: bytes) -> Response:
        self.bodies.append(body)
        if self.answers:
            return self.answers.pop(0)
        if b"bad" in body:
            return Response(400, "unable to parse 'something else': invalid field format")
        self.accepted.extend(body.split(b"\n"))
        return Response(204)

    def close(self) -> None:
        pass


def test_refused_points_are_bisected_out_and_the_rest_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["influxdb"])
    records = readings("good", 0, 1000)
    records[10] = records[10].replace(b"power_w", b"bad_w")
    records[777] = records[777].replace(b"power_w", b"bad_w")
    spool.append(records)
    transport = Scripted([Response(None, "ConnectError"), Response(503, "busy"),
                          Response(413, "too large")])
    writer = InfluxWriter(spool, transport, quarantine_path=tmp_path / "q.jsonl",
                          backoff_base_s=0.001, backoff_max_s=0.01)
    while spool.stats().consumers["influxdb"].depth_records:
        writer.step(wait_s=0)
    assert writer.quarantined == 2 and writer.retries == 2 and writer.written == 998
    assert sorted(transport.accepted) == sorted(r for r in records if b"bad" not in r)
    quarantined = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [q["line"].encode() for q in quarantined] == [records[10], records[777]]
    assert writer.state is WriterState.OK
    spool.close()


def test_a_retried_batch_dropped_by_a_full_spool_is_abandoned(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["influxdb"], max_bytes=256 << 10, segment_bytes=64 << 10)
    spool.append(readings("m-01", 0, 200))

    class Down(Scripted):
        def post(self, body: bytes) -> Response:
            spool.append(readings("m-01", 10_000, 500))  # ingest goes on during the outage
            return Response(None, "ConnectError: refused")

    writer = InfluxWriter(spool, Down(), backoff_base_s=0.001, backoff_max_s=0.001)
    writer.step(wait_s=0)  # returns once the spool dropped the batch under it
    stats = spool.stats()
    assert stats.consumers["influxdb"].dropped >= 200
    assert writer.written == 0 and writer.retries >= 1
    spool.close()


# ---- real servers ---------------------------------------------------------------------


def test_v1_every_reading_arrives(tmp_path: Path, influxdb: InfluxDB) -> None:
    spool = Spool(tmp_path, ["influxdb"])
    writer = build_writer(spool, api="v1", url=influxdb.url, database=influxdb.database)
    devices = ["m-01", "m-02", "ahu-1"]
    with running(writer):
        for first in range(0, 6000, 1000):
            spool.append(r for d in devices for r in readings(d, first, 1000))
        alert = {"rule_id": "night-run", "device_id": "ahu-1", "severity": "warning",
                 "state": "firing", "value": 2.5, "ts": BASE, "message": 'ran "at 3 am"'}
        spool.append([encode_alert(alert, SITE) or b""])
        expected = {d: (6000, 6000, 0, 5999) for d in devices}
        wait_until(lambda: influx_seq_stats(influxdb) == expected, 60, "every seq in InfluxDB")
        wait_until(lambda: drained(spool), 30, "the last ack")
        assert writer.written == 18_001 and writer.quarantined == 0
        assert writer.state is WriterState.OK and writer.lag_s == 0.0
    rows = influxdb.query("SELECT state, value, message FROM alerts", database="scgw")
    assert rows[0]["values"] == [[int(BASE * 1000), "firing", 2.5, 'ran "at 3 am"']]
    spool.close()


def test_v2_every_reading_arrives_in_victoria_metrics(
        tmp_path: Path, victoria_metrics: VictoriaMetrics) -> None:
    spool = Spool(tmp_path, ["influxdb"])
    writer = build_writer(spool, api="v2", url=victoria_metrics.url, org="maple",
                          bucket="scgw")
    devices = ["m-01", "m-02"]

    def seqs() -> dict[str, list[int]]:
        found: dict[str, set[int]] = {}
        for series in victoria_metrics.export(f'{{__name__="telemetry_seq",site="{SITE}"}}'):
            found.setdefault(series["metric"]["device_id"], set()).update(
                int(v) for v in series["values"])
        return {device: sorted(values) for device, values in found.items()}

    with running(writer):
        for first in range(0, 4000, 500):
            spool.append(r for d in devices for r in readings(d, first, 500))
        expected = {d: list(range(4000)) for d in devices}
        wait_until(lambda: seqs() == expected, 60, "every seq in VictoriaMetrics", 0.5)
        wait_until(lambda: drained(spool), 30, "the last ack")
        assert writer.written == 8000 and writer.state is WriterState.OK
    spool.close()


def test_influxdb_outage_loses_nothing_and_the_backlog_drains(
        tmp_path: Path, influxdb: InfluxDB) -> None:
    """InfluxDB stopped while ~2,000 readings/s flow, until 20,000 (about 10 s) are queued."""
    spool = Spool(tmp_path, ["influxdb"], fsync_interval_s=0.5)
    writer = build_writer(spool, api="v1", url=influxdb.url, database=influxdb.database)
    writer.backoff_max_s = 2.0
    produced = {"m-01": 0, "m-02": 0}
    stop = threading.Event()

    def produce() -> None:  # 2 devices x 50 readings every 50 ms
        while not stop.wait(0.05):
            for device in produced:
                spool.append(readings(device, produced[device], 50))
                produced[device] += 50

    producer = threading.Thread(target=produce, daemon=True)
    with running(writer):
        producer.start()
        wait_until(lambda: writer.written >= 2000, 30, "writes before the outage")
        influxdb.stop()
        wait_until(lambda: writer.state is WriterState.RETRYING, 30, "the writer to notice")
        wait_until(lambda: spool.stats().consumers["influxdb"].depth_records >= 20_000, 60,
                   "a backlog of 20,000 readings")
        influxdb.start()
        wait_until(lambda: writer.written >= 40_000, 60, "writes after the restart")
        stop.set()
        producer.join()
        expected = {d: (n, n, 0, n - 1) for d, n in produced.items()}
        wait_until(lambda: influx_seq_stats(influxdb) == expected, 90, "the backlog to drain")
        wait_until(lambda: drained(spool), 30, "the last ack")
        assert writer.retries > 0 and writer.state is WriterState.OK
        assert writer.quarantined == 0 and spool.stats().dropped == 0
    spool.close()


def test_field_type_conflict_is_quarantined_and_later_points_land(
        tmp_path: Path, influxdb: InfluxDB, caplog: pytest.LogCaptureFixture) -> None:
    conflict = influxdb.write(
        f'telemetry,device_id=legacy,kind=meter,site={SITE} mode="auto" {int(BASE * 1000)}')
    assert conflict.status_code == 204
    spool = Spool(tmp_path / "spool", ["influxdb"])
    quarantine = tmp_path / "quarantine.jsonl"
    writer = build_writer(spool, api="v1", url=influxdb.url, database=influxdb.database,
                          quarantine_path=quarantine)
    caplog.set_level(logging.WARNING)
    with running(writer):
        for first in range(0, 3000, 1000):  # bad points in the middle of good ones
            spool.append(readings("m-01", first, 500))
            spool.append(readings("bad-1", first, 100, mode=1.0))
            spool.append(readings("m-01", first + 500, 500))
        spool.append(readings("m-02", 0, 1000))  # and good points after them
        wait_until(lambda: influx_seq_stats(influxdb).get("m-02") == (1000, 1000, 0, 999), 60,
                   "the points after the conflict")
        wait_until(lambda: drained(spool), 30, "the last ack")
        stats = influx_seq_stats(influxdb)
        assert stats["m-01"] == (3000, 3000, 0, 2999)
        assert "bad-1" not in stats
        assert writer.quarantined == 300 and writer.written == 4000
    lines = [json.loads(x) for x in quarantine.read_text().splitlines()]
    assert len(lines) == 300 and all("bad-1" in q["line"] for q in lines)
    assert "field type conflict" in lines[0]["reason"]
    assert sum("quarantined" in r.getMessage() for r in caplog.records) == 1
    spool.close()


def test_wrong_credentials_are_reported_as_auth_failed(
        tmp_path: Path, influxdb_auth: InfluxDB, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, ["influxdb"])
    spool.append(readings("m-01", 0, 100))
    writer = InfluxWriter(spool, V1Transport(influxdb_auth.url, "scgw", username="admin",
                                             password="wrong"), auth_backoff_s=0.05)
    caplog.set_level(logging.WARNING)
    with running(writer):
        wait_until(lambda: writer.state is WriterState.AUTH_FAILED and writer.retries >= 3,
                   30, "auth_failed")
        assert writer.last_error is not None and "HTTP 401" in writer.last_error
        assert spool.stats().consumers["influxdb"].depth_records == 100  # nothing acked
    failures = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR

    user, password = influxdb_auth.admin
    writer = build_writer(spool, api="v1", url=influxdb_auth.url, database="scgw",
                          username=user, password=password)
    with running(writer):
        wait_until(lambda: influx_seq_stats(influxdb_auth).get("m-01") == (100, 100, 0, 99),
                   30, "writes with the right password")
    spool.close()


def test_v2_wrong_token_is_reported_as_auth_failed(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, ["influxdb"])
    spool.append(readings("m-01", 0, 10))
    caplog.set_level(logging.WARNING)
    with victoria_metrics_server(basic_auth=("scgw", "secret")) as server:
        writer = InfluxWriter(spool, V2Transport(server.url, "maple", "scgw", token="wrong"),
                              auth_backoff_s=0.05)
        with running(writer):
            wait_until(lambda: writer.state is WriterState.AUTH_FAILED and writer.retries >= 2,
                       30, "auth_failed")
        assert writer.last_error is not None and "HTTP 401" in writer.last_error
    assert sum("authentication failed" in r.getMessage() for r in caplog.records) == 1
    assert spool.stats().consumers["influxdb"].depth_records == 10
    spool.close()


def test_v1_creates_a_missing_database(tmp_path: Path, influxdb: InfluxDB) -> None:
    spool = Spool(tmp_path, ["influxdb"])
    spool.append(readings("m-01", 0, 50))
    writer = build_writer(spool, api="v1", url=influxdb.url, database="fresh")
    writer.backoff_base_s = 0.05
    with running(writer):
        wait_until(lambda: drained(spool), 30, "writes into the created database")
    count = influxdb.query("SELECT count(seq) FROM telemetry", database="fresh")
    assert count[0]["values"][0][1] == 50
    spool.close()


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_an_unreachable_server_is_no_answer_not_an_exception(api: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    transport = (V1Transport(url, "scgw", timeout_s=2.0) if api == "v1"
                 else V2Transport(url, "org", "scgw", timeout_s=2.0))
    response = transport.post(b"telemetry,device_id=a,kind=meter,site=s seq=1i 1")
    transport.close()
    assert response.status is None and not response.ok and response.message
