"""Where the live events (gateway.events) come from, and every device's presence.

- Access decisions: the device router publishes each one as it answers it; remote opens
  from the API through `AuditTap`, which wraps the audit log the API records them in.
- Payments: `PaymentTap` wraps the canteen's publish (it sees every `payment/result` and
  `batch_result`) and, to tell whose payment it was, the access service the canteen
  resolves credentials with (the purse is the resident's id). A retried payment, answered
  from the ledger without resolving again, goes out without an owner: staff see it.
- Alerts: the gateway's control session subscribes `{root}/alerts/#` (a few a minute) and
  hands each to `alert_event`.
- Device presence and readings: `LiveFeed` looks once a second at what the gateway already
  keeps (the router's MQTT status, the Modbus poller's health, the latest-reading cache the
  telemetry worker fills) and publishes what changed. The access process never parses a
  telemetry message for this, readings come at most once per device per second, and with
  no engineer or admin connected the readings are not even looked at.

`DevicePresence` is the device list's view: online true/false and last seen for every
kind, polled units included (from the poller's health and their latest values).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from device_drivers.modbus.health import DeviceHealth
from device_drivers.vocabulary import Reading
from gateway.access.audit import DecisionLike
from gateway.events import EventHub

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
_MAX_OWNERS = 10_000


def access_event(device_id: str, kind: str, decision: DecisionLike, ts: float,
                 request_id: str | None, duration_s: int | None = None) -> dict[str, Any]:
    """The decision as the reader got it (CONTRACT.md `access/decision`) plus who and how."""
    method = ("visitor" if decision.visitor_pass_id is not None else
              "remote" if decision.credential_type == "app" else decision.credential_type)
    return {
        "request_id": request_id, "granted": bool(decision.granted),
        "action": str(decision.action), "duration_s": duration_s,
        "floors": list(decision.floors) if decision.floors is not None else None,
        "reason": None if decision.reason is None else str(decision.reason), "ts": ts,
        "device_id": device_id, "device_kind": kind, "method": method,
        "resident_id": decision.resident_id,
    }


def alert_event(hub: EventHub, payload: bytes) -> None:
    """An alert transition from `{root}/alerts/...`, passed on as it was published."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("rule_id"), str):
        log.warning("an alert message that is not an alert object was ignored")
        return
    hub.publish("alert", data)


class _DecisionRecorder(Protocol):
    def record_decision(self, device_id: str, device_kind: str, decision: Any, now: float,
                        request_id: str | None = None) -> None: ...

    async def record_decision_durably(self, device_id: str, device_kind: str, decision: Any,
                                      now: float, request_id: str | None = None) -> bool: ...


class AuditTap:
    """The audit log as the API uses it (remote opens), also publishing each decision."""

    def __init__(self, audit: _DecisionRecorder, hub: EventHub) -> None:
        self._audit = audit
        self._hub = hub

    def record_decision(self, device_id: str, device_kind: str, decision: Any, now: float,
                        request_id: str | None = None) -> None:
        self._audit.record_decision(device_id, device_kind, decision, now, request_id)
        self._publish(device_id, device_kind, decision, now, request_id)

    async def record_decision_durably(self, device_id: str, device_kind: str, decision: Any,
                                      now: float, request_id: str | None = None) -> bool:
        stored = await self._audit.record_decision_durably(device_id, device_kind, decision,
                                                           now, request_id)
        self._publish(device_id, device_kind, decision, now, request_id)
        return stored

    def _publish(self, device_id: str, device_kind: str, decision: Any, now: float,
                 request_id: str | None) -> None:
        self._hub.publish("access", access_event(
            device_id, device_kind, decision, now, request_id,
            getattr(decision, "duration_s", None)), owner=decision.resident_id)


class _Admits(Protocol):
    async def admit(self, device_id: str, credential_type: str, value: str,
                    now: float | None = None, *, request_id: str | None = None,
                    payment_ref: str | None = None) -> Any: ...


class PaymentTap:
    """Publishes the canteen's answers as `payment` events, each with its resident."""

    def __init__(self, root: str, publish: Publish, hub: EventHub) -> None:
        self._prefix = f"{root}/devices/"
        self._publish = publish
        self._hub = hub
        self._owners: OrderedDict[str, str] = OrderedDict()  # "terminal/txn_id" -> resident

    def access(self, access: _Admits) -> _OwnerNoting:
        """The access service as the canteen should use it: notes whose purse paid."""
        return _OwnerNoting(access, self)

    def note(self, payment_ref: str, account: str | None) -> None:
        if account is None:
            return
        self._owners[payment_ref] = account
        while len(self._owners) > _MAX_OWNERS:
            self._owners.popitem(last=False)

    async def publish(self, topic: str, payload: bytes) -> None:
        await self._publish(topic, payload)
        try:
            self._events(topic, payload)
        except Exception:  # the answer went out; an event is not worth a failed payment
            log.exception("could not publish the live event of %s", topic)

    def _events(self, topic: str, payload: bytes) -> None:
        if not topic.startswith(self._prefix):
            return
        terminal, _, channel = topic[len(self._prefix):].partition("/")
        data = json.loads(payload)
        if channel == "payment/result":
            results = [data]
        elif channel == "payment/batch_result":
            results = [r for r in data.get("results", ()) if isinstance(r, dict)]
        else:
            return
        for result in results:
            owner = self._owners.pop(f"{terminal}/{result.get('txn_id')}", None)
            self._hub.publish("payment", {**result, "device_id": terminal}, owner=owner)


class _OwnerNoting:
    """Delegates to the access service; remembers the account a payment resolved to."""

    def __init__(self, access: _Admits, tap: PaymentTap) -> None:
        self._access = access
        self._tap = tap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._access, name)

    async def admit(self, device_id: str, credential_type: str, value: str,
                    now: float | None = None, *, request_id: str | None = None,
                    payment_ref: str | None = None) -> Any:
        decision = await self._access.admit(device_id, credential_type, value, now,
                                            request_id=request_id, payment_ref=payment_ref)
        if decision is not None and payment_ref is not None and decision.granted:
            self._tap.note(payment_ref, decision.account or decision.resident_id)
        return decision


# --- presence and readings ------------------------------------------------------------------


class _RouterState(Protocol):
    @property
    def online(self) -> bool | None: ...
    @property
    def last_seen(self) -> float | None: ...


class _Latest(Protocol):
    def get(self, device_id: str) -> Reading | None: ...


@dataclass(frozen=True, slots=True)
class Presence:
    online: bool
    last_seen: float | None  # None: never heard from since the gateway started


class DevicePresence(Mapping[str, Presence]):
    """device id -> Presence, for every configured device.

    MQTT devices: the router's status (a device is online once it said so, or once it sent
    anything while no status is known). Polled units: the poller's health. Either way, the
    newest of what was heard and the latest reading's time is `last_seen`.
    """

    def __init__(self, device_ids: list[str], router_state: Mapping[str, _RouterState],
                 modbus_health: Callable[[], Mapping[str, DeviceHealth]],
                 latest: _Latest | None = None) -> None:
        self._ids = device_ids
        self._router = router_state
        self._health = modbus_health
        self._latest = latest

    def __getitem__(self, device_id: str) -> Presence:
        return self._presence(device_id, self._health())

    def snapshot(self) -> dict[str, Presence]:
        """Every device at once, the poller's health read once."""
        health = self._health()
        return {d: self._presence(d, health) for d in self._ids}

    def _presence(self, device_id: str, health_map: Mapping[str, DeviceHealth]) -> Presence:
        health = health_map.get(device_id)
        if health is None and device_id not in self._router:
            raise KeyError(device_id)
        seen: list[float] = []
        if health is not None:
            online = health.online
            if health.last_seen is not None:
                seen.append(health.last_seen)
        else:
            state = self._router[device_id]
            online = bool(state.online)
            if state.last_seen is not None:
                seen.append(state.last_seen)
        reading = self._latest.get(device_id) if self._latest is not None else None
        if reading is not None:
            seen.append(reading.ts)
        return Presence(online, max(seen) if seen else None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


class LiveFeed:
    """Once a second: device online/offline changes, and new readings while anyone who may
    see them is connected."""

    def __init__(self, hub: EventHub, presence: DevicePresence,
                 kinds: Mapping[str, str], latest: _Latest | None,
                 interval_s: float = 1.0) -> None:
        self._hub = hub
        self._presence = presence
        self._kinds = kinds
        self._latest = latest
        self._interval_s = interval_s
        self._online = {d: p.online for d, p in presence.snapshot().items()}
        self._read_ts: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.tick()

    def tick(self) -> None:
        for device_id, presence in self._presence.snapshot().items():
            if self._online.get(device_id) != presence.online:
                self._online[device_id] = presence.online
                self._hub.publish("device", {
                    "device_id": device_id, "kind": self._kinds.get(device_id),
                    "online": presence.online, "last_seen": presence.last_seen})
        if self._latest is None or not self._hub.wants("reading"):
            return
        for device_id in self._presence:
            reading = self._latest.get(device_id)
            if reading is None or self._read_ts.get(device_id) == reading.ts:
                continue
            self._read_ts[device_id] = reading.ts
            self._hub.publish_reading(device_id, {
                "device_id": device_id, "kind": reading.kind, "ts": reading.ts,
                "seq": reading.seq, "metrics": dict(reading.metrics)})
