"""The runtime's side of Modbus: the fleet from the site config, and `set` commands.

A Modbus unit has no MQTT of its own, so the gateway answers for it: a `command` with
`action: "set"` published to `{root}/devices/{unit}/command` is validated against the
profile, written, read back and answered on `{root}/devices/{unit}/command/result`.
Broker ACLs decide who may publish there.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from device_drivers import mqtt_protocol as proto
from device_drivers.modbus.errors import ModbusError, UnknownDevice, WriteRefused
from device_drivers.modbus.fleet import ModbusDeviceSpec, ModbusFleet
from device_drivers.supervision import RequestTasks, Supervisor
from device_drivers.vocabulary import Reading
from gateway.config import DeviceConfig, ModbusRtuConfig, ModbusTcpConfig, SiteConfig

log = logging.getLogger(__name__)


def device_specs(config: SiteConfig) -> list[ModbusDeviceSpec]:
    """The polled units of the site file, each with its transport's own settings.

    Every key of a unit's entry reaches the driver: a parity or timeout that is accepted
    by check-config but silently replaced by a default would poll with the wrong settings.
    """
    specs = []
    for d in config.devices:
        if isinstance(d, ModbusTcpConfig):
            specs.append(ModbusDeviceSpec(
                device_id=d.device_id, kind=d.kind, profile=d.profile, host=d.host,
                port=d.port, unit_id=d.unit_id, poll_interval_s=d.poll_interval_s,
                timeout_s=d.timeout_s, retries=d.retries,
            ))
        elif isinstance(d, ModbusRtuConfig):
            specs.append(ModbusDeviceSpec(
                device_id=d.device_id, kind=d.kind, profile=d.profile, host=None,
                port=d.port, unit_id=d.unit_id, poll_interval_s=d.poll_interval_s,
                timeout_s=d.timeout_s, retries=d.retries, baudrate=d.baudrate,
                parity=d.parity, stopbits=d.stopbits, bytesize=d.bytesize,
            ))
    return specs


@contextlib.asynccontextmanager
async def modbus_fleet(
    config: SiteConfig, on_reading: Callable[[Reading], None],
    supervisor: Supervisor | None = None,
) -> AsyncIterator[ModbusFleet]:
    async with ModbusFleet(device_specs(config), on_reading, supervisor=supervisor) as fleet:
        yield fleet


def parse_values(raw: Any) -> dict[str, float] | str:
    """`{"name": number, ...}` from a command or API body, or what is wrong with it."""
    if not isinstance(raw, dict) or not raw:
        return "values must be a non-empty object of register name -> number"
    values: dict[str, float] = {}
    for name, value in raw.items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"value of {name!r} must be a finite number"
        values[str(name)] = float(value)
    return values


async def apply_set(
    fleet: ModbusFleet, device_id: str, values: Mapping[str, float]
) -> dict[str, Any]:
    """Write and read back; the outcome as a result object (never raises ModbusError)."""
    try:
        readback = await fleet.write(device_id, values)
    except UnknownDevice:
        return {"ok": False, "error": "unknown_device", "detail": device_id}
    except WriteRefused as exc:
        return {"ok": False, "error": "refused", "detail": str(exc)}
    except ModbusError as exc:
        return {"ok": False, "error": "device_error", "detail": str(exc)}
    return {"ok": True, "values": dict(readback)}


class ModbusCommands:
    """Handles `set` commands arriving over MQTT for Modbus units."""

    def __init__(
        self,
        root: str,
        fleet: ModbusFleet,
        publish: Callable[[str, bytes], Awaitable[None]],
    ) -> None:
        self._root = root
        self._fleet = fleet
        self._publish = publish
        self._running = RequestTasks("modbus set commands", limit=1000)

    async def __aenter__(self) -> ModbusCommands:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._running.close(grace_s=0.5)

    def subscriptions(self) -> list[str]:
        return [proto.device_topic(self._root, d, "command") for d in self._fleet.device_ids]

    async def handle(self, device: DeviceConfig, payload: bytes) -> None:
        """Start the command; a slow or dead unit must not hold up the MQTT reader."""
        if not self._running.start(self._execute(device, payload), f"set-{device.device_id}"):
            log.warning("set command for %s refused: too many in flight", device.device_id)

    async def _execute(self, device: DeviceConfig, payload: bytes) -> None:
        data = proto.load_object(payload)
        result: dict[str, Any]
        command_id = None
        if isinstance(data, proto.Malformed):
            result = {"ok": False, "error": "malformed_request", "detail": data.problem}
        elif data.get("action") != "set":
            command_id = proto.read_id(data, "command_id")
            result = {"ok": False, "error": "malformed_request",
                      "detail": "a Modbus unit takes action 'set' only"}
        else:
            command_id = proto.read_id(data, "command_id")
            values = parse_values(data.get("values"))
            if isinstance(values, str):
                result = {"ok": False, "error": "malformed_request", "detail": values}
            else:
                result = await apply_set(self._fleet, device.device_id, values)
        log.info("set command for %s: %s", device.device_id,
                 "ok" if result["ok"] else result["error"])
        topic = proto.device_topic(self._root, device.device_id, "command/result")
        await self._publish(topic, proto.encode({"command_id": command_id, **result}))
