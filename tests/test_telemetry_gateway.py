"""Telemetry through the whole gateway: device -> broker -> worker process -> store -> API."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiomqtt
import httpx

from gateway.telemetry.recycle import BACKLOG_RECORDS
from simulators.demo.broker import Mosquitto, free_port
from tests.community import Running, running_gateway
from tests.influx_servers import influxdb_server

METERS = [
    {"device_id": "meter-b1", "kind": "meter", "building": "b1"},
    {"device_id": "meter-b2", "kind": "meter", "building": "b2"},
]


async def _engineer(http: httpx.AsyncClient, run: Running) -> dict[str, str]:
    user = run.login("engineer")
    login = await http.post("/api/v1/auth/token",
                            data={"username": user["username"], "password": user["password"]})
    assert login.status_code == 200
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _until(check: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.2)


async def test_every_reading_reaches_the_energy_api_with_building_and_kind_sums(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with (
        running_gateway(mosquitto, tmp_path, extra_devices=METERS) as run,
        httpx.AsyncClient(base_url=run.api, timeout=10) as http,
    ):
        auth = await _engineer(http, run)
        minute = int(time.time() // 60) * 60
        watts = {"meter-b1": [100.0, 110.0, 120.0], "meter-b2": [1000.0, 900.0, 800.0]}
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
            for device_id, values in watts.items():
                topic = f"{run.root}/devices/{device_id}/telemetry"
                batch = {"readings": [{"ts": minute + 1 + i, "seq": i + 1,
                                       "metrics": {"power_w": v}} for i, v in enumerate(values)]}
                await device.publish(topic, json.dumps(batch), qos=1)
                # A repeat of the last reading is a duplicate, not a fourth reading.
                await device.publish(topic, json.dumps(batch["readings"][-1]), qos=1)
        params = {"metric": "power_w", "start": minute, "end": minute + 60, "step": 60}

        async def community_has_all() -> bool:
            answer = await http.get("/api/v1/energy/series", headers=auth,
                                    params={**params, "device_id": "kind:meter"})
            assert answer.status_code == 200, answer.text
            points = answer.json()["points"]
            return bool(points) and points[0]["count"] == 6

        await _until(community_has_all)
        community = (await http.get("/api/v1/energy/series", headers=auth,
                                    params={**params, "device_id": "kind:meter"})).json()
        assert community["unit"] == "W"
        point = community["points"][0]
        assert point["last"] == 120.0 + 800.0
        assert point["mean"] == sum(watts["meter-b1"]) / 3 + sum(watts["meter-b2"]) / 3
        b1 = (await http.get("/api/v1/energy/series", headers=auth,
                             params={**params, "device_id": "building:b1"})).json()
        assert (b1["points"][0]["min"], b1["points"][0]["max"]) == (100.0, 120.0)

        async def duplicates_counted() -> bool:  # reported by the worker every 2 s
            return run.gateway.metrics.value("scgw_telemetry_duplicates_total") == 2

        await _until(duplicates_counted)
        latest = await http.get("/api/v1/devices/meter-b2/latest", headers=auth)
        assert latest.status_code == 200 and latest.json()["metrics"]["power_w"] == 800.0


async def test_readyz_names_an_influxdb_that_cannot_be_reached(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    site = {"influxdb": {"url": dead, "api": "v1", "database": "scgw"}}
    async with (
        running_gateway(mosquitto, tmp_path, extra_devices=METERS, site_extra=site) as run,
        httpx.AsyncClient(base_url=run.api, timeout=10) as http,
    ):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
            await device.publish(f"{run.root}/devices/meter-b1/telemetry", json.dumps(
                {"ts": time.time(), "seq": 1, "metrics": {"power_w": 5.0}}), qos=1)

        async def influx_named() -> bool:
            ready = await http.get("/readyz")
            return any(p.startswith("influxdb:") for p in ready.json()["problems"])

        await _until(influx_named)
        ready = await http.get("/readyz")
        # Behind, not down: the spool holds the readings, the gateway keeps serving.
        assert ready.status_code == 200 and ready.json()["ready"] is True


def _rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # a worker that just handed over to a fresh one (gateway.telemetry.recycle)
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


OUTAGE_S = 60.0
RATE = 2000  # readings per second, in batches of 10 per message


async def test_influxdb_down_for_a_minute_under_load_loses_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    devices = [{"device_id": f"m-{i}", "kind": "meter", "building": "b1"} for i in range(20)]
    with influxdb_server() as influx:
        site = {"influxdb": {"url": influx.url, "api": "v1", "database": "scgw"}}
        async with running_gateway(mosquitto, tmp_path, extra_devices=devices,
                                   site_extra=site) as run:
            worker = run.gateway.telemetry_worker
            assert worker is not None and worker.process is not None
            sent = 0
            rss: list[float] = []
            seq = {d["device_id"]: 0 for d in devices}
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
                started = time.monotonic()
                base = time.time() - 3600
                tick = 0
                stopped_at = started + 3.0
                while time.monotonic() - started < OUTAGE_S + 8.0:
                    now = time.monotonic()
                    up = influx.process is not None and influx.process.poll() is None
                    if up and stopped_at <= now < stopped_at + OUTAGE_S:
                        await asyncio.to_thread(influx.stop)
                    elif not up and now >= stopped_at + OUTAGE_S:
                        await asyncio.to_thread(influx.start)
                    for device in seq:  # RATE / 10 messages per second, 10 readings each
                        batch = []
                        for _ in range(RATE // 10 // len(seq)):
                            seq[device] += 1
                            # 5 ms apart: one series and millisecond is one point.
                            batch.append({"ts": base + seq[device] * 0.005, "seq": seq[device],
                                          "metrics": {"power_w": float(seq[device])}})
                        await client.publish(f"{run.root}/devices/{device}/telemetry",
                                             json.dumps({"readings": batch}), qos=1)
                        sent += len(batch)
                    rss.append(_rss_mb(worker.process.pid))
                    tick += 1
                    await asyncio.sleep(max(0.0, started + tick * 0.1 - time.monotonic()))
            assert influx.process is not None and influx.process.poll() is None  # back up

            def written() -> int:
                rows = influx.query("SELECT count(seq) FROM telemetry", database="scgw")
                return int(rows[0]["values"][0][1]) if rows else 0

            deadline = time.monotonic() + 120
            while (count := await asyncio.to_thread(written)) < sent:
                assert time.monotonic() < deadline, f"{count} of {sent} written"
                await asyncio.sleep(0.5)
            assert count == sent  # none lost, none twice
            per_device = await asyncio.to_thread(
                influx.query, "SELECT count(seq), min(seq), max(seq) FROM telemetry "
                              "GROUP BY device_id", database="scgw")
            for row in per_device:
                n, low, high = row["values"][0][1:]
                assert (n, low, high) == (seq[row["tags"]["device_id"]], 1,
                                          seq[row["tags"]["device_id"]])
            assert max(rss) < 200, f"worker RSS grew to {max(rss):.0f} MB"


async def test_a_worker_grown_by_a_backlog_hands_over_to_a_fresh_one_losing_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Draining a backlog leaves the worker larger (gateway.telemetry.recycle); past
    `worker_recycle_mb` it stops in order and the gateway starts a fresh one at once, not as
    a crash. A tiny limit makes any growth count, so the hand-over happens right after the
    drain: every reading before, during and after it arrives exactly once."""
    devices = [{"device_id": f"r-{i}", "kind": "meter", "building": "b1"} for i in range(4)]
    seq = {d["device_id"]: 0 for d in devices}
    base = time.time() - 3600

    async def publish(client: aiomqtt.Client, per_device: int) -> None:
        for _ in range(per_device // 50):
            for device in seq:
                batch = []
                for _ in range(50):
                    seq[device] += 1
                    batch.append({"ts": base + seq[device] * 0.01, "seq": seq[device],
                                  "metrics": {"power_w": float(seq[device])}})
                await client.publish(f"{run.root}/devices/{device}/telemetry",
                                     json.dumps({"readings": batch}), qos=1)

    with influxdb_server() as influx:
        site = {"influxdb": {"url": influx.url, "api": "v1", "database": "scgw"},
                "telemetry": {"worker_recycle_mb": 0.001}}
        async with (
            running_gateway(mosquitto, tmp_path, extra_devices=devices, site_extra=site) as run,
            httpx.AsyncClient(base_url=run.api, timeout=10) as http,
            aiomqtt.Client(mosquitto.host, mosquitto.port) as client,
        ):
            worker, health = run.gateway.telemetry_worker, run.gateway.telemetry_health
            assert worker is not None and worker.process is not None
            first_pid = worker.process.pid
            await asyncio.to_thread(influx.stop)
            await publish(client, (BACKLOG_RECORDS + 4_000) // len(devices))

            async def backlog_reported() -> bool:
                consumers = health.report.get("spool", {}).get("consumers", {})
                depth = int(consumers.get("influxdb", {}).get("depth_records", 0))
                return depth >= BACKLOG_RECORDS

            await _until(backlog_reported)
            assert worker.recycles == 0  # not while behind
            await asyncio.to_thread(influx.start)

            async def handed_over() -> bool:
                return worker.recycles == 1 and health.report.get("online") is True

            await _until(handed_over, 90)
            assert worker.process is not None and worker.process.pid != first_pid
            await publish(client, 500)  # to the fresh worker
            sent = sum(seq.values())

            def written() -> int:
                rows = influx.query("SELECT count(seq) FROM telemetry", database="scgw")
                return int(rows[0]["values"][0][1]) if rows else 0

            async def all_written() -> bool:
                return await asyncio.to_thread(written) >= sent

            await _until(all_written, 60)
            assert await asyncio.to_thread(written) == sent  # none lost, none twice
            per_device = await asyncio.to_thread(
                influx.query, "SELECT count(seq), min(seq), max(seq) FROM telemetry "
                              "GROUP BY device_id", database="scgw")
            assert {row["tags"]["device_id"]: tuple(row["values"][0][1:]) for row in per_device
                    } == {device: (n, 1, n) for device, n in seq.items()}
            assert worker.recycles == 1 and worker.starts == 2
            metrics = (await http.get("/metrics")).text
            assert "scgw_telemetry_worker_recycles_total 1.0" in metrics
            assert (await http.get("/readyz")).json()["ready"] is True
