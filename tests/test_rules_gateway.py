"""The rules engine in the running gateway: alerts on MQTT, in the API, in InfluxDB; the same
transitions as `scgw rules replay`; restarts that neither re-fire nor forget."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
from typer.testing import CliRunner

from gateway.app.cli import app
from simulators.demo.broker import Mosquitto
from simulators.demo.community import READERS
from tests.community import Running, running_gateway
from tests.influx_servers import influxdb_server

METERS = [
    {"device_id": "meter-b1", "kind": "meter", "building": "b1"},
    {"device_id": "meter-b2", "kind": "meter", "building": "b2"},
]
GATE = next(r["device_id"] for r in READERS if r["kind"] == "gate")
LIFECYCLE_RULES = """\
rules:
  - id: meter-overload
    kind: threshold
    match: {kinds: [meter]}
    metric: power_w
    above: 1000
    clear: 800
    for: 60s
    severity: warning
  - id: door-forced
    kind: event
    match: {kinds: [gate]}
    events: [door_forced]
    clear_after: 5m
    severity: critical
"""
REPLAY_RULES = """\
rules:
  - id: overload
    kind: threshold
    match: {kinds: [meter]}
    metric: power_w
    above: 1800
    clear: 1500
    for: 30s
  - id: surge
    kind: rate_of_change
    match: {kinds: [meter]}
    metric: power_w
    max_per_s: 40
    direction: up
  - id: stuck
    kind: flatline
    match: {kinds: [meter]}
    metric: power_w
    window: 5m
    ignore_below: 1
  - id: counter
    kind: counter
    match: {kinds: [meter]}
    metric: energy_wh
    power_metric: power_w
"""


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.1)


async def _login(http: httpx.AsyncClient, run: Running, role: str) -> dict[str, str]:
    user = run.login(role)
    answer = await http.post("/api/v1/auth/token",
                             data={"username": user["username"], "password": user["password"]})
    assert answer.status_code == 200
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


class AlertFeed:
    """Every alert the broker delivers on `{root}/alerts/#`, in arrival order."""

    def __init__(self, mosquitto: Mosquitto, root: str) -> None:
        self.mosquitto, self.root = mosquitto, root
        self.seen: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> AlertFeed:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        async with aiomqtt.Client(self.mosquitto.host, self.mosquitto.port) as client:
            await client.subscribe(f"{self.root}/alerts/#", qos=1)
            self._ready.set()
            async for message in client.messages:
                payload = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                payload["_topic"] = str(message.topic)
                self.seen.append(payload)

    def of(self, rule_id: str, device_id: str) -> list[dict[str, Any]]:
        return [a for a in self.seen if a["rule_id"] == rule_id and a["device_id"] == device_id]


async def _publish(mosquitto: Mosquitto, root: str,
                   items: list[tuple[str, dict[str, Any]]], channel: str = "telemetry") -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
        for device_id, payload in items:
            await device.publish(f"{root}/devices/{device_id}/{channel}", json.dumps(payload),
                                 qos=1)


def _rules_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


async def test_alert_lifecycle_on_mqtt_in_the_api_and_in_influxdb(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    rules = _rules_file(tmp_path, LIFECYCLE_RULES)
    with influxdb_server() as influx:
        site = {"rules": {"files": [str(rules)]},
                "influxdb": {"url": influx.url, "api": "v1", "database": "scgw"}}
        async with (
            running_gateway(mosquitto, tmp_path, extra_devices=METERS, site_extra=site) as run,
            AlertFeed(mosquitto, run.root) as feed,
            httpx.AsyncClient(base_url=run.api, timeout=10) as http,
        ):
            base = round(time.time()) - 600.0
            over = [("meter-b1", {"ts": base + 10 * i, "seq": i + 1,
                                  "metrics": {"power_w": 1500.0}}) for i in range(10)]
            # 900 W is under the threshold but above `clear`: still firing (hysteresis).
            after = [("meter-b1", {"ts": base + 100, "seq": 11, "metrics": {"power_w": 900.0}}),
                     ("meter-b1", {"ts": base + 110, "seq": 12, "metrics": {"power_w": 500.0}})]
            await _publish(mosquitto, run.root, over + after)
            await _publish(mosquitto, run.root,
                           [(GATE, {"type": "door_forced", "ts": base + 120})], "event")

            async def three_alerts() -> bool:
                return len(feed.seen) >= 3
            await _until(three_alerts)
            overload = feed.of("meter-overload", "meter-b1")
            assert [a["state"] for a in overload] == ["firing", "resolved"]
            firing, resolved = overload
            assert firing["_topic"] == f"{run.root}/alerts/meter-overload/meter-b1"
            assert firing["started_at"] == base and firing["ts"] == base + 60
            assert firing["value"] == 1500.0 and firing["metric"] == "power_w"
            assert firing["severity"] == "warning" and firing["message"]
            assert resolved["ts"] == base + 110 and resolved["started_at"] == base
            assert resolved["alert_id"] == firing["alert_id"]
            [forced] = feed.of("door-forced", GATE)
            assert forced["state"] == "firing" and forced["severity"] == "critical"

            engineer = await _login(http, run, "engineer")
            answer = await http.get("/api/v1/alerts", headers=engineer,
                                    params={"state": "firing"})
            assert answer.status_code == 200
            assert [a["rule_id"] for a in answer.json()] == ["door-forced"]
            answer = await http.get("/api/v1/alerts", headers=engineer,
                                    params={"device_id": "meter-b1"})
            [listed] = answer.json()
            assert listed["state"] == "resolved" and listed["alert_id"] == firing["alert_id"]
            assert listed["resolved_at"] == base + 110

            ack = await http.post(f"/api/v1/alerts/{forced['alert_id']}/ack", headers=engineer)
            assert ack.status_code == 200
            assert ack.json()["acked_by"] == run.login("engineer")["username"]
            assert ack.json()["acked_at"] is not None
            missing = await http.post("/api/v1/alerts/nosuch/ack", headers=engineer)
            assert missing.status_code == 404 and "nosuch" in missing.json()["detail"]
            resident = await _login(http, run, "resident")
            denied = await http.get("/api/v1/alerts", headers=resident)
            assert denied.status_code == 403
            bad = await http.get("/api/v1/alerts", headers=engineer, params={"state": "odd"})
            assert bad.status_code == 422

            def influx_alerts() -> list[Any]:
                series = influx.query("SELECT state, rule_id, device_id FROM alerts",
                                      database="scgw")
                return series[0]["values"] if series else []

            async def in_influx() -> bool:
                return len(await asyncio.to_thread(influx_alerts)) >= 3
            await _until(in_influx)
            states = sorted((row[2], row[1]) for row in influx_alerts())
            assert states == [("door-forced", "firing"), ("meter-overload", "firing"),
                              ("meter-overload", "resolved")]


def _recording(seed: int = 7) -> list[dict[str, Any]]:
    """Two meters, 10 s apart, with overloads, surges, a stuck spell and a counter reset."""
    rng = random.Random(seed)
    base = round(time.time()) - 7200.0
    lines: list[dict[str, Any]] = []
    energy = {"meter-b1": 5_000_000.0, "meter-b2": 9_000_000.0}
    for i in range(360):
        for device in ("meter-b1", "meter-b2"):
            power = 1000 + 300 * rng.random()
            if device == "meter-b1" and 60 <= i < 70:
                power = 2200 + rng.random()  # overload
            if device == "meter-b2" and 150 <= i < 200:
                power = 1111.0  # stuck
            if device == "meter-b2" and i == 250:
                power = 2000.0  # surge
            energy[device] += power * 10 / 3600
            if device == "meter-b1" and i == 300:
                energy[device] = 12.0  # counter reset
            lines.append({"device_id": device, "kind": "meter", "ts": base + 10 * i,
                          "seq": i + 1, "metrics": {"power_w": round(power, 3),
                                                    "energy_wh": round(energy[device], 3)}})
    return lines


def _key(alert: dict[str, Any]) -> tuple[Any, ...]:
    return (alert["ts"], alert["rule_id"], alert["device_id"], alert["state"],
            alert["started_at"], alert["value"], alert["alert_id"], alert["message"])


async def test_live_gateway_gives_the_transitions_replay_gives(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    rules = _rules_file(tmp_path, REPLAY_RULES)
    recording = _recording()
    readings = tmp_path / "readings.jsonl"
    readings.write_text("".join(json.dumps(line) + "\n" for line in recording))
    result = CliRunner().invoke(app, ["rules", "replay", "--readings", str(readings),
                                      "--rules", str(rules)])
    assert result.exit_code == 0, result.output
    replayed = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert {a["rule_id"] for a in replayed} == {"overload", "surge", "stuck", "counter"}

    site = {"rules": {"files": [str(rules)]}}
    async with (
        running_gateway(mosquitto, tmp_path, extra_devices=METERS, site_extra=site) as run,
        AlertFeed(mosquitto, run.root) as feed,
    ):
        await _publish(mosquitto, run.root, [
            (line["device_id"], {k: line[k] for k in ("ts", "seq", "metrics")})
            for line in recording])

        async def all_arrived() -> bool:
            return len(feed.seen) >= len(replayed)
        await _until(all_arrived)

        async def all_evaluated() -> bool:
            sink = run.gateway.telemetry_health.report.get("sinks", {}).get("rules", {})
            return int(sink.get("written", 0)) >= len(recording)
        await _until(all_evaluated)
        live = [{k: v for k, v in a.items() if k != "_topic"} for a in feed.seen]
        assert sorted(map(_key, live)) == sorted(map(_key, replayed))


async def test_restart_keeps_a_pending_timer_and_does_not_refire(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    rules = _rules_file(tmp_path, LIFECYCLE_RULES)
    site = {"rules": {"files": [str(rules)]}}
    base = round(time.time()) - 3600.0

    def over(device: str, start: int, stop: int, watts: float = 1500.0) -> list[Any]:
        return [(device, {"ts": base + 10 * i, "seq": i + 1, "metrics": {"power_w": watts}})
                for i in range(start, stop)]

    async with (
        running_gateway(mosquitto, tmp_path, extra_devices=METERS, site_extra=site) as first,
        AlertFeed(mosquitto, first.root) as feed,
    ):
        # meter-b1 over the threshold for 30 s (pending); meter-b2 for 70 s (firing).
        await _publish(mosquitto, first.root, over("meter-b1", 0, 4) + over("meter-b2", 0, 8))

        async def b2_fired() -> bool:
            return len(feed.of("meter-overload", "meter-b2")) == 1
        await _until(b2_fired)

        async def all_evaluated() -> bool:
            sink = first.gateway.telemetry_health.report.get("sinks", {}).get("rules", {})
            return int(sink.get("written", 0)) >= 12
        await _until(all_evaluated)
    [b2_firing] = feed.of("meter-overload", "meter-b2")
    assert feed.of("meter-overload", "meter-b1") == []

    async with (
        running_gateway(mosquitto, tmp_path, extra_devices=METERS, site_extra=site,
                        again=first) as second,
        AlertFeed(mosquitto, second.root) as feed,
    ):
        # 30 s more of meter-b1: the pending timer from before the restart completes at 60 s.
        await _publish(mosquitto, second.root,
                       over("meter-b1", 4, 8) + over("meter-b2", 8, 9, watts=500.0))

        async def both() -> bool:
            return len(feed.seen) >= 2
        await _until(both)
        [b1_firing] = feed.of("meter-overload", "meter-b1")
        assert b1_firing["started_at"] == base and b1_firing["ts"] == base + 60
        # meter-b2 was not fired again; its alert resolved under the same id.
        [b2_resolved] = feed.of("meter-overload", "meter-b2")
        assert b2_resolved["state"] == "resolved"
        assert b2_resolved["alert_id"] == b2_firing["alert_id"]

        # kill -9 of the worker: it is restarted, replays the spool from its last saved
        # state, and announces nothing twice.
        worker = second.gateway.telemetry_worker
        assert worker is not None and worker.process is not None
        old_pid = worker.process.pid
        os.kill(old_pid, signal.SIGKILL)

        async def restarted() -> bool:
            health = second.gateway.telemetry_health.report
            return (worker.process is not None and worker.process.pid != old_pid
                    and health.get("pid") == worker.process.pid
                    and bool(health.get("mqtt", {}).get("subscribed")))
        await _until(restarted, 60)
        await _publish(mosquitto, second.root, over("meter-b1", 8, 9, watts=500.0))

        async def b1_resolved() -> bool:
            return len(feed.of("meter-overload", "meter-b1")) >= 2
        await _until(b1_resolved)
        assert [a["state"] for a in feed.of("meter-overload", "meter-b1")] == [
            "firing", "resolved"]
        assert len(feed.seen) == 3
