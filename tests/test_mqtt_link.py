"""The gateway's MQTT link against a real Mosquitto: status with last will, reconnects."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiomqtt

from device_drivers.mqtt import MqttLink, backoff_delays
from simulators.demo.broker import Mosquitto


async def _retained(broker: Mosquitto, topic: str) -> dict[str, object]:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            result: dict[str, object] = json.loads(message.payload)
            return result
    raise AssertionError("no retained status")


def _link(broker: Mosquitto, inbox: list[tuple[str, bytes]], client_id: str = "gw") -> MqttLink:
    async def on_message(topic: str, payload: bytes) -> None:
        inbox.append((topic, payload))

    return MqttLink(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        status_topic="t/gateway/status",
        subscriptions=["t/devices/+/access/request"],
        on_message=on_message,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        keepalive_s=5,
    )


def test_backoff_is_jittered_and_capped() -> None:
    delay = backoff_delays(0.2, 30.0)
    samples = [delay(n) for n in range(20) for _ in range(50)]
    assert max(samples) <= 30.0 and min(samples) >= 0.1
    assert len({round(s, 6) for s in samples}) > 900  # jittered, not a fixed ladder


async def test_status_is_retained_and_clean_stop_says_offline(own_mosquitto: Mosquitto) -> None:
    inbox: list[tuple[str, bytes]] = []
    async with _link(own_mosquitto, inbox) as link:
        await asyncio.wait_for(link.connected.wait(), 5)
        assert await _retained(own_mosquitto, "t/gateway/status") == {"online": True}
    assert await _retained(own_mosquitto, "t/gateway/status") == {"online": False}


async def test_reconnects_after_broker_restart(own_mosquitto: Mosquitto) -> None:
    inbox: list[tuple[str, bytes]] = []
    async with _link(own_mosquitto, inbox) as link:
        await asyncio.wait_for(link.connected.wait(), 5)
        own_mosquitto.stop()
        for _ in range(100):
            if not link.connected.is_set():
                break
            await asyncio.sleep(0.05)
        assert not link.connected.is_set()
        own_mosquitto.start()
        await asyncio.wait_for(link.connected.wait(), 10)
        assert link.connections == 2
        async with aiomqtt.Client(own_mosquitto.host, own_mosquitto.port) as device:
            await device.publish("t/devices/gate-1/access/request", b"{}", qos=1)
            for _ in range(100):
                if inbox:
                    break
                await asyncio.sleep(0.05)
        assert inbox == [("t/devices/gate-1/access/request", b"{}")]


async def test_last_will_announces_a_dead_gateway(own_mosquitto: Mosquitto) -> None:
    """A gateway that dies without goodbye is reported offline by the broker itself."""
    code = (
        "import asyncio, sys\n"
        "from device_drivers.mqtt import MqttLink\n"
        "async def main():\n"
        "    async def h(t, p): pass\n"
        f"    link = MqttLink(host='{own_mosquitto.host}', port={own_mosquitto.port},"
        " client_id='doomed', status_topic='t/gateway/status', subscriptions=[],"
        " on_message=h, keepalive_s=5)\n"
        "    async with link:\n"
        "        await link.connected.wait()\n"
        "        print('up', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 15)).strip() == b"up"
    assert await _retained(own_mosquitto, "t/gateway/status") == {"online": True}
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    for _ in range(50):
        if await _retained(own_mosquitto, "t/gateway/status") == {"online": False}:
            break
        await asyncio.sleep(0.1)
    assert await _retained(own_mosquitto, "t/gateway/status") == {"online": False}
