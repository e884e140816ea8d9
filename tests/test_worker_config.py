"""The telemetry worker's view of the site file (worker_config.py) and its database URL
handling (local_db.py): what crosses the pipe is what the gateway validated, secrets
included but never shown, and a bad input names the key."""

from __future__ import annotations

import json

import pytest

from gateway.config import SiteConfig
from gateway.telemetry.local_db import LocalDb, LocalDbError, postgres_conninfo
from gateway.telemetry.rollups import RollupStore
from gateway.telemetry.rules_site import site_context
from gateway.telemetry.worker_config import WorkerConfig, WorkerConfigError

SITE = SiteConfig.model_validate({
    "site": {"id": "east", "timezone": "Asia/Shanghai",
             "calendar": {"hours": {"mon-fri": "08:00-18:00"}}},
    "mqtt": {"url": "mqtts://broker.example:8884", "root": "estate", "username": "gw",
             "password": "mqtt-secret-1"},
    "database": {"url": "sqlite:////var/lib/scgw/scgw.db"},
    "telemetry": {"spool_max_mb": 64, "fsync_interval_s": 0.5, "local_retention_days": 7},
    "influxdb": {"url": "http://influx:8086", "api": "v2", "org": "o", "bucket": "b",
                 "token": "influx-secret-2"},
    "rules": {"files": []},
    "buildings": [{"id": "b1", "floors": [{"number": 1}],
                   "calendar": {"hours": {"mon-sun": "24h"}}}],
    "devices": [{"device_id": "m-1", "kind": "meter", "building": "b1"},
                {"device_id": "erv-1", "kind": "fresh_air", "host": "10.0.0.5",
                 "profile": "fresh-air-erv"}],
})


def test_the_view_survives_the_pipe_with_its_secrets() -> None:
    view = WorkerConfig.from_site(SITE)
    again = WorkerConfig.from_json(view.to_json())
    assert again == view
    assert again.mqtt.password == "mqtt-secret-1" and again.mqtt.tls and again.mqtt.port == 8884
    assert again.influxdb is not None and again.influxdb.token == "influx-secret-2"
    assert again.spool_max_bytes == 64 << 20 and again.spool_dir == "/var/lib/scgw/spool"
    assert [(d.device_id, d.is_modbus) for d in again.devices] == [("m-1", False),
                                                                     ("erv-1", True)]
    shown = repr(again)
    assert "secret" not in shown and "sqlite" not in shown


def test_the_rules_see_the_sites_calendars_and_devices() -> None:
    context = site_context(WorkerConfig.from_site(SITE))
    assert context.timezone == "Asia/Shanghai"
    assert context.devices["m-1"].building == "b1"
    assert context.calendar_for("b1").weekly[6] == ((0, 1440),)
    assert context.calendar_for(None).weekly[0] == ((480, 1080),)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d.pop("mqtt"), "missing key 'mqtt'"),
    (lambda d: d.pop("site_id"), "site_id"),
    (lambda d: d.update(surprise=1), "surprise"),
    (lambda d: d.update(mqtt="x"), "mqtt: expected an object, found str"),
])
def test_a_bad_view_names_the_key_and_never_the_secrets(change: object,
                                                         expected: str) -> None:
    data = json.loads(WorkerConfig.from_site(SITE).to_json())
    change(data)  # type: ignore[operator]
    with pytest.raises(WorkerConfigError, match=expected) as caught:
        WorkerConfig.from_json(json.dumps(data))
    assert "secret" not in str(caught.value)
    with pytest.raises(WorkerConfigError, match="not JSON"):
        WorkerConfig.from_json(b"{not json")


def test_database_urls_the_worker_can_and_cannot_share(
        caplog: pytest.LogCaptureFixture) -> None:
    assert postgres_conninfo("postgresql+psycopg://u:p@db:5432/scgw?sslmode=require") == (
        "postgresql://u:p@db:5432/scgw?sslmode=require")
    with pytest.raises(LocalDbError, match="expected postgresql"):
        LocalDb("mysql://u@db/scgw")
    # In-memory: a throwaway run still ingests and writes InfluxDB; the local store, which
    # would be private to the worker and without the gateway's tables, fails and says so.
    memory = LocalDb("sqlite://")
    assert "cannot share" in caplog.text
    with pytest.raises(LocalDbError, match="no such table"):
        RollupStore(memory).applied_recno()
    memory.close()
