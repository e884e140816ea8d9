"""Simulated gate and elevator readers speaking the CONTRACT.md MQTT protocol.

A reader presents credentials (`present`) and acts on what the gateway answers: a gate
unlocks for `duration_s`, an elevator car enables the listed floor buttons, and remote
commands (`unlock`, `call_floor`) do the same. State changes are kept as a list of
`Actuation`s so tests and the demo can see what a real lock would have done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiomqtt

from device_drivers.mqtt_protocol import device_topic
from simulators.device_link import device_connection

log = logging.getLogger(__name__)
READER_CHANNELS = ["access/decision", "command"]


@dataclass(frozen=True, slots=True)
class Actuation:
    ts: float
    action: str  # "unlock" | "enable_floors" | "call_floor"
    source: str  # "decision" | "command"
    duration_s: float = 0.0
    floors: tuple[int, ...] = ()


@dataclass
class ReaderSimulator:
    host: str
    port: int
    device_id: str
    kind: str = "gate"  # gate | elevator | canteen-like readers reuse the same plumbing
    root: str = "scgw"
    username: str | None = None  # the device's broker login (scgw mqtt-config)
    password: str | None = field(default=None, repr=False)
    actuations: list[Actuation] = field(default_factory=list)
    _client: aiomqtt.Client | None = None
    _stack: contextlib.AsyncExitStack | None = None
    _task: asyncio.Task[None] | None = None
    _pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def topic(self, channel: str) -> str:
        return device_topic(self.root, self.device_id, channel)

    async def __aenter__(self) -> ReaderSimulator:
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            device_connection(self.host, self.port, self.root, self.device_id, READER_CHANNELS,
                              self.username, self.password)
        )
        self._task = asyncio.create_task(self._listen(), name=f"reader-{self.device_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._stack is not None:
            await self._stack.aclose()

    async def present(
        self, credential_type: str, value: str, timeout_s: float = 5.0
    ) -> dict[str, Any]:
        """Publish an access request and wait for its decision."""
        request_id = f"r-{secrets.token_hex(6)}"
        payload = {
            "request_id": request_id,
            "credential": {"type": credential_type, "value": value},
            "ts": time.time(),
        }
        return await self.send_raw(json.dumps(payload).encode(), request_id, timeout_s)

    async def report_event(self, event_type: str, ts: float | None = None) -> None:
        """A device event (`door_forced`, `door_held_open`, `tamper`) as a real reader sends
        it; the gateway's rules turn it into an alert."""
        assert self._client is not None
        payload = {"type": event_type, "ts": time.time() if ts is None else ts}
        await self._client.publish(self.topic("event"), json.dumps(payload), qos=1)

    async def send_raw(
        self, payload: bytes, request_id: str, timeout_s: float = 5.0
    ) -> dict[str, Any]:
        assert self._client is not None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._client.publish(self.topic("access/request"), payload, qos=1)
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._pending.pop(request_id, None)

    async def _listen(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            try:
                data = json.loads(message.payload if isinstance(message.payload, bytes) else b"")
            except json.JSONDecodeError:
                continue
            if not isinstance(data, dict):
                continue
            if message.topic.matches(self.topic("access/decision")):
                self._on_decision(data)
            else:
                self._on_command(data)

    def _on_decision(self, data: dict[str, Any]) -> None:
        if data.get("granted"):
            floors = tuple(data.get("floors") or ())
            self._actuate(data.get("action", "none"), "decision", data.get("duration_s", 0), floors)
        future = self._pending.get(str(data.get("request_id")))
        if future is not None and not future.done():
            future.set_result(data)

    def _on_command(self, data: dict[str, Any]) -> None:
        action = data.get("action")
        if action == "unlock" and self.kind == "gate":
            self._actuate("unlock", "command", data.get("duration_s", 5), ())
        elif action == "call_floor" and self.kind == "elevator":
            self._actuate("call_floor", "command", 0, (int(data.get("floor", 0)),))

    def _actuate(self, action: str, source: str, duration: Any, floors: tuple[int, ...]) -> None:
        act = Actuation(time.time(), action, source, float(duration or 0), floors)
        self.actuations.append(act)
        if action == "unlock":
            log.info("%s: unlocked for %.0f s (%s)", self.device_id, act.duration_s, source)
        elif action == "enable_floors":
            log.info("%s: floors %s enabled (%s)", self.device_id, list(floors), source)
        elif action == "call_floor":
            log.info("%s: car called to floor %s", self.device_id, floors[0])
