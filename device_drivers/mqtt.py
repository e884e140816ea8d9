"""The gateway's MQTT connections: reconnect forever, announce themselves, hand messages on.

Modelled on aiomqtt's own Client: an async context manager that owns its one task. The
connection loop reconnects with jittered exponential backoff, so a broker restart costs a
few hundred milliseconds and a site-wide broker outage does not turn into a reconnect storm
from every gateway at once. The gateway's status is a retained message with a last will, so
subscribers see `{"online": false}` when the gateway dies without saying goodbye.

The gateway opens two of these: one for access and payments, one for telemetry. A broker
delivers each session's messages in order over its own socket, so a flood of readings
queues behind readings only; the reader loop also yields to the event loop every few
messages, and a full incoming queue sheds (counted in `shed`) instead of growing.
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
from device_drivers.supervision import ComponentTasks, Supervisor

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]
YIELD_EVERY = 16  # messages handled before the reader lets other tasks run

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
        status_topic: str | None,
        subscriptions: Sequence[str],
        on_message: MessageHandler,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        keepalive_s: int = 30,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 30.0,
        max_queued: int = 100_000,
        supervisor: Supervisor | None = None,
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
        self._tasks = ComponentTasks(supervisor, f"mqtt-link-{client_id}")
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects, for /metrics and tests
        self._max_queued = max_queued
        self._aiomqtt_log = logging.getLogger(f"{__name__}.{client_id}")
        self._aiomqtt_log.addFilter(self._count_shed)
        self.shed = 0  # messages dropped because the incoming queue was full

    async def __aenter__(self) -> MqttLink:
        await self._tasks.start()
        self._tasks.spawn(f"mqtt-link-{self._client_id}", self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client = self._client
        if client is not None and self.connected.is_set() and self._status_topic is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self._announce(client, online=False)
            except (aiomqtt.MqttError, TimeoutError):
                log.warning("could not publish offline status on shutdown")
        await self._tasks.stop()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish now, or raise aiomqtt.MqttError when the broker is not reachable."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise aiomqtt.MqttError("not connected to the MQTT broker")
        await client.publish(topic, payload, qos=qos, retain=retain)

    async def _announce(self, client: aiomqtt.Client, *, online: bool) -> None:
        if self._status_topic is not None:
            await client.publish(self._status_topic, encode({"online": online}), qos=1,
                                 retain=True)

    def _count_shed(self, record: logging.LogRecord) -> bool:
        """aiomqtt logs one warning per message it drops on a full queue: count instead."""
        if "queue is full" in record.getMessage():
            self.shed += 1
            if self.shed == 1 or self.shed % 10_000 == 0:
                log.warning("MQTT %s: incoming queue full, %d messages shed so far",
                            self._client_id, self.shed)
            return False
        return True

    def _make_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            username=self._username,
            password=self._password,
            keepalive=self._keepalive_s,
            will=None if self._status_topic is None else aiomqtt.Will(
                self._status_topic, encode({"online": False}), qos=1, retain=True),
            logger=self._aiomqtt_log,
            tls_context=ssl.create_default_context() if self._tls else None,
            max_queued_incoming_messages=self._max_queued,
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
                    handled = 0
                    async for message in client.messages:
                        payload = message.payload
                        data = payload if isinstance(payload, bytes) else str(payload).encode()
                        await self._on_message(message.topic.value, data)
                        handled += 1
                        if handled % YIELD_EVERY == 0:
                            await asyncio.sleep(0)
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

