"""Modbus TCP/RTU driver for HVAC, fresh-air, purifier units and energy meters.

Profiles (YAML register maps, CONTRACT.md section 5) drive the poller, the simulator and
the generated docs. See docs/modbus.md.
"""

from device_drivers.modbus.errors import (
    BadResponse,
    ExceptionResponse,
    LinkDown,
    ModbusError,
    ModbusTimeout,
    ProfileError,
    RequestError,
    UnknownDevice,
    WriteRefused,
)
from device_drivers.modbus.fleet import CycleStats, ModbusDeviceSpec, ModbusFleet
from device_drivers.modbus.health import DeviceHealth
from device_drivers.modbus.profile import (
    Profile,
    Register,
    bundled_profiles,
    load_profile,
    parse_profile,
)

__all__ = [
    "BadResponse",
    "CycleStats",
    "DeviceHealth",
    "ExceptionResponse",
    "LinkDown",
    "ModbusDeviceSpec",
    "ModbusError",
    "ModbusFleet",
    "ModbusTimeout",
    "Profile",
    "ProfileError",
    "Register",
    "RequestError",
    "UnknownDevice",
    "WriteRefused",
    "bundled_profiles",
    "load_profile",
    "parse_profile",
]
