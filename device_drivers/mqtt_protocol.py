"""The device-facing MQTT protocol of CONTRACT.md section 1: topics and payloads.

Pure parsing and encoding. Bytes from a device are untrusted: every parser returns either
a typed request or a `Malformed` that says what was wrong and, when it could be read, whom
to answer (the request id), so the shell can reply `malformed_request` and count it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from device_drivers.vocabulary import CREDENTIAL_TYPES, DEVICE_ID_RE, Credential, Reading

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ID_LEN = 128
MAX_CREDENTIAL_LEN = 512

# Channels a device publishes on, relative to {root}/devices/{device}/.
INBOUND_CHANNELS = (
    "status",
    "access/request",
    "payment/request",
    "payment/batch",
    "telemetry",
    "event",
    "command",  # only subscribed for Modbus units, for which the gateway answers
)


@dataclass(frozen=True, slots=True)
class AccessRequest:
    request_id: str
    credential: Credential
    ts: float | None


@dataclass(frozen=True, slots=True)
class Malformed:
    problem: str
    reply_id: str | None = None  # the request_id / txn_id / batch_id when it could be read


@dataclass(frozen=True, slots=True)
class Topic:
    device_id: str
    channel: str


def device_topic(root: str, device_id: str, channel: str) -> str:
    return f"{root}/devices/{device_id}/{channel}"


TELEMETRY_CHANNELS = ("telemetry",)


def alert_topic(root: str, rule_id: str, device_id: str) -> str:
    """CONTRACT.md section 1: where the gateway publishes alert transitions."""
    return f"{root}/alerts/{rule_id}/{device_id}"


def polled_topic(root: str, site_id: str, device_id: str) -> str:
    """Readings of a Modbus-polled unit, published by the gateway's poller for its telemetry
    worker. Not the unit's own `devices/{id}/telemetry`: a polled unit has no MQTT login, so
    anything on its device topic is someone speaking for it, and is refused."""
    return f"{root}/gateway/{site_id}/polled/{device_id}"


def polled_subscription(root: str, site_id: str) -> str:
    return f"{root}/gateway/{site_id}/polled/+"


def alert_subscription(root: str) -> str:
    return f"{root}/alerts/#"


def gateway_status_topic(root: str, site_id: str) -> str:
    """The gateway's own retained status and last will."""
    return f"{root}/gateway/{site_id}/status"


def subscriptions(root: str) -> list[str]:
    """Wildcards for what devices publish; `command` is subscribed per Modbus unit only,
    or the gateway would hear its own commands to gates and elevators."""
    return [*control_subscriptions(root), *telemetry_subscriptions(root)]


def control_subscriptions(root: str) -> list[str]:
    """Access, payments, status and events: the session that must never wait on readings."""
    return [f"{root}/devices/+/{channel}" for channel in INBOUND_CHANNELS
            if channel != "command" and channel not in TELEMETRY_CHANNELS]


def telemetry_subscriptions(root: str) -> list[str]:
    return [f"{root}/devices/+/{channel}" for channel in TELEMETRY_CHANNELS]


def parse_topic(root: str, topic: str) -> Topic | None:
    prefix = f"{root}/devices/"
    if not topic.startswith(prefix):
        return None
    device_id, _, channel = topic[len(prefix) :].partition("/")
    if not DEVICE_ID_RE.fullmatch(device_id) or channel not in INBOUND_CHANNELS:
        return None
    return Topic(device_id, channel)


def load_object(payload: bytes) -> dict[str, Any] | Malformed:
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Malformed(f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge ints, deep nesting
        return Malformed(f"not usable UTF-8 JSON: {str(exc)[:200]}")
    if not isinstance(data, dict):
        return Malformed("payload must be a JSON object")
    return data


ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_LEN}}}")


def read_id(data: dict[str, Any], key: str) -> str | None:
    """Ids are printable ASCII without spaces: they end up in logs, topics and SQL rows."""
    value = data.get(key)
    if isinstance(value, str) and ID_RE.fullmatch(value):
        return value
    return None


def read_credential(data: dict[str, Any]) -> Credential | str:
    """The credential object, or a description of what is wrong with it."""
    raw = data.get("credential")
    if not isinstance(raw, dict):
        return "credential must be an object {type, value}"
    kind, value = raw.get("type"), raw.get("value")
    if kind not in CREDENTIAL_TYPES:
        return f"credential.type must be one of {list(CREDENTIAL_TYPES)}"
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CREDENTIAL_LEN:
        return "credential.value must be a non-empty string"
    return Credential(kind, value)


def read_ts(data: dict[str, Any], key: str = "ts") -> float | str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{key} must be a number (Unix seconds)"
    return float(value)


def parse_access_request(payload: bytes) -> AccessRequest | Malformed:
    data = load_object(payload)
    if isinstance(data, Malformed):
        return data
    request_id = read_id(data, "request_id")
    if request_id is None:
        return Malformed("request_id must be a non-empty string")
    credential = read_credential(data)
    if isinstance(credential, str):
        return Malformed(credential, request_id)
    ts = read_ts(data)
    if isinstance(ts, str):
        return Malformed(ts, request_id)
    return AccessRequest(request_id, credential, ts)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decision_payload(
    request_id: str,
    *,
    granted: bool,
    action: str,
    duration_s: int,
    floors: list[int] | None,
    reason: str | None,
    ts: float,
) -> bytes:
    return encode(
        {
            "request_id": request_id,
            "granted": granted,
            "action": action,
            "duration_s": duration_s if granted else 0,
            "floors": floors,
            "reason": reason,
            "ts": ts,
        }
    )


def telemetry_payload(reading: Reading) -> bytes:
    """A reading as a device publishes it (CONTRACT.md section 1, `telemetry`)."""
    body: dict[str, Any] = {"ts": reading.ts, "metrics": dict(reading.metrics)}
    if reading.seq is not None:
        body["seq"] = reading.seq
    return encode(body)


def denial_payload(request_id: str, reason: str, ts: float) -> bytes:
    return decision_payload(
        request_id, granted=False, action="none", duration_s=0, floors=None, reason=reason, ts=ts
    )
