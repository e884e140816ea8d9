"""Hostile or broken device input never stops the gateway; every decision is audited."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiomqtt
import httpx
from sqlalchemy import select

from gateway.access.audit import audit_log
from gateway.store import db
from simulators.demo.broker import Mosquitto
from simulators.phone import SimulatedPhone
from simulators.readers import ReaderSimulator
from tests.community import running_gateway


async def _next(client: aiomqtt.Client) -> dict[str, object]:
    async with asyncio.timeout(5):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            data: dict[str, object] = json.loads(message.payload)
            return data
    raise AssertionError("no message")


async def test_poison_payloads_do_not_stop_the_link(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        root = run.root
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as attacker:
            huge = b'{"request_id": ' + b"1" * 5000 + b"}"
            await attacker.publish(f"{root}/devices/nobody/access/request", huge, qos=1)
            await attacker.publish(f"{root}/devices/gate-north/access/request", huge, qos=1)
            await attacker.publish(f"{root}/devices/gate-north/access/request",
                                   b"[" * 30000, qos=1)
            nul = {"request_id": "r\u0000", "credential": {"type": "card", "value": "x"}}
            await attacker.publish(f"{root}/devices/gate-north/access/request",
                                   json.dumps(nul), qos=1)
            await attacker.subscribe(f"{root}/devices/gate-north/payment/result", qos=1)
            pay = {"txn_id": "t-1", "amount_cents": 100,
                   "credential": {"type": "card", "value": "C1"}}
            await attacker.publish(f"{root}/devices/gate-north/payment/request",
                                   json.dumps(pay), qos=1)
            refused = await _next(attacker)
            assert (refused["txn_id"], refused["approved"], refused["reason"]) == (
                "t-1", False, "malformed_request")
        assert run.gateway.link is not None and run.gateway.link.connected.is_set()
        resident = run.people.residents[0]
        phone = SimulatedPhone(resident.credential_id, resident.secret)
        async with ReaderSimulator(mosquitto.host, mosquitto.port, "gate-north", "gate",
                                   root) as gate:
            assert (await gate.present("qr", phone.qr()))["granted"] is True
        assert run.gateway.link.connections == 1


async def test_a_device_that_restarts_its_seq_is_heard_again(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        topic = f"{run.root}/devices/gate-north/telemetry"
        now = time.time()
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
            for i, seq in enumerate((5, 6, 6, 2**40, 1, 2)):
                reading = {"ts": now + i, "seq": seq, "metrics": {"power_w": 1.0}}
                await device.publish(topic, json.dumps(reading), qos=1)
        # Counted by the telemetry worker process, reported to the gateway's /metrics.
        metrics = run.gateway.metrics
        deadline = time.monotonic() + 20
        while metrics.value("scgw_telemetry_readings_total") < 5:
            assert time.monotonic() < deadline, "the worker never reported 5 readings"
            await asyncio.sleep(0.1)
        assert metrics.value("scgw_telemetry_readings_total") == 5
        assert metrics.value("scgw_telemetry_duplicates_total") == 1
        assert metrics.value("scgw_telemetry_seq_resets_total") == 1


async def test_remote_unlocks_are_audited_granted_or_not(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        alice = run.people.residents[0]
        async with httpx.AsyncClient(base_url=run.api, timeout=10) as http:
            login = await http.post("/api/v1/auth/token",
                                    data={"username": alice.username, "password": alice.password})
            auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
            opened = await http.post("/api/v1/gates/gate-north/unlock", headers=auth)
            assert opened.status_code == 202
            refused = await http.post("/api/v1/elevators/elev-b2-1/call", headers=auth,
                                      json={"floor": 1})
            assert refused.status_code == 403
        await asyncio.sleep(0.5)  # the audit writer flushes every 100 ms
    engine = db.make_engine(run.config.database.url)
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log).where(audit_log.c.resident_id == alice.resident_id)
                            ).mappings().all()
    engine.dispose()
    by_device = {r["device_id"]: r for r in rows}
    assert by_device["gate-north"]["granted"] is True
    assert by_device["gate-north"]["request_id"] == opened.json()["command_id"]
    assert by_device["elev-b2-1"]["granted"] is False
