"""Routes device messages from MQTT to the core and answers the device.

This is the shell around the pure decisions: it parses (device_drivers.mqtt_protocol),
asks the access service, publishes the answer, records the audit entry and counts what
went wrong. Access decisions are decided inline (microseconds) and their answers published
without waiting for the broker's acknowledgement, so the next request never waits on the
previous one's round trip (publishes start in order, so per-device order holds); payments go
to the ledger's worker so a slow disk never delays a gate.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from device_drivers import mqtt_protocol as proto
from device_drivers.supervision import RequestTasks
from gateway.config import DeviceConfig
from gateway.metrics import Registry

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


class AccessDecider(Protocol):
    def decide(self, device_id: str, credential_type: str, value: str, now: float) -> Any: ...


class PaymentSink(Protocol):
    """The canteen side: takes a raw payment/batch message and answers it asynchronously."""

    async def handle(self, device: DeviceConfig, channel: str, payload: bytes) -> None: ...


class CommandSink(Protocol):
    """Commands addressed to devices the gateway answers for (Modbus units)."""

    async def handle(self, device: DeviceConfig, payload: bytes) -> None: ...


class DecisionObserver(Protocol):
    def record(
        self, device: DeviceConfig, decision: Any, now: float, request_id: str | None = None
    ) -> None: ...


@dataclass
class DeviceState:
    online: bool | None = None
    last_seen: float | None = None


def register_metrics(metrics: Registry) -> None:
    metrics.counter("scgw_mqtt_messages_total", "Device messages received, by channel.")
    metrics.counter("scgw_mqtt_errors_total", "Device messages refused, by channel and error.")
    metrics.counter("scgw_access_decisions_total", "Access decisions, by reader kind and result.")
    metrics.histogram("scgw_access_decision_seconds",
                      "Time from an access request's arrival to its answer being sent.")
    metrics.counter("scgw_device_events_total", "Device events, by type class.")


class DeviceRouter:
    def __init__(
        self,
        *,
        root: str,
        devices: dict[str, DeviceConfig],
        access: AccessDecider,
        publish: Publish,
        metrics: Registry,
        payments: PaymentSink | None = None,
        observer: DecisionObserver | None = None,
        commands: CommandSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._root = root
        self.devices = devices
        self._access = access
        self._publish = publish
        self._metrics = metrics
        self._payments = payments
        self._observer = observer
        self._commands = commands
        self._clock = clock
        self.state: dict[str, DeviceState] = {d: DeviceState() for d in devices}
        self._outbox = RequestTasks("device answers", limit=50_000)
        register_metrics(metrics)

    def _error(self, channel: str, error: str) -> None:
        self._metrics.inc("scgw_mqtt_errors_total", channel=channel, error=error)

    async def on_message(self, topic: str, payload: bytes) -> None:
        parsed = proto.parse_topic(self._root, topic)
        if parsed is None:
            if not topic.endswith("/status"):
                self._error("unknown", "bad_topic")
            return
        channel = parsed.channel
        self._metrics.inc("scgw_mqtt_messages_total", channel=channel)
        device = self.devices.get(parsed.device_id)
        try:
            if device is None:
                await self._unknown_device(parsed, payload)
                return
            if channel != "command":  # our own commands are not signs of life
                self.state[device.device_id].last_seen = self._clock()
            state = self.state[device.device_id]
            if channel == "access/request":
                await self._access_request(device, payload)
            elif channel in ("payment/request", "payment/batch"):
                await self._payment(device, channel, payload)
            elif channel == "status":
                self._status(state, payload)
            elif channel == "event":
                self._event(device, payload)
            elif channel == "command" and device.is_modbus and self._commands is not None:
                await self._commands.handle(device, payload)
        except Exception:
            # A bug in one handler must not take the connection (and every gate) down.
            log.exception("error handling %s from %s", channel, parsed.device_id)
            self._error(channel, "internal")

    async def _unknown_device(self, parsed: proto.Topic, payload: bytes) -> None:
        self._error(parsed.channel, "unknown_device")
        log.warning("message on %s from unknown device %r", parsed.channel, parsed.device_id)
        if parsed.channel == "access/request":
            await self._refuse_access(parsed.device_id, payload)
        elif parsed.channel == "payment/request":
            await self._refuse_payment(parsed.device_id, payload)

    async def _refuse_access(self, device_id: str, payload: bytes) -> None:
        request = proto.parse_access_request(payload)
        reply_id = request.reply_id if isinstance(request, proto.Malformed) else (
            request.request_id
        )
        if reply_id is not None:
            topic = proto.device_topic(self._root, device_id, "access/decision")
            self.send(
                topic, proto.denial_payload(reply_id, "malformed_request", self._clock())
            )

    async def _refuse_payment(self, device_id: str, payload: bytes) -> None:
        """Payments from something that is not a canteen terminal: refused, never applied."""
        data = proto.load_object(payload)
        txn_id = None if isinstance(data, proto.Malformed) else proto.read_id(data, "txn_id")
        if txn_id is not None:
            topic = proto.device_topic(self._root, device_id, "payment/result")
            self.send(topic, proto.encode({
                "txn_id": txn_id, "approved": False, "balance_cents": None,
                "reason": "malformed_request",
            }))

    async def _access_request(self, device: DeviceConfig, payload: bytes) -> None:
        now = self._clock()
        reply_topic = proto.device_topic(self._root, device.device_id, "access/decision")
        request = proto.parse_access_request(payload)
        if isinstance(request, proto.Malformed):
            self._error("access/request", "malformed")
            log.warning("malformed access request from %s: %s", device.device_id, request.problem)
            if request.reply_id is not None:
                self.send(
                    reply_topic, proto.denial_payload(request.reply_id, "malformed_request", now)
                )
            return
        cred = request.credential
        await self._decide_and_answer(device, request.request_id, cred.type, cred.value, now)

    async def on_ble_token(self, device_id: str, credential_type: str, token_hex: str) -> None:
        """A phone's BLE token seen at a reader: decide and tell the reader, unasked."""
        device = self.devices[device_id]
        self._metrics.inc("scgw_mqtt_messages_total", channel="ble")
        request_id = f"ble-{secrets.token_hex(6)}"
        await self._decide_and_answer(device, request_id, credential_type, token_hex,
                                      self._clock())

    async def _decide_and_answer(
        self, device: DeviceConfig, request_id: str, ctype: str, value: str, now: float
    ) -> None:
        reply_topic = proto.device_topic(self._root, device.device_id, "access/decision")
        started = time.perf_counter()
        decision = self._access.decide(device.device_id, ctype, value, now)
        if self._observer is not None:  # audited even if the answer cannot be delivered
            self._observer.record(device, decision, now, request_id)
        floors = list(decision.floors) if decision.floors is not None else None
        self.send(
            reply_topic,
            proto.decision_payload(
                request_id,
                granted=decision.granted,
                action=decision.action,
                duration_s=decision.duration_s,
                floors=floors,
                reason=decision.reason,
                ts=now,
            ),
        )
        result = "granted" if decision.granted else str(decision.reason)
        self._metrics.inc("scgw_access_decisions_total", kind=device.kind, result=result)
        self._metrics.observe("scgw_access_decision_seconds", time.perf_counter() - started)

    def send(self, topic: str, payload: bytes) -> None:
        """Publish an answer without waiting for the broker's PUBACK (see module docstring)."""
        if not self._outbox.start(self._deliver(topic, payload)):
            self._error("outbox", "full")

    async def _deliver(self, topic: str, payload: bytes) -> None:
        try:
            await self._publish(topic, payload)
        except Exception as exc:  # broker away: the device times out and asks again
            self._error("outbox", "publish_failed")
            log.warning("could not publish to %s: %s", topic, exc)

    async def close(self) -> None:
        """Let answers already decided reach the broker before the link goes."""
        await self._outbox.close(grace_s=1.0)

    async def _payment(self, device: DeviceConfig, channel: str, payload: bytes) -> None:
        if self._payments is None or device.kind != "canteen":
            self._error(channel, "not_a_canteen_terminal")
            if channel == "payment/request":
                await self._refuse_payment(device.device_id, payload)
            return
        await self._payments.handle(device, channel, payload)

    def _status(self, state: DeviceState, payload: bytes) -> None:
        data = proto.load_object(payload)
        if isinstance(data, proto.Malformed) or not isinstance(data.get("online"), bool):
            self._error("status", "malformed")
            return
        state.online = data["online"]

    def _event(self, device: DeviceConfig, payload: bytes) -> None:
        data = proto.load_object(payload)
        if isinstance(data, proto.Malformed) or not isinstance(data.get("type"), str):
            self._error("event", "malformed")
            return
        known = {"door_forced", "door_held_open", "tamper"}
        kind = data["type"] if data["type"] in known else "other"
        self._metrics.inc("scgw_device_events_total", type=kind)
        log.warning("event %s from %s", data["type"][:64], device.device_id)

