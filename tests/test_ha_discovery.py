"""Home Assistant MQTT discovery: payloads against HA's documented schema, templates
rendered by Jinja (HA's template engine) on the contract's telemetry, retained on a real
Mosquitto.

The models below are the keys Home Assistant documents for MQTT climate, fan and sensor
(https://www.home-assistant.io/integrations/climate.mqtt/, fan.mqtt/, sensor.mqtt/, and the
sensor device classes' units): unknown keys are errors, as a typo would be silently ignored
by HA.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import jinja2
import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.config import SiteConfig
from gateway.devices.ha_discovery import (
    control_topic,
    discovery_messages,
    parse_control,
    publish_discovery,
)
from simulators.demo.broker import Mosquitto, free_port
from simulators.modbus_units import SimulatedUnits, UnitSpec
from tests.community import running_gateway

TOPIC = r"^[^#+]+$"


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identifiers: list[str] = Field(min_length=1)
    name: str
    manufacturer: str | None = None
    model: str | None = None
    via_device: str | None = None


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None
    object_id: str = Field(pattern=r"^[a-zA-Z0-9_-]+$")
    unique_id: str = Field(min_length=1)
    device: Device
    availability_topic: str = Field(pattern=TOPIC)
    availability_template: str
    payload_available: str
    payload_not_available: str


class Climate(Entity):
    current_temperature_topic: str = Field(pattern=TOPIC)
    current_temperature_template: str
    temperature_unit: Literal["C", "F"]
    precision: float
    modes: list[Literal["auto", "off", "cool", "heat", "dry", "fan_only"]]
    mode_state_topic: str = Field(pattern=TOPIC)
    mode_state_template: str
    mode_command_topic: str = Field(pattern=TOPIC)
    temperature_state_topic: str | None = Field(default=None, pattern=TOPIC)
    temperature_state_template: str | None = None
    temperature_command_topic: str | None = Field(default=None, pattern=TOPIC)
    min_temp: float | None = None
    max_temp: float | None = None
    temp_step: float | None = None


class Fan(Entity):
    command_topic: str = Field(pattern=TOPIC)  # required by HA
    state_topic: str | None = Field(default=None, pattern=TOPIC)
    state_value_template: str | None = None
    payload_on: str = "ON"
    payload_off: str = "OFF"
    percentage_state_topic: str | None = Field(default=None, pattern=TOPIC)
    percentage_value_template: str | None = None
    percentage_command_topic: str | None = Field(default=None, pattern=TOPIC)
    speed_range_min: int = Field(default=1, ge=1)
    speed_range_max: int = Field(default=100, ge=1)


# HA's sensor device classes and the units each accepts, and the state classes that make
# sense for them (energy is a counter: total or total_increasing, never measurement).
UNITS = {"power": {"W", "kW", "MW"}, "energy": {"Wh", "kWh", "MWh", "MJ", "GJ"},
         "voltage": {"V", "mV"}, "current": {"A", "mA"}, "frequency": {"Hz", "kHz"}}
STATE_CLASSES = {"energy": {"total", "total_increasing"}}


class Sensor(Entity):
    state_topic: str = Field(pattern=TOPIC)  # required by HA
    value_template: str
    device_class: Literal["power", "energy", "voltage", "current", "frequency"]
    state_class: Literal["measurement", "total", "total_increasing"]
    unit_of_measurement: str

    @model_validator(mode="after")
    def _combination(self) -> Sensor:
        assert self.unit_of_measurement in UNITS[self.device_class], self
        allowed = STATE_CLASSES.get(self.device_class, {"measurement"})
        assert self.state_class in allowed, self
        return self


MODELS: dict[str, type[Entity]] = {"climate": Climate, "fan": Fan, "sensor": Sensor}


def _site(url: str = "mqtt://127.0.0.1:1883", root: str = "scgw") -> SiteConfig:
    units = [("hvac-1", "hvac", "heat-pump-split"), ("purifier-1", "air_purifier", "air-purifier"),
             ("meter-1", "meter", "eastron-sdm630"), ("erv-1", "fresh_air", "fresh-air-erv")]
    return SiteConfig.model_validate({
        "site": {"id": "north"},
        "mqtt": {"url": url, "root": root},
        "database": {"url": "sqlite:///unused.db"},
        "api": {"port": 0, "jwt_secret": secrets.token_hex(32)},
        "buildings": [{"id": "b1", "floors": [{"number": 1}]}],
        "devices": [
            {"device_id": "gate-1", "kind": "gate"},
            *({"device_id": d, "kind": k, "host": "127.0.0.1", "port": 1502 + n, "unit_id": 1,
               "profile": p} for n, (d, k, p) in enumerate(units)),
        ],
    })


def _render(template: str, payload: dict[str, Any]) -> str:
    return jinja2.Environment(autoescape=False).from_string(template).render(
        value_json=payload, value=json.dumps(payload)).strip()


def test_every_payload_matches_home_assistants_schema() -> None:
    messages = discovery_messages("scgw", "north", _site().devices)
    components = {m.topic.split("/")[1] for m in messages}
    assert components == {"climate", "fan", "sensor"}  # fresh-air units and gates: none
    for message in messages:
        prefix, component, node, object_id, config = message.topic.split("/")
        assert (prefix, node, config) == ("homeassistant", "scgw_north", "config")
        entity = MODELS[component].model_validate(message.payload)
        assert entity.object_id == object_id
        # Modbus units have no status topic of their own: the gateway's (see the module)
        assert entity.availability_topic == "scgw/gateway/north/status"
        for key, value in message.payload.items():
            if key.endswith("command_topic"):  # through the gateway, never to the device
                assert value.startswith("scgw/gateway/north/control/"), (key, value)
    unique_ids = [m.payload["unique_id"] for m in messages]
    assert len(set(unique_ids)) == len(unique_ids)
    climate = next(m.payload for m in messages if m.topic.split("/")[1] == "climate")
    assert climate["precision"] in (0.1, 0.5, 1.0)  # HA accepts these three only
    meter = {m.payload["object_id"]: m.payload for m in messages if "meter-1" in m.topic}
    assert meter["meter-1_power_w"]["device_class"] == "power"
    assert meter["meter-1_energy_wh"]["state_class"] == "total_increasing"


def test_templates_read_the_contracts_telemetry() -> None:
    """Rendered with Jinja, as HA renders them, on a single reading and on a batch."""
    by_id = {m.payload["object_id"]: m.payload for m in
             discovery_messages("scgw", "north", _site().devices)}
    metrics: dict[str, Any] = {"running": 1, "mode": 1, "setpoint_c": 21.5,
                               "temperature_c": 19.8}
    hvac = {"ts": 1.0, "seq": 1, "metrics": metrics}
    climate = by_id["hvac-1"]
    assert _render(climate["current_temperature_template"], hvac) == "19.8"
    assert _render(climate["temperature_state_template"], hvac) == "21.5"
    assert _render(climate["mode_state_template"], hvac) == "heat"
    stopped = {"readings": [hvac, {**hvac, "metrics": {**metrics, "running": 0}}]}
    assert _render(climate["mode_state_template"], stopped) == "off"
    purifier = by_id["purifier-1"]
    reading = {"ts": 1.0, "seq": 2, "metrics": {"running": 1, "fan_speed_pct": 40}}
    assert _render(purifier["state_value_template"], reading) == "ON"
    assert _render(purifier["percentage_value_template"], reading) == "40"
    meter = {"ts": 1.0, "seq": 3, "metrics": {"power_w": 1234.5, "energy_wh": 100234.0}}
    assert _render(by_id["meter-1_power_w"]["value_template"], meter) == "1234.5"
    assert _render(by_id["meter-1_energy_wh"]["value_template"], meter) == "100234.0"
    assert _render(climate["availability_template"], {"online": False}) == "offline"


async def test_discovery_is_retained_on_the_broker(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = f"ha{secrets.token_hex(4)}"  # the session's broker is shared: own prefix
    config = _site(mosquitto.url)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as gateway:
        published = await publish_discovery(gateway, config, prefix)
    expected = {m.topic.replace("homeassistant/", f"{prefix}/", 1): m.payload
                for m in discovery_messages("scgw", "north", config.devices, prefix)}
    assert published == len(expected) > 0
    seen: dict[str, Any] = {}
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as home_assistant:
        await home_assistant.subscribe(f"{prefix}/#", qos=1)
        async with asyncio.timeout(30):
            async for message in home_assistant.messages:
                assert message.retain  # HA started later still gets them
                assert isinstance(message.payload, bytes)
                seen[str(message.topic)] = json.loads(message.payload)
                if len(seen) == len(expected):
                    break
    assert seen == expected
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as cleanup:
        for topic in expected:
            await cleanup.publish(topic, b"", retain=True)


@pytest.mark.parametrize("kind", ["gate", "fresh_air"])
def test_devices_home_assistant_does_not_model_get_no_entity(kind: str) -> None:
    devices = [d for d in _site().devices if d.kind == kind]
    assert devices and discovery_messages("scgw", "north", devices) == []


def test_control_messages_become_register_values_or_a_reason() -> None:
    root, site = "r", "s"
    topic = lambda device, register: control_topic(root, site, device, register)  # noqa: E731
    assert parse_control(root, site, topic("hvac-1", "hvac_mode"), b"off") == (
        "hvac-1", {"running": 0.0})
    assert parse_control(root, site, topic("hvac-1", "hvac_mode"), b"heat") == (
        "hvac-1", {"running": 1.0, "mode": 1.0})
    assert parse_control(root, site, topic("erv-1", "fan_speed_pct"), b" 55 ") == (
        "erv-1", {"fan_speed_pct": 55.0})
    for register, payload in [("hvac_mode", b"turbo"), ("fan_speed_pct", b"fast"),
                              ("fan_speed_pct", b"nan"), ("fan_speed_pct", b"\xff")]:
        refused = parse_control(root, site, topic("erv-1", register), payload)
        assert isinstance(refused, str) and "erv-1" in refused, refused
    assert isinstance(parse_control(root, site, "r/devices/erv-1/command", b"1"), str)


async def test_home_assistant_controls_a_unit_through_the_gateways_checks(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A value Home Assistant publishes is written through the profile (in range: done;
    out of range: refused and the unit untouched), answered on the unit's command/result."""
    port = free_port()
    unit = {"device_id": "erv-1", "kind": "fresh_air", "host": "127.0.0.1", "port": port,
            "unit_id": 1, "profile": "fresh-air-erv", "poll_interval_s": 0.2}
    async with (
        SimulatedUnits([UnitSpec("fresh-air-erv", port)]) as sim,
        running_gateway(mosquitto, tmp_path, extra_devices=[unit],
                        site_extra={"home_assistant": {"discovery": True}}) as run,
        aiomqtt.Client(mosquitto.host, mosquitto.port) as ha,
    ):
        await ha.subscribe(f"{run.root}/devices/erv-1/command/result", qos=1)
        site = run.gateway.config.site.id
        results = []
        for value in (b"40", b"150"):
            await ha.publish(control_topic(run.root, site, "erv-1", "fan_speed_pct"), value,
                             qos=1)
            async with asyncio.timeout(10):
                async for message in ha.messages:
                    assert isinstance(message.payload, bytes)
                    results.append(json.loads(message.payload))
                    break
        assert results[0]["ok"] is True and results[0]["values"]["fan_speed_pct"] == 40
        assert results[1]["ok"] is False
        assert sim.unit(port).values()["fan_speed_pct"] == 40
