"""Routes device messages from MQTT to the core and answers the device.

This is the shell around the pure decisions: it parses (device_drivers.mqtt_protocol),
asks the access service, publishes the answer and counts what went wrong. An access request
is decided in memory (microseconds, in message order), then `AccessService.admit` writes
its audit entry and the token it spends (group-committed with whatever else is waiting,
about a millisecond on SQLite) in a task of its own while the reader loop goes on, and only
then is the answer published, without waiting for the broker's acknowledgement, so the next
request never waits on the previous one's write or round trip. Payments
go to the ledger's worker so a slow disk never delays a gate.

It also refuses what a device of its kind never sends, counted in
`scgw_mqtt_refused_total{kind, channel, reason}` (labels from fixed sets: the device kind,
never its id): payments from anything but a canteen terminal, access requests from anything
but a reader, anything on a Modbus-polled unit's own topics (it has no MQTT login, so that
is someone speaking for it), and decisions, payment results and reader commands that the
gateway did not publish itself (a forged `access/decision` cannot be stopped here, only by
the broker's ACL, but it is no longer invisible). Canteen terminals' status messages feed
their offline windows (gateway.canteen.offline_windows).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from device_drivers import mqtt_protocol as proto
from device_drivers.supervision import RequestTasks
from gateway.config import DeviceConfig
from gateway.devices.live import access_event
from gateway.metrics import Registry

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


class AccessDecider(Protocol):
    """gateway.access.service.AccessService: a decision recorded before it is returned;
    None when another gateway is answering this very request."""

    async def admit(self, device_id: str, credential_type: str, value: str, now: float, *,
                    request_id: str | None = None) -> Any: ...


class StatusObserver(Protocol):
    """gateway.canteen.offline_windows.OfflineWindows: canteen terminals' status."""

    def observe(self, device_id: str, online: bool, at: float | None = None) -> None: ...


class PaymentSink(Protocol):
    """The canteen side: takes a raw payment/batch message and answers it asynchronously."""

    async def handle(self, device: DeviceConfig, channel: str, payload: bytes) -> None: ...


class CommandSink(Protocol):
    """Commands addressed to devices the gateway answers for (Modbus units)."""

    async def handle(self, device: DeviceConfig, payload: bytes) -> None: ...


class EventSink(Protocol):
    """gateway.events.EventHub: where answered decisions go for live clients."""

    def publish(self, kind: Any, data: Any, owner: str | None = None) -> object: ...


class DecisionObserver(Protocol):
    def record(
        self, device: DeviceConfig, decision: Any, now: float, request_id: str | None = None
    ) -> None: ...


@dataclass
class DeviceState:
    online: bool | None = None
    last_seen: float | None = None


# What a device of each kind may publish (beside telemetry, which the telemetry worker
# takes). Modbus-polled units publish nothing themselves.
_READER_CHANNELS = frozenset({"status", "event", "access/request"})
_ALLOWED: dict[str, frozenset[str]] = {
    "gate": _READER_CHANNELS,
    "elevator": _READER_CHANNELS,
    "canteen": _READER_CHANNELS | {"payment/request", "payment/batch"},
}
_UNIT_CHANNELS = frozenset({"status", "event"})
# Channels only the gateway publishes on; the router watches them for forgeries.
OUTBOUND_CHANNELS = ("access/decision", "payment/result", "payment/batch_result", "command")
_WATCHED_SUFFIXES = tuple(f"/{channel}" for channel in OUTBOUND_CHANNELS)
_ECHO_TTL_S = 60.0
_ECHO_MAX = 100_000


def register_metrics(metrics: Registry) -> None:
    metrics.counter("scgw_mqtt_messages_total", "Device messages received, by channel.")
    metrics.counter("scgw_mqtt_errors_total", "Device messages refused, by channel and error.")
    metrics.counter("scgw_mqtt_refused_total",
                    "Messages a device of that kind never sends, refused: by device kind, "
                    "channel and reason (wrong_kind, polled_unit, not_from_gateway).",
                    labels=("kind", "channel", "reason"))
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
        status_observer: StatusObserver | None = None,
        events: EventSink | None = None,
    ) -> None:
        """`observer` audits decisions; leave it out when `access.admit` records them
        itself (a journal is attached), or each decision is logged twice."""
        self._root = root
        self.devices = devices
        self._access = access
        self._publish = publish
        self._metrics = metrics
        self._payments = payments
        self._observer = observer
        self._commands = commands
        self._clock = clock
        self._status_observer = status_observer
        self._events = events
        self.state: dict[str, DeviceState] = {d: DeviceState() for d in devices}
        self._outbox = RequestTasks("device answers", limit=50_000)
        # A decision waits for its record to be written (about a millisecond); meanwhile the
        # MQTT reader goes on, so concurrent decisions share one transaction. Their in-memory
        # part runs in message order (tasks start in the order they are created).
        self._deciding = RequestTasks("access decisions", limit=50_000)
        self._sent: OrderedDict[tuple[str, bytes], tuple[float, int]] = OrderedDict()
        self._prefix = f"{root}/devices/"
        register_metrics(metrics)

    def _error(self, channel: str, error: str) -> None:
        self._metrics.inc("scgw_mqtt_errors_total", channel=channel, error=error)

    def _refuse(self, device: DeviceConfig, channel: str, reason: str) -> None:
        self._metrics.inc("scgw_mqtt_refused_total", kind=device.kind, channel=channel,
                          reason=reason)
        log.warning("refused %s from %s (%s): %s", channel, device.device_id, device.kind,
                    reason)

    # --- what the gateway itself publishes -------------------------------------------------

    def watch_subscriptions(self) -> list[str]:
        """Topics only the gateway publishes on, to subscribe so that anyone else's messages
        there are seen and counted. Modbus units' `command` topics are not here: the
        runtime subscribes those for the commands it carries out (broker ACLs decide who may
        publish them); readers' commands are."""
        topics = [f"{self._prefix}+/{channel}" for channel in OUTBOUND_CHANNELS
                  if channel != "command"]
        topics += [proto.device_topic(self._root, d.device_id, "command")
                   for d in self.devices.values() if not d.is_modbus]
        return topics

    def note_outgoing(self, topic: str, payload: bytes) -> None:
        """Remember a message the gateway is about to publish, so its echo is not taken
        for a forgery. Every publish of the gateway process goes through here; only those
        on the watched channels are remembered."""
        if not topic.startswith(self._prefix) or not topic.endswith(_WATCHED_SUFFIXES):
            return
        now = time.monotonic()
        key = (topic, hashlib.blake2b(payload, digest_size=8).digest())
        # Counted: the same answer can go out twice (a terminal retrying a txn is answered
        # again, byte for byte), and each copy comes back once.
        _, copies = self._sent.pop(key, (now, 0))
        self._sent[key] = (now, copies + 1)
        while self._sent:
            oldest, (at, _) = next(iter(self._sent.items()))
            if at > now - _ECHO_TTL_S and len(self._sent) <= _ECHO_MAX:
                break
            del self._sent[oldest]

    def _watched(self, topic: str, payload: bytes) -> bool:
        """True when `topic` is on an outbound channel (and has been dealt with here)."""
        if not topic.startswith(self._prefix):
            return False
        device_id, _, channel = topic[len(self._prefix):].partition("/")
        if channel not in OUTBOUND_CHANNELS:
            return False
        device = self.devices.get(device_id)
        if channel == "command" and device is not None and device.is_modbus:
            return False  # a command for a unit the gateway drives: handled below
        key = (topic, hashlib.blake2b(payload, digest_size=8).digest())
        sent = self._sent.pop(key, None)
        if sent is not None:
            at, copies = sent
            if copies > 1:
                self._sent[key] = (at, copies - 1)
            return True  # our own message coming back
        kind = device.kind if device is not None else "unknown"
        self._metrics.inc("scgw_mqtt_refused_total", kind=kind, channel=channel,
                          reason="not_from_gateway")
        log.warning("a %s for %s that the gateway did not send was published", channel,
                    device_id[:64])
        return True

    async def on_message(self, topic: str, payload: bytes) -> None:
        if self._watched(topic, payload):
            return
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
            if channel != "command" and not await self._allowed(device, channel, payload):
                return
            if channel != "command":  # our own commands are not signs of life
                self.state[device.device_id].last_seen = self._clock()
            state = self.state[device.device_id]
            if channel == "access/request":
                await self._access_request(device, payload)
            elif channel in ("payment/request", "payment/batch"):
                await self._payment(device, channel, payload)
            elif channel == "status":
                self._status(device, state, payload)
            elif channel == "event":
                self._event(device, payload)
            elif channel == "command" and device.is_modbus and self._commands is not None:
                await self._commands.handle(device, payload)
        except Exception:
            # A bug in one handler must not take the connection (and every gate) down.
            log.exception("error handling %s from %s", channel, parsed.device_id)
            self._error(channel, "internal")

    async def _allowed(self, device: DeviceConfig, channel: str, payload: bytes) -> bool:
        """Whether a device of this kind ever sends on `channel`; refused and counted if not.
        A request that can be answered still gets its `malformed_request`."""
        if device.is_modbus:
            reason = None if channel in ("telemetry",) else "polled_unit"
        else:
            allowed = _ALLOWED.get(device.kind, _UNIT_CHANNELS)
            reason = None if channel in allowed or channel == "telemetry" else "wrong_kind"
        if reason is None:
            return True
        self._refuse(device, channel, reason)
        if channel in ("payment/request", "payment/batch"):
            self._error(channel, "not_a_canteen_terminal")
        if channel == "payment/request":
            await self._refuse_payment(device.device_id, payload)
        elif channel == "access/request":
            await self._refuse_access(device.device_id, payload)
        return False

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
        if not self._deciding.start(self._decide_and_answer(
                device, request.request_id, cred.type, cred.value, now)):
            self._error("access/request", "overloaded")

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
        # Recorded (audit row, spent token, visitor-pass use) before anything is sent.
        decision = await self._access.admit(device.device_id, ctype, value, now,
                                            request_id=request_id)
        if decision is None:  # another gateway on this broker answers this very request
            self._metrics.inc("scgw_access_decisions_total", kind=device.kind,
                              result="answered_by_peer")
            return
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
        if self._events is not None:
            self._events.publish("access", access_event(
                device.device_id, device.kind, decision, now, request_id, decision.duration_s),
                owner=decision.resident_id)
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
        """Let decisions under way and answers already decided reach the broker before the
        link goes."""
        await self._deciding.close(grace_s=2.0)
        await self._outbox.close(grace_s=1.0)

    async def _payment(self, device: DeviceConfig, channel: str, payload: bytes) -> None:
        if self._payments is None or device.kind != "canteen":
            self._error(channel, "not_a_canteen_terminal")
            if channel == "payment/request":
                await self._refuse_payment(device.device_id, payload)
            return
        await self._payments.handle(device, channel, payload)

    def _status(self, device: DeviceConfig, state: DeviceState, payload: bytes) -> None:
        data = proto.load_object(payload)
        if isinstance(data, proto.Malformed) or not isinstance(data.get("online"), bool):
            self._error("status", "malformed")
            return
        state.online = data["online"]
        if device.kind == "canteen" and self._status_observer is not None:
            self._status_observer.observe(device.device_id, data["online"], self._clock())

    def _event(self, device: DeviceConfig, payload: bytes) -> None:
        data = proto.load_object(payload)
        if isinstance(data, proto.Malformed) or not isinstance(data.get("type"), str):
            self._error("event", "malformed")
            return
        known = {"door_forced", "door_held_open", "tamper"}
        kind = data["type"] if data["type"] in known else "other"
        self._metrics.inc("scgw_device_events_total", type=kind)
        log.warning("event %s from %s", data["type"][:64], device.device_id)

