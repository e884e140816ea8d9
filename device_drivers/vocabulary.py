"""The words of CONTRACT.md, defined once: device ids and kinds, credentials, reasons, readings.

Every other module (the gateway, the API, the rules engine, the simulators) imports these
instead of spelling them again, so a new device kind or refusal reason is one edit here.
Nothing in this module does I/O or imports another package of ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal, get_args

DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"
"""CONTRACT.md section 1: a device id; also the form of site and building ids."""
DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)

DeviceKind = Literal["gate", "elevator", "canteen", "hvac", "fresh_air", "air_purifier", "meter"]
DEVICE_KINDS: Final[tuple[DeviceKind, ...]] = get_args(DeviceKind)
READER_KINDS: Final[frozenset[str]] = frozenset({"gate", "elevator", "canteen"})
"""Kinds that read credentials and ask for decisions over MQTT."""
MODBUS_KINDS: Final[frozenset[str]] = frozenset({"hvac", "fresh_air", "air_purifier", "meter"})
"""Kinds that may be polled over Modbus (they may also speak MQTT telemetry)."""

CredentialType = Literal["qr", "ble", "card"]
CREDENTIAL_TYPES: Final[tuple[CredentialType, ...]] = get_args(CredentialType)


def valid_device_id(value: object) -> bool:
    return isinstance(value, str) and DEVICE_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Credential:
    """What a reader or terminal read, as received; its `value` is checked by the decision."""

    type: str
    value: str


class Reason(StrEnum):
    """Every refusal reason of CONTRACT.md section 1, spelled exactly as on the wire.

    Access decisions use ACCESS_REASONS, payments PAYMENT_REASONS; the two overlap because
    one phone credential is checked the same way at a gate and at a till.
    """

    INVALID_TOKEN = "invalid_token"  # noqa: S105 (a reason code, not a password)
    EXPIRED_TOKEN = "expired_token"  # noqa: S105
    REPLAYED_TOKEN = "replayed_token"  # noqa: S105
    REVOKED = "revoked"
    UNKNOWN_CARD = "unknown_card"
    NOT_PERMITTED = "not_permitted"
    OUTSIDE_SCHEDULE = "outside_schedule"
    MALFORMED_REQUEST = "malformed_request"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    AMOUNT_MISMATCH = "amount_mismatch"
    OUTSIDE_OFFLINE_WINDOW = "outside_offline_window"
    OFFLINE_LIMIT = "offline_limit"


_CREDENTIAL_REASONS = frozenset({
    Reason.INVALID_TOKEN, Reason.EXPIRED_TOKEN, Reason.REPLAYED_TOKEN, Reason.REVOKED,
    Reason.UNKNOWN_CARD, Reason.NOT_PERMITTED, Reason.MALFORMED_REQUEST,
})
ACCESS_REASONS: Final = _CREDENTIAL_REASONS | {Reason.OUTSIDE_SCHEDULE}
PAYMENT_REASONS: Final = _CREDENTIAL_REASONS | {
    Reason.INSUFFICIENT_FUNDS, Reason.AMOUNT_MISMATCH, Reason.OUTSIDE_OFFLINE_WINDOW,
    Reason.OFFLINE_LIMIT,
}

DeviceEventType = Literal["door_forced", "door_held_open", "tamper"]
DEVICE_EVENT_TYPES: Final[tuple[DeviceEventType, ...]] = get_args(DeviceEventType)
"""Event types the gateway knows by name; devices may send others (counted as `other`)."""

STANDARD_METRICS: Final[Mapping[str, str]] = {
    "power_w": "W",
    "energy_wh": "Wh",
    "voltage_v": "V",
    "current_a": "A",
    "temperature_c": "°C",
    "setpoint_c": "°C",
    "humidity_pct": "%",
    "pm25_ugm3": "µg/m³",
    "co2_ppm": "ppm",
    "fan_speed_pct": "%",
    "filter_dp_pa": "Pa",
    "running": "",
}
"""CONTRACT.md section 7: standard metric names and their units; devices may add others."""

PLAUSIBLE_RANGES: Final[Mapping[str, tuple[float, float]]] = {
    "power_w": (-10e6, 10e6),  # 10 MW either way: beyond a residential community's supply
    "energy_wh": (0.0, 1e15),  # cumulative: never negative
    "voltage_v": (0.0, 50_000.0),  # up to medium voltage
    "current_a": (-100_000.0, 100_000.0),
    "temperature_c": (-80.0, 200.0),
    "setpoint_c": (-50.0, 100.0),
    "humidity_pct": (0.0, 100.0),
    "pm25_ugm3": (0.0, 10_000.0),
    "co2_ppm": (0.0, 100_000.0),
    "fan_speed_pct": (0.0, 100.0),
    "filter_dp_pa": (-100.0, 10_000.0),
    "running": (0.0, 1.0),
}
"""Values of a standard metric outside these (inclusive) bounds are physically absurd for a
community's devices (a broken sensor or a forged reading): ingest refuses them as
`implausible`. Wide on purpose: they catch nonsense, the rules engine judges anomalies."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One timestamped set of metric values from one device (CONTRACT.md telemetry)."""

    device_id: str
    kind: str
    ts: float
    metrics: Mapping[str, float]
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something a device reports once (`{root}/devices/{id}/event`): a forced door, tamper.

    `type` is as received (bounded in length by the parser); DEVICE_EVENT_TYPES are the
    ones the gateway knows by name.
    """

    device_id: str
    kind: str
    ts: float
    type: str
