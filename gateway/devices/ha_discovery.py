"""Home Assistant MQTT discovery for a site's HVAC units, purifiers and meters.

Optional and off by default (`home_assistant: {discovery: false, prefix: homeassistant}`).
Pure functions build each entity's retained config; `publish_discovery` sends them.

Entities read what the gateway already publishes: the contract's telemetry JSON (a
device's `devices/{id}/telemetry`, or for a Modbus unit the poller's
`gateway/{site}/polled/{id}`) and a status topic for availability (`_availability_topic`).
Their commands go to `{root}/gateway/{site}/control/{device}/{register}`, a topic only the
gateway reads, to be turned into the same checked, audited register write as
`POST /devices/{id}/set` (`parse_control`, wired by the runtime when discovery is on): the
profile's limits, writability and integer checks apply. Never the device's own command
topic: Home Assistant is another client, not a trusted one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from device_drivers.modbus.profile import Profile, Register, load_profile
from device_drivers.mqtt_protocol import device_topic, gateway_status_topic, polled_topic

log = logging.getLogger(__name__)

# The profiles' `mode` register values (heat-pump-split.yaml: 0 cool, 1 heat, 2 fan only,
# 3 auto) as Home Assistant's HVAC modes; `off` is the `running` register at 0.
HVAC_MODES = {0: "cool", 1: "heat", 2: "fan_only", 3: "auto"}
# (device_class, state_class, unit) of the meter metrics Home Assistant can chart.
METER_METRICS = {
    "power_w": ("power", "measurement", "W"),
    "energy_wh": ("energy", "total_increasing", "Wh"),
    "export_energy_wh": ("energy", "total_increasing", "Wh"),
    "voltage_v": ("voltage", "measurement", "V"),
    "current_a": ("current", "measurement", "A"),
    "frequency_hz": ("frequency", "measurement", "Hz"),
}
COMPONENTS = {"hvac": "climate", "air_purifier": "fan", "meter": "sensor"}


class DeviceLike(Protocol):
    @property
    def device_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def profile(self) -> str | None: ...
    @property
    def name(self) -> str | None: ...


@dataclass(frozen=True)
class Discovery:
    topic: str
    payload: dict[str, Any]


def control_topic(root: str, site_id: str, device_id: str, register: str) -> str:
    """Where Home Assistant asks the gateway to write `register` (payload: the value)."""
    return f"{root}/gateway/{site_id}/control/{device_id}/{register}"


def control_subscription(root: str, site_id: str) -> str:
    return control_topic(root, site_id, "+", "+")


def parse_control(root: str, site_id: str, topic: str,
                  payload: bytes) -> tuple[str, dict[str, float]] | str:
    """(device id, register values) Home Assistant asked for, or what is wrong with it.

    `hvac_mode` is Home Assistant's word, not a register: "off" stops the unit, a mode
    starts it in that mode. Every other name is a register, its payload a number; whether
    the register exists, is writable and takes that value is the profile's to say.
    """
    prefix = control_topic(root, site_id, "", "")[:-1]
    device_id, _, register = topic[len(prefix):].partition("/") if topic.startswith(
        prefix) else ("", "", "")
    if not device_id or not register or "/" in register:
        return f"not a control topic: {topic[:200]!r}"
    try:
        text = payload.decode().strip()
    except UnicodeDecodeError:
        return f"{device_id}/{register}: the payload is not text"
    if register == "hvac_mode":
        if text == "off":
            return device_id, {"running": 0.0}
        modes = {name: code for code, name in HVAC_MODES.items()}
        if text not in modes:
            return f"{device_id}: unknown hvac_mode {text[:40]!r}"
        return device_id, {"running": 1.0, "mode": float(modes[text])}
    try:
        value = float(text)
    except ValueError:
        return f"{device_id}/{register}: {text[:40]!r} is not a number"
    if not math.isfinite(value):
        return f"{device_id}/{register}: {text[:40]!r} is not a finite number"
    return device_id, {register: value}


def _metric(name: str) -> str:
    """A template reading `name` from a single reading or the last of a batch."""
    return ("{% set r = value_json.readings[-1] if value_json.readings is defined "
            f"else value_json %}}{{{{ r.metrics.{name} }}}}")


def _state_topic(root: str, site_id: str, device: DeviceLike) -> str:
    if device.profile is not None:
        return polled_topic(root, site_id, device.device_id)
    return device_topic(root, device.device_id, "telemetry")


def _availability_topic(root: str, site_id: str, device: DeviceLike) -> str:
    """The device's status topic; a polled unit has none on MQTT (the poller does not
    publish one yet), so its availability is the gateway's own retained status, the same
    `{"online": ...}` payload: without the gateway nobody reads the unit."""
    if device.profile is not None:
        return gateway_status_topic(root, site_id)
    return device_topic(root, device.device_id, "status")


def _base(root: str, site_id: str, device: DeviceLike, object_id: str,
          name: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "object_id": object_id,
        "unique_id": f"scgw_{site_id}_{object_id}",
        "device": {
            "identifiers": [f"scgw_{site_id}_{device.device_id}"],
            "name": device.name or device.device_id,
            "manufacturer": "scgw",
            "model": device.profile or device.kind,
            "via_device": f"scgw_{site_id}_gateway",
        },
        "availability_topic": _availability_topic(root, site_id, device),
        "availability_template": "{{ 'online' if value_json.online else 'offline' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }


def _registers(profile: Profile) -> dict[str, Register]:
    return {r.name: r for r in profile.registers}


def climate(root: str, site_id: str, device: DeviceLike, profile: Profile) -> dict[str, Any]:
    regs, state = _registers(profile), _state_topic(root, site_id, device)
    payload = _base(root, site_id, device, device.device_id, None)
    payload.update({
        "current_temperature_topic": state,
        "current_temperature_template": _metric("temperature_c"),
        "temperature_unit": "C",
        "precision": 0.1,
        "modes": ["off", *HVAC_MODES.values()],
        "mode_state_topic": state,
        "mode_state_template": (
            "{% set r = value_json.readings[-1] if value_json.readings is defined else "
            "value_json %}{% set m = " + json.dumps({str(k): v for k, v in HVAC_MODES.items()})
            + " %}{{ m[(r.metrics.mode | int) | string] if r.metrics.running else 'off' }}"),
        "mode_command_topic": control_topic(root, site_id, device.device_id, "hvac_mode"),
    })
    setpoint = regs.get("setpoint_c")
    if setpoint is not None and setpoint.writable:
        payload.update({
            "temperature_state_topic": state,
            "temperature_state_template": _metric("setpoint_c"),
            "temperature_command_topic": control_topic(root, site_id, device.device_id,
                                                       "setpoint_c"),
            "min_temp": setpoint.min if setpoint.min is not None else 7,
            "max_temp": setpoint.max if setpoint.max is not None else 35,
            "temp_step": 0.5,
        })
    return payload


def fan(root: str, site_id: str, device: DeviceLike, profile: Profile) -> dict[str, Any]:
    regs, state = _registers(profile), _state_topic(root, site_id, device)
    payload = _base(root, site_id, device, device.device_id, None)
    payload.update({
        "state_topic": state,
        "state_value_template": (
            "{% set r = value_json.readings[-1] if value_json.readings is defined else "
            "value_json %}{{ 'ON' if r.metrics.running else 'OFF' }}"),
        "command_topic": control_topic(root, site_id, device.device_id, "running"),
        "payload_on": "1",
        "payload_off": "0",
    })
    speed = regs.get("fan_speed_pct")
    if speed is not None and speed.writable:
        payload.update({
            "percentage_state_topic": state,
            "percentage_value_template": _metric("fan_speed_pct"),
            "percentage_command_topic": control_topic(root, site_id, device.device_id,
                                                      "fan_speed_pct"),
            "speed_range_min": 1,
            "speed_range_max": 100,
        })
    return payload


def sensors(root: str, site_id: str, device: DeviceLike, profile: Profile) -> list[dict[str, Any]]:
    state, out = _state_topic(root, site_id, device), []
    for register in profile.registers:
        known = METER_METRICS.get(register.name)
        if known is None:
            continue
        device_class, state_class, unit = known
        payload = _base(root, site_id, device, f"{device.device_id}_{register.name}",
                        register.description or register.name.replace("_", " "))
        payload.update({
            "state_topic": state,
            "value_template": _metric(register.name),
            "device_class": device_class,
            "state_class": state_class,
            "unit_of_measurement": unit,
        })
        out.append(payload)
    return out


def discovery_messages(
    root: str, site_id: str, devices: Iterable[DeviceLike], prefix: str = "homeassistant",
) -> list[Discovery]:
    """Every entity's config for the site's HVAC units, purifiers and meters."""
    node = f"scgw_{site_id}"
    messages: list[Discovery] = []
    for device in devices:
        component = COMPONENTS.get(device.kind)
        if component is None or device.profile is None:
            continue  # MQTT devices of these kinds would need their metric names: skipped
        profile = load_profile(device.profile)
        if component == "climate":
            payloads = [climate(root, site_id, device, profile)]
        elif component == "fan":
            payloads = [fan(root, site_id, device, profile)]
        else:
            payloads = sensors(root, site_id, device, profile)
        messages.extend(
            Discovery(f"{prefix}/{component}/{node}/{p['object_id']}/config", p)
            for p in payloads)
    return messages


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int = ...,
                      retain: bool = ...) -> object: ...


async def publish_discovery(client: Publisher, config: Any, prefix: str = "homeassistant",
                            ) -> int:
    """Publish every config retained (Home Assistant reads them when it starts, whenever
    that is). `config` is the SiteConfig; returns how many were published."""
    messages = discovery_messages(config.mqtt.root, config.site.id, config.devices, prefix)
    for message in messages:
        await client.publish(message.topic, json.dumps(message.payload).encode(), qos=1,
                             retain=True)
    log.info("home assistant discovery: %d entities under %s/", len(messages), prefix)
    return len(messages)
