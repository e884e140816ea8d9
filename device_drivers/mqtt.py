"""The gateway's MQTT connection: reconnects forever, announces itself, hands messages on.

Modelled on aiomqtt's own Client: an async context manager that owns its one task. The
connection loop reconnects with jittered exponential backoff, so a broker restart costs a
few hundred milliseconds and a site-wide broker outage does not turn into a reconnect storm
from every gateway at once. The gateway's status is a retained message with a last will, so
subscribers see `{"online": false}` when the gateway dies without saying goodbye.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import aiomqtt

from device_drivers.mqtt_protocol import encode

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]

# Small request/decision messages must not wait for Nagle's coalescing: with it, every
# QoS 1 round trip measured ~40 ms instead of ~2 ms (docs/benchmarks.md).
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def backoff_delays(minimum: float, maximum: float) -> Callable[[int], float]:
    """Full-jitter exponential backoff: attempt n waits uniform(0, min(max, min * 2**n))."""

    def delay(attempt: int) -> float:
        return random.uniform(minimum / 2, min(maximum, minimum * 2 ** min(attempt, 30)))

    return delay


class MqttLink:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        status_topic: str,
        subscriptions: Sequence[str],
        on_message: MessageHandler,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        keepalive_s: int = 30,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self._host, self._port = host, port
        self._client_id = client_id
        self._status_topic = status_topic
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._username, self._password = username, password
        self._tls = tls
        self._keepalive_s = keepalive_s
        self._delay = backoff_delays(reconnect_min_s, reconnect_max_s)
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects, for /metrics and tests

    async def __aenter__(self) -> MqttLink:
        self._task = asyncio.create_task(self._run(), name=f"mqtt-link-{self._client_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client = self._client
        if client is not None and self.connected.is_set():
            try:
                await asyncio.wait_for(self._announce(client, online=False), timeout=1.0)
            except (aiomqtt.MqttError, TimeoutError):
                log.warning("could not publish offline status on shutdown")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish now, or raise aiomqtt.MqttError when the broker is not reachable."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise aiomqtt.MqttError("not connected to the MQTT broker")
        await client.publish(topic, payload, qos=qos, retain=retain)

    async def _announce(self, client: aiomqtt.Client, *, online: bool) -> None:
        await client.publish(self._status_topic, encode({"online": online}), qos=1, retain=True)

    def _make_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            username=self._username,
            password=self._password,
            keepalive=self._keepalive_s,
            will=aiomqtt.Will(self._status_topic, encode({"online": False}), qos=1, retain=True),
            tls_context=ssl.create_default_context() if self._tls else None,
            max_queued_incoming_messages=100_000,
            socket_options=NO_DELAY,
            timeout=5.0,
        )

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._make_client() as client:
                    for topic in self._subscriptions:
                        await client.subscribe(topic, qos=1)
                    await self._announce(client, online=True)
                    self._client = client
                    self.connected.set()
                    self.connections += 1
                    attempt = 0
                    log.info("connected to MQTT broker %s:%d", self._host, self._port)
                    async for message in client.messages:
                        payload = message.payload
                        data = payload if isinstance(payload, bytes) else str(payload).encode()
                        await self._on_message(message.topic.value, data)
            except Exception as exc:
                # A broker outage (MqttError) or a bug in a handler: either way the link must
                # come back, never die silently while the process keeps running.
                if not isinstance(exc, aiomqtt.MqttError):
                    log.exception("MQTT link error; reconnecting")
                delay = self._delay(attempt)
                attempt += 1
                log.warning(
                    "MQTT connection to %s:%d lost or refused (%s); retrying in %.2f s",
                    self._host, self._port, exc, delay,
                )
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self._client = None

