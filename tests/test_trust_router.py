"""Issue 11 at the device router: what a device of its kind never sends is refused and
counted (by kind, never by device id), and a BLE token opens once, also after a restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt

from simulators.demo.broker import Mosquitto, free_port
from simulators.phone import SimulatedAir, SimulatedPhone
from simulators.readers import ReaderSimulator
from tests.community import Running, running_gateway

EXTRA: list[dict[str, Any]] = [
    {"device_id": "meter-x", "kind": "meter"},  # an MQTT meter: telemetry, status, events
    # A Modbus unit the gateway polls (nothing listens on the port: polling just fails).
    {"device_id": "erv-9", "kind": "fresh_air", "host": "127.0.0.1", "port": free_port(),
     "unit_id": 1, "profile": "fresh-air-erv", "poll_interval_s": 60},
]


def refused(run: Running, kind: str, channel: str, reason: str) -> float:
    return run.gateway.metrics.value("scgw_mqtt_refused_total", kind=kind, channel=channel,
                                     reason=reason)


async def until(check: object, timeout_s: float = 5.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_what_a_device_of_its_kind_never_sends_is_refused_and_counted(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path, extra_devices=EXTRA) as run:
        root, alice = run.root, run.people.residents[0]
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as intruder:
            await intruder.subscribe(f"{root}/devices/+/payment/result", qos=1)
            await intruder.subscribe(f"{root}/devices/meter-x/access/decision", qos=1)
            pay = {"txn_id": "t-1", "amount_cents": 3000,
                   "credential": {"type": "card", "value": alice.cards["canteen"]}}
            await intruder.publish(f"{root}/devices/gate-north/payment/request",
                                   json.dumps(pay), qos=1)
            access = {"request_id": "r-1", "credential": {"type": "card",
                                                          "value": alice.cards["gate"]}}
            await intruder.publish(f"{root}/devices/meter-x/access/request",
                                   json.dumps(access), qos=1)
            await intruder.publish(f"{root}/devices/erv-9/status", b'{"online": true}', qos=1)
            # Decisions and commands only the gateway publishes.
            forged = {"request_id": "x", "granted": True, "action": "unlock", "duration_s": 3600}
            await intruder.publish(f"{root}/devices/gate-south/access/decision",
                                   json.dumps(forged), qos=1)
            await intruder.publish(f"{root}/devices/gate-north/command",
                                   b'{"action": "unlock", "duration_s": 3600}', qos=1)
            await intruder.publish(f"{root}/devices/canteen-1/payment/result",
                                   b'{"txn_id": "t-9", "approved": true}', qos=1)
            answers = []
            async with asyncio.timeout(5):
                async for message in intruder.messages:
                    assert isinstance(message.payload, bytes)
                    if message.topic.value.endswith("/payment/result") and "gate-north" in (
                            message.topic.value):
                        answers.append(json.loads(message.payload))
                    elif message.topic.value.endswith("/access/decision"):
                        answers.append(json.loads(message.payload))
                    if len(answers) == 2:
                        break
        assert sorted((a.get("reason"), a.get("granted", a.get("approved"))) for a in answers) == [
            ("malformed_request", False), ("malformed_request", False)]
        await until(lambda: refused(run, "canteen", "payment/result", "not_from_gateway") == 1)
        assert refused(run, "gate", "payment/request", "wrong_kind") == 1
        assert refused(run, "meter", "access/request", "wrong_kind") == 1
        assert refused(run, "fresh_air", "status", "polled_unit") == 1
        assert refused(run, "gate", "access/decision", "not_from_gateway") == 1
        assert refused(run, "gate", "command", "not_from_gateway") == 1
        assert run.gateway.router is not None
        assert run.gateway.router.state["erv-9"].online is None  # nobody speaks for it
        # What the gateway publishes itself comes back to it and is not counted.
        async with ReaderSimulator(mosquitto.host, mosquitto.port, "gate-north", "gate",
                                   root) as gate:
            assert (await gate.present("card", alice.cards["gate"]))["granted"]
        await asyncio.sleep(0.3)
        assert refused(run, "gate", "access/decision", "not_from_gateway") == 1
        # The same answer sent twice (a terminal retrying a txn is answered again, byte for
        # byte) comes back twice: both echoes are the gateway's own, a third is not.
        router = run.gateway.router
        topic = f"{root}/devices/canteen-1/payment/result"
        again = b'{"txn_id": "t-1", "approved": true, "balance_cents": 100}'
        router.note_outgoing(topic, again)
        router.note_outgoing(topic, again)
        await router.on_message(topic, again)
        await router.on_message(topic, again)
        assert refused(run, "canteen", "payment/result", "not_from_gateway") == 1
        await router.on_message(topic, again)
        assert refused(run, "canteen", "payment/result", "not_from_gateway") == 2
        lines = [line for line in run.gateway.metrics.render().splitlines()
                 if line.startswith("scgw_mqtt_refused_total{")]
        assert lines and not any("gate-" in line or "meter-x" in line for line in lines)


async def test_a_ble_token_opens_once_even_after_a_restart(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    air = SimulatedAir()
    shown_at = time.time()
    async with running_gateway(mosquitto, tmp_path, ble_readers=("gate-north",),
                               ble_backend=air.backend) as run:
        alice = run.people.residents[0]
        phone = SimulatedPhone(alice.credential_id, alice.secret)
        async with ReaderSimulator(mosquitto.host, mosquitto.port, "gate-north", "gate",
                                   run.root) as gate:
            air.broadcast(phone, rssi=-60, now=shown_at)
            await until(lambda: len(gate.actuations) == 1)
    # A new process knows nothing of what the last one saw in the air; the store does.
    async with running_gateway(mosquitto, tmp_path, ble_readers=("gate-north",),
                               ble_backend=air.backend, again=run) as again:
        async with ReaderSimulator(mosquitto.host, mosquitto.port, "gate-north", "gate",
                                   again.root) as gate:
            air.broadcast(phone, rssi=-60, now=shown_at)  # the very same advertisement
            metrics = again.gateway.metrics
            await until(lambda: metrics.value("scgw_access_decisions_total", kind="gate",
                                              result="replayed_token") == 1)
            assert gate.actuations == []
            phone.rotate()
            air.broadcast(phone, rssi=-60)
            await until(lambda: len(gate.actuations) == 1)
