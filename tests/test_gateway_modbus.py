"""Modbus units through the whole gateway: polled telemetry, API and MQTT `set` control."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import httpx

from simulators.demo.broker import Mosquitto, free_port
from simulators.modbus_units import SimulatedUnits, UnitSpec
from tests.community import Running, running_gateway


async def _engineer(http: httpx.AsyncClient, run: Running) -> dict[str, str]:
    user = run.login("engineer")
    login = await http.post("/api/v1/auth/token",
                            data={"username": user["username"], "password": user["password"]})
    assert login.status_code == 200
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def test_engineer_sees_and_controls_a_fresh_air_unit(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    port = free_port()
    unit = {"device_id": "erv-1", "kind": "fresh_air", "host": "127.0.0.1", "port": port,
            "unit_id": 1, "profile": "fresh-air-erv", "poll_interval_s": 0.2}
    async with (
        SimulatedUnits([UnitSpec("fresh-air-erv", port)]) as sim,
        running_gateway(mosquitto, tmp_path, extra_devices=[unit]) as run,
        httpx.AsyncClient(base_url=run.api, timeout=10) as http,
    ):
        auth = await _engineer(http, run)
        for _ in range(50):
            latest = await http.get("/api/v1/devices/erv-1/latest", headers=auth)
            if latest.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert latest.status_code == 200, latest.text
        assert "fan_speed_pct" in latest.json()["metrics"]

        ok = await http.post("/api/v1/devices/erv-1/set", headers=auth,
                             json={"values": {"fan_speed_pct": 60}})
        assert ok.status_code == 200, ok.text
        assert ok.json()["values"]["fan_speed_pct"] == 60
        assert sim.unit(port).values()["fan_speed_pct"] == 60

        too_fast = await http.post("/api/v1/devices/erv-1/set", headers=auth,
                                   json={"values": {"fan_speed_pct": 150}})
        assert too_fast.status_code == 422
        assert sim.unit(port).values()["fan_speed_pct"] == 60  # nothing was sent
        unknown = await http.post("/api/v1/devices/nope/set", headers=auth,
                                  json={"values": {"fan_speed_pct": 10}})
        assert unknown.status_code == 404
        bad_body = await http.post("/api/v1/devices/erv-1/set", headers=auth,
                                   json={"values": {"fan_speed_pct": "fast"}})
        assert bad_body.status_code == 422
        # An integer register refuses a fraction instead of rounding it (1.5 is not 2).
        before = sim.unit(port).values()["bypass_mode"]
        fraction = await http.post("/api/v1/devices/erv-1/set", headers=auth,
                                   json={"values": {"bypass_mode": 1.5}})
        assert fraction.status_code == 422 and "bypass_mode" in fraction.json()["detail"]
        assert sim.unit(port).values()["bypass_mode"] == before  # nothing was sent

        # The control form's source: the writable registers only, with their limits.
        registers = await http.get("/api/v1/devices/erv-1/registers", headers=auth)
        assert registers.status_code == 200, registers.text
        by_name = {r["name"]: r for r in registers.json()}
        assert set(by_name) == {"running", "fan_speed_pct", "bypass_mode"}
        assert by_name["bypass_mode"]["values"] == [0, 1, 2]
        assert by_name["running"]["values"] == [0, 1]
        fan = by_name["fan_speed_pct"]
        assert (fan["unit"], fan["min"], fan["max"], fan["step"]) == ("%", 0, 100, 1)
        assert fan["data_type"] == "uint16" and fan["values"] is None
        gate = await http.get("/api/v1/devices/gate-north/registers", headers=auth)
        assert gate.status_code == 200 and gate.json() == []
        nobody = await http.get("/api/v1/devices/nope/registers", headers=auth)
        assert nobody.status_code == 404 and nobody.json() == {"detail": "no device 'nope'"}

        # A polled unit is online with a last-seen time, like any MQTT device.
        devices = {d["device_id"]: d for d in
                   (await http.get("/api/v1/devices", headers=auth)).json()}
        assert devices["erv-1"]["online"] is True
        assert devices["erv-1"]["last_seen"] is not None
        assert all(isinstance(d["online"], bool) for d in devices.values())

        resident = run.login("resident")
        login = await http.post("/api/v1/auth/token", data={
            "username": resident["username"], "password": resident["password"]})
        forbidden = await http.post(
            "/api/v1/devices/erv-1/set", json={"values": {"fan_speed_pct": 10}},
            headers={"Authorization": f"Bearer {login.json()['access_token']}"})
        assert forbidden.status_code == 403

        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as bms:
            await bms.subscribe(f"{run.root}/devices/erv-1/command/result", qos=1)
            command = {"command_id": "c-7", "action": "set", "values": {"fan_speed_pct": 35}}
            await bms.publish(f"{run.root}/devices/erv-1/command", json.dumps(command), qos=1)
            refused = {"command_id": "c-8", "action": "set", "values": {"fan_speed_pct": -5}}
            await bms.publish(f"{run.root}/devices/erv-1/command", json.dumps(refused), qos=1)
            results = []
            async with asyncio.timeout(10):
                async for message in bms.messages:
                    assert isinstance(message.payload, bytes)
                    results.append(json.loads(message.payload))
                    if len(results) == 2:
                        break
        by_id = {r["command_id"]: r for r in results}
        assert by_id["c-7"] == {"command_id": "c-7", "ok": True,
                                "values": {"fan_speed_pct": 35.0}}
        assert by_id["c-8"]["ok"] is False and by_id["c-8"]["error"] == "refused"
        assert sim.unit(port).values()["fan_speed_pct"] == 35
