"""The telemetry worker end to end: real Mosquitto, real InfluxDB 1.x, the local store on SQLite.

Readings go in over MQTT as devices send them; arrival is checked per device by seq in
InfluxDB and by count in the local store's rollups. The kill -9 test runs the worker as the
main process does (`python -m gateway.telemetry.worker`, config JSON on stdin). Conditions are
awaited with deadlines (`wait_until`), never slept on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

from gateway.config import SiteConfig
from gateway.store.db import upgrade
from gateway.telemetry import worker as worker_module
from gateway.telemetry.rollups import minute_of
from gateway.telemetry.spool_ingest import SpoolIngestor
from gateway.telemetry.worker import TelemetryWorker, run_worker
from gateway.telemetry.worker_config import WorkerConfig
from simulators.demo.broker import Mosquitto
from tests.influx_servers import InfluxDB, influxdb_server, wait_until

BASE = round(time.time()) - 7200.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def influxdb() -> Iterator[InfluxDB]:
    with influxdb_server() as server:
        yield server


def site_config(broker: Mosquitto, tmp_path: Path, devices: list[str], *,
                influx: InfluxDB | None = None, migrate: bool = True,
                **telemetry: Any) -> SiteConfig:
    url = f"sqlite:///{tmp_path / 'scgw.db'}"
    if migrate:
        upgrade(url)
    raw: dict[str, Any] = {
        "site": {"id": f"s-{uuid.uuid4().hex[:8]}"},
        "mqtt": {"url": broker.url, "root": f"t{uuid.uuid4().hex[:8]}"},
        "database": {"url": url}, "telemetry": telemetry,
        "devices": [{"device_id": d, "kind": "hvac" if d.startswith("ahu") else "meter"}
                    for d in devices]}
    if influx is not None:
        raw["influxdb"] = {"url": influx.url, "api": "v1", "database": influx.database}
    return SiteConfig.model_validate(raw)


class Mqtt:
    """A device-side client: publishes readings (QoS 1) and keeps the worker's health."""

    def __init__(self, broker: Mosquitto, config: SiteConfig) -> None:
        self.root = config.mqtt.root
        self.health: dict[str, Any] = {}
        topic = f"{self.root}/gateway/{config.site.id}/telemetry"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
        self.client.max_inflight_messages_set(500)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = lambda _c, _u, m: self.health.update(
            {"report": json.loads(m.payload)})
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.sent: dict[tuple[str, int], float] = {}  # (device, seq) -> when published

    @property
    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = self.health.get("report", {})
        return report

    def send(self, device: str, payload: Any, qos: int = 1) -> mqtt.MQTTMessageInfo:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.client.publish(f"{self.root}/devices/{device}/telemetry", raw, qos=qos)

    def reading(self, device: str, seq: int, **metrics: float) -> mqtt.MQTTMessageInfo:
        self.sent[(device, seq)] = time.time()
        return self.send(device, {"ts": BASE + seq * 0.001, "seq": seq,
                                  "metrics": {"power_w": 100.0 + seq, **metrics}})

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def mqtt_client(broker: Mosquitto, config: SiteConfig) -> Iterator[Mqtt]:
    client = Mqtt(broker, config)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def worker_thread(config: SiteConfig, **options: Any) -> Iterator[TelemetryWorker]:
    worker = TelemetryWorker(WorkerConfig.from_site(config), **options)
    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(worker.run(stop)), name="worker")
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive() and result == [0]


def worker_process(config: SiteConfig, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.telemetry.worker"],
                                stdin=subprocess.PIPE, stderr=out, cwd=REPO)
    assert proc.stdin is not None
    proc.stdin.write(WorkerConfig.from_site(config).to_json().encode())
    proc.stdin.close()
    return proc


def subscribed(client: Mqtt, pid: int | None = None) -> bool:
    report = client.report
    return bool(report.get("mqtt", {}).get("subscribed")) and (pid is None
                                                                or report.get("pid") == pid)


def store_counts(config: SiteConfig) -> dict[str, int]:
    """Readings per device in the local store (each reading has one power_w value)."""
    engine = create_engine(config.database.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT device_id, SUM(count) FROM telemetry_rollups "
                                     "WHERE metric = 'power_w' GROUP BY device_id")).all()
    finally:
        engine.dispose()
    return {device: int(count) for device, count in rows}


def influx_seqs(server: InfluxDB, config: SiteConfig) -> dict[str, list[int]]:
    series = server.query(f"SELECT seq FROM telemetry WHERE site = '{config.site.id}' "
                          "GROUP BY device_id", database=server.database)
    return {s["tags"]["device_id"]: sorted(v[1] for v in s["values"]) for s in series}


def drained(client: Mqtt) -> bool:
    consumers = client.report.get("spool", {}).get("consumers", {})
    return bool(consumers) and all(c["depth_records"] == 0 for c in consumers.values())


HEALTH_KEYS = {"online", "handing_over", "site", "pid", "ts", "started_at", "mqtt", "ingest",
               "spool", "sinks"}
SPOOL_KEYS = {"bytes", "max_bytes", "disk_bytes", "buffered_bytes", "segments", "appended",
              "dropped", "written_recno", "synced_recno", "truncated_bytes", "consumers"}
SINK_KEYS = {"state", "lag_s", "written", "retries", "quarantined", "last_error"}


# ---- every reading arrives -------------------------------------------------------------------


def test_every_reading_arrives_in_influxdb_and_the_local_store(
        mosquitto: Mosquitto, influxdb: InfluxDB, tmp_path: Path) -> None:
    devices = ["m-01", "m-02", "m-03", "ahu-1"]
    config = site_config(mosquitto, tmp_path, devices, influx=influxdb)
    with worker_thread(config), mqtt_client(mosquitto, config) as client:
        wait_until(lambda: subscribed(client), 30, "the worker's subscription")
        for device in devices:
            for seq in range(1, 201):  # singles
                client.reading(device, seq)
            client.send(device, {"readings": [  # and batches
                {"ts": BASE + seq * 0.001, "seq": seq, "metrics": {"power_w": float(seq)}}
                for seq in range(201, 501)]})
        expected = {d: list(range(1, 501)) for d in devices}
        wait_until(lambda: influx_seqs(influxdb, config) == expected, 60, "InfluxDB")
        wait_until(lambda: store_counts(config) == {d: 500 for d in devices}, 60, "local store")
        wait_until(lambda: client.report["ingest"]["accepted"] == 2000 and drained(client),
                   30, "a report after the drain")
        report = client.report
    assert set(report) == HEALTH_KEYS and set(report["spool"]) == SPOOL_KEYS
    assert set(report["sinks"]) == {"local", "rules", "influxdb"}
    assert all(set(sink) == SINK_KEYS for name, sink in report["sinks"].items()
               if name != "rules")
    assert set(report["sinks"]["rules"]) == SINK_KEYS | {"fired", "resolved", "engine_errors"}
    assert set(report["spool"]["consumers"]["local"]) == {
        "depth_records", "depth_bytes", "oldest_age_s", "dropped"}
    assert report["ingest"]["refused"] == {} and report["mqtt"]["fast_path"] is True
    assert report["sinks"]["influxdb"]["state"] == "ok"
    assert report["sinks"]["influxdb"]["written"] == report["sinks"]["local"]["written"] == 2000


@pytest.mark.parametrize("fast_path", [False], ids=["stock-paho"])
def test_stock_paho_path_delivers_the_same(mosquitto: Mosquitto, tmp_path: Path,
                                           fast_path: bool) -> None:
    config = site_config(mosquitto, tmp_path, ["m-01"])
    with worker_thread(config, fast_path=fast_path), mqtt_client(mosquitto, config) as client:
        wait_until(lambda: subscribed(client), 30, "the worker's subscription")
        for seq in range(1, 301):
            client.reading("m-01", seq)
        client.reading("m-01", 150)  # a repeat
        wait_until(lambda: store_counts(config) == {"m-01": 300}, 60, "local store")
        wait_until(lambda: client.report["ingest"]["duplicates"] == 1, 30, "duplicate counted")
        assert client.report["mqtt"]["fast_path"] is False


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_is_counted_by_reason_and_the_next_good_reading_arrives(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    config = site_config(mosquitto, tmp_path, ["m-01"])
    bad: list[bytes | dict[str, Any]] = [
        b'{"ts": 1763800000, "metrics": {"power_w": NaN}}',
        b'{"metrics": {"power_w": Infinity}}',
        {"metrics": {"power_w": "1200"}},
        {"metrics": {"power_w": None, "energy_wh": [1]}},
        b"x" * (1 << 20),
        {"metrics": {f"m{i}": i for i in range(10_000)}},
        {"metrics": {f"m{i}": i for i in range(300)}},
        {"metrics": {"Power W": 1.0}},
        {"ts": 4_102_444_800.0, "metrics": {"power_w": 1.0}},  # 2100
        {"seq": -5, "metrics": {"power_w": 1.0}},
        {"metrics": {}},
        b"not json",
        b"[]",
    ]
    with worker_thread(config), mqtt_client(mosquitto, config) as client:
        wait_until(lambda: subscribed(client), 30, "the worker's subscription")
        for payload in bad:
            client.send("m-01", payload)
        client.send("intruder", {"metrics": {"power_w": 1.0}})
        client.reading("m-01", 1)
        wait_until(lambda: store_counts(config) == {"m-01": 1}, 30, "the good reading")
        expected = {"not_finite": 2, "wrong_type": 3, "oversize": 2, "too_many_metrics": 1,
                    "bad_metric_name": 1, "bad_timestamp": 1, "bad_seq": 1, "no_metrics": 1,
                    "malformed": 2, "unknown_device": 1}
        wait_until(lambda: client.report["ingest"]["refused"] == expected, 30,
                   "every refusal counted")
        assert client.report["ingest"]["accepted"] == 1


def test_nobody_speaks_for_a_polled_unit_but_the_poller(mosquitto: Mosquitto,
                                                          tmp_path: Path) -> None:
    config = site_config(mosquitto, tmp_path, ["m-01"])
    unit = {"device_id": "ahu-polled", "kind": "hvac", "profile": "heat-pump-split",
            "host": "127.0.0.1", "port": 1502}
    config = SiteConfig.model_validate({**config.model_dump(mode="json"),
                                        "devices": [*config.model_dump(mode="json")["devices"],
                                                    unit]})
    with worker_thread(config), mqtt_client(mosquitto, config) as client:
        wait_until(lambda: subscribed(client), 30, "the worker's subscription")
        client.reading("ahu-polled", 1)  # someone speaking for the unit on its device topic
        poller = f"{config.mqtt.root}/gateway/{config.site.id}/polled/ahu-polled"
        client.client.publish(poller, json.dumps({"ts": BASE, "seq": 2,
                                                  "metrics": {"power_w": 5.0}}), qos=1)
        client.client.publish(f"{config.mqtt.root}/gateway/{config.site.id}/polled/m-01",
                              json.dumps({"metrics": {"power_w": 5.0}}), qos=1)
        wait_until(lambda: store_counts(config) == {"ahu-polled": 1}, 30, "the poller's reading")
        wait_until(lambda: client.report["ingest"]["refused"] == {
            "polled_unit": 1, "unknown_device": 1}, 30, "the forged readings refused")


# ---- kill -9 ---------------------------------------------------------------------------------


def test_kill_9_loses_at_most_one_fsync_interval_and_queued_readings_arrive(
        mosquitto: Mosquitto, influxdb: InfluxDB, tmp_path: Path) -> None:
    devices, interval = ["m-01", "m-02", "m-03"], 1.0
    config = site_config(mosquitto, tmp_path, devices, influx=influxdb,
                         fsync_interval_s=interval)
    log = tmp_path / "worker.log"
    first = worker_process(config, log)
    with mqtt_client(mosquitto, config) as client:
        wait_until(lambda: subscribed(client, first.pid), 30, "the first worker")
        seq = 0

        def publish(until: threading.Event) -> None:  # ~600 readings/s, paced
            nonlocal seq
            started = time.monotonic()
            while not until.is_set():
                seq += 1
                for device in devices:
                    client.reading(device, seq)
                time.sleep(max(0.0, started + seq / 200 - time.monotonic()))

        done = threading.Event()
        flow = threading.Thread(target=publish, args=(done,), name="publisher")
        flow.start()
        try:
            wait_until(lambda: client.report.get("ingest", {}).get("accepted", 0) >= 1500, 30,
                       "readings flowing into the first worker")
            killed_at, seq_at_kill = time.time(), seq
            first.send_signal(signal.SIGKILL)
            first.wait()
            wait_until(lambda: seq >= seq_at_kill + 300, 30,
                       "readings published while the worker is down")
            second = worker_process(config, log)
            wait_until(lambda: subscribed(client, second.pid), 30, "the restarted worker")
        finally:
            done.set()
            flow.join()
        last = seq
        expected_max = {d: last for d in devices}
        wait_until(lambda: {d: max(s) for d, s in influx_seqs(influxdb, config).items()}
                   == expected_max, 60, "the last readings in InfluxDB")
        wait_until(lambda: subscribed(client, second.pid) and drained(client), 60, "a drain")
        stored = influx_seqs(influxdb, config)
        lost = sorted((d, s) for d in devices for s in range(1, last + 1)
                      if s not in set(stored[d]))
        late = [(d, s) for d, s in lost if client.sent[(d, s)] < killed_at - interval - 1.0]
        after_kill = [(d, s) for d, s in lost if client.sent[(d, s)] > killed_at]
        print(f"published {len(client.sent)}, lost {len(lost)} around the kill: {lost[:12]}")
        assert late == [] and after_kill == []  # at most one interval's worth, before the kill
        # Duplicates harmless: every reading counted once in the rollups, too.
        assert store_counts(config) == {d: len(stored[d]) for d in devices}
        report = client.report
        assert report["sinks"]["local"]["quarantined"] == 0
        assert report["sinks"]["influxdb"]["quarantined"] == 0
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        wait_until(lambda: client.report.get("online") is False, 10, "the offline report")
    assert "Traceback" not in log.read_text()


def test_a_reading_delivered_again_after_a_restart_is_counted_once(mosquitto: Mosquitto,
                                                                  tmp_path: Path) -> None:
    """What the broker redelivers after a crash (appended, PUBACK never sent) is a duplicate
    for the restarted worker: its seq state comes back from the spool's tail."""
    config = site_config(mosquitto, tmp_path, ["m-01", "m-02"])
    with mqtt_client(mosquitto, config) as client:
        with worker_thread(config):
            wait_until(lambda: subscribed(client), 30, "the worker's subscription")
            for seq in range(1, 101):
                client.reading("m-01", seq)
                client.reading("m-02", seq)
            wait_until(lambda: store_counts(config) == {"m-01": 100, "m-02": 100}, 30, "store")
        with worker_thread(config) as again:
            wait_until(lambda: subscribed(client) and again.connects == 1, 30, "the restart")
            for seq in range(95, 106):
                client.reading("m-01", seq)
            wait_until(lambda: store_counts(config) == {"m-01": 105, "m-02": 100}, 30, "store")
            assert again.ingest.duplicates == 6 and again.ingest.accepted == 5


# ---- spool full ------------------------------------------------------------------------------


def test_a_full_spool_drops_the_oldest_and_counts_them(mosquitto: Mosquitto,
                                                        tmp_path: Path) -> None:
    config = site_config(mosquitto, tmp_path, ["m-01"], migrate=False, spool_max_mb=1)
    total = 20_000
    start = round(time.time()) - 2 * total  # all in the past: none is refused as ahead
    with worker_thread(config, retry_max_s=0.5), mqtt_client(mosquitto, config) as client:
        wait_until(lambda: subscribed(client), 30, "the worker's subscription")
        for first in range(0, total, 200):  # one reading per second of event time
            client.send("m-01", {"readings": [
                {"ts": start + i, "seq": i, "metrics": {"power_w": float(i)}}
                for i in range(first, first + 200)]})
        wait_until(lambda: client.report["ingest"]["accepted"] == total, 60, "ingest")
        local = client.report["sinks"]["local"]
        assert local["state"] == "retrying" and "telemetry" in (local["last_error"] or "")
        upgrade(config.database.url)  # the local store becomes writable: drain what is left
        wait_until(lambda: drained(client) and client.report["sinks"]["local"]["state"] == "ok",
                   60, "the drain")
        report = client.report
    dropped = report["spool"]["consumers"]["local"]["dropped"]
    assert 0 < dropped < total and report["spool"]["dropped"] == dropped
    assert report["spool"]["disk_bytes"] <= 1 << 20
    assert store_counts(config) == {"m-01": total - dropped}
    engine = create_engine(config.database.url)
    with engine.connect() as conn:
        oldest = conn.execute(text("SELECT MIN(minute) FROM telemetry_rollups")).scalar_one()
    engine.dispose()
    assert oldest == minute_of(start + dropped)  # exactly the oldest went


# ---- staying up, and failing loudly ----------------------------------------------------------


def test_the_worker_reconnects_after_a_broker_restart(own_mosquitto: Mosquitto,
                                                      tmp_path: Path) -> None:
    config = site_config(own_mosquitto, tmp_path, ["m-01"])
    with worker_thread(config) as worker, mqtt_client(own_mosquitto, config) as client:
        wait_until(lambda: subscribed(client), 30, "the worker's subscription")
        client.reading("m-01", 1)
        wait_until(lambda: store_counts(config) == {"m-01": 1}, 30, "the first reading")
        own_mosquitto.stop()
        own_mosquitto.start()
        wait_until(lambda: worker.connects == 2 and subscribed(client), 60, "a reconnect")
        client.reading("m-01", 2).wait_for_publish(10)
        wait_until(lambda: store_counts(config) == {"m-01": 2}, 30, "the next reading")


def test_a_dead_local_store_thread_ends_the_worker_with_an_error(
        mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __init__(self, *_: Any) -> None: ...

        def applied_recno(self, consumer: str = "local") -> int:
            raise RuntimeError("a bug")

    monkeypatch.setattr(worker_module, "RollupStore", Broken)
    config = site_config(mosquitto, tmp_path, ["m-01"])
    assert run_worker(WorkerConfig.from_site(config), threading.Event()) == 1


def test_a_dead_ingest_thread_ends_the_worker_and_the_reading_comes_again(
        mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool refusing an append kills paho's thread before the PUBACK: exit 1, and the
    broker keeps the reading for the restarted worker."""
    config = site_config(mosquitto, tmp_path, ["m-01"])
    real_flush = SpoolIngestor.flush

    def failing_flush(self: SpoolIngestor) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(SpoolIngestor, "flush", failing_flush)
    result: list[int] = []
    view = WorkerConfig.from_site(config)
    thread = threading.Thread(target=lambda: result.append(run_worker(view)), name="worker")
    thread.start()
    with mqtt_client(mosquitto, config) as client:
        wait_until(lambda: subscribed(client), 30, "the worker's subscription")
        client.reading("m-01", 1)
        thread.join(timeout=30)
        assert result == [1]
        monkeypatch.setattr(SpoolIngestor, "flush", real_flush)
        with worker_thread(config):
            wait_until(lambda: store_counts(config) == {"m-01": 1}, 30, "the redelivery")
