"""The MQTT session every simulated device opens, as a real one would.

Its own login (`scgw mqtt-config` gives each device one; the broker's ACL confines it to
its own topics), retained `{"online": true}` on connect, the same as a last will,
`{"online": false}` on a clean goodbye, TCP_NODELAY, and the device's own inbound channels
subscribed.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence

import aiomqtt

from device_drivers.mqtt import NO_DELAY
from device_drivers.mqtt_protocol import device_topic, encode

ONLINE = encode({"online": True})
OFFLINE = encode({"online": False})


@contextlib.asynccontextmanager
async def device_connection(
    host: str, port: int, root: str, device_id: str, channels: Sequence[str],
    username: str | None = None, password: str | None = None,
) -> AsyncIterator[aiomqtt.Client]:
    status = device_topic(root, device_id, "status")
    async with aiomqtt.Client(
        host,
        port,
        identifier=f"sim-{device_id[:40]}-{secrets.token_hex(3)}",
        username=username,
        password=password,
        will=aiomqtt.Will(status, OFFLINE, qos=1, retain=True),
        socket_options=NO_DELAY,
    ) as client:
        for channel in channels:
            await client.subscribe(device_topic(root, device_id, channel), qos=1)
        await client.publish(status, ONLINE, qos=1, retain=True)
        try:
            yield client
        finally:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(status, OFFLINE, qos=1, retain=True)
