"""Facilities control of Modbus units: set power, mode, setpoint, fan speed (engineer role).

Values are checked against the unit's profile (writable, min/max, and for an integer
register a whole number of its steps: `{"mode": 1.5}` is refused, not rounded) before
anything is sent; the answer carries the values read back from the unit after the write.
`registers` lists what may be written, so a control form offers exactly that.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field

from api.auth import Ctx, require_roles
from api.deps import DeviceId, Modbus
from api.errors import errors
from device_drivers.modbus.errors import ModbusError, UnknownDevice, WriteRefused
from gateway.store.users import Role, User

router = APIRouter(prefix="/api/v1/devices", tags=["control"])
Engineer = Annotated[User, Depends(require_roles(Role.ENGINEER))]


class SetIn(BaseModel):
    values: dict[str, float] = Field(min_length=1, max_length=32)


class SetOut(BaseModel):
    device_id: str
    values: dict[str, float]


class RegisterOut(BaseModel):
    name: str
    input_type: str  # holding | coil
    data_type: str  # int16 | uint16 | int32 | uint32 | float32 | bool
    unit: str
    writable: bool  # always true here: only writable registers are listed
    min: float | None
    max: float | None
    scale: float
    step: float | None  # the smallest change an integer register takes; None for float32
    values: list[float] | None  # every value allowed, when there are few (bool, modes)
    description: str


_FEW = 16  # a register with at most this many allowed values lists them


def _register_out(r: Any) -> RegisterOut:
    step = None if r.data_type == "float32" else abs(float(r.scale))
    values: list[float] | None = None
    if r.data_type == "bool":
        values = [0.0, 1.0]
    elif step is not None and r.min is not None and r.max is not None:
        first = r.offset + math.ceil((r.min - r.offset) / step - 1e-9) * step
        count = math.floor((r.max - first) / step + 1e-9) + 1
        if 0 < count <= _FEW:
            values = [round(first + i * step, 9) for i in range(count)]
    return RegisterOut(name=r.name, input_type=r.input_type, data_type=r.data_type,
                       unit=r.unit, writable=True, min=r.min, max=r.max, scale=r.scale,
                       step=step, values=values, description=r.description)


def _unknown(device_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no device {device_id!r}")


@router.post("/{device_id}/set", response_model=SetOut,
             responses=errors(401, 403, 404, 422, 502, 503))
async def set_values(ctx: Ctx, _user: Engineer, fleet: Modbus, device_id: DeviceId,
                     body: SetIn) -> SetOut:
    """Write registers of a Modbus unit; 422 names each refused register and why."""
    if device_id not in fleet.device_ids:
        if ctx.config.device(device_id) is None:
            raise _unknown(device_id)
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"{device_id!r} is not a Modbus unit: nothing to set")
    try:
        readback = await fleet.write(device_id, body.values)
    except UnknownDevice:
        raise _unknown(device_id) from None
    except WriteRefused as exc:  # nothing was sent: the profile forbids these values
        raise HTTPException(422, detail=str(exc)) from None
    except ModbusError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(exc)) from None
    return SetOut(device_id=device_id, values=dict(readback))


@router.get("/{device_id}/registers", response_model=list[RegisterOut],
            responses=errors(401, 403, 404, 422, 503))
async def registers(ctx: Ctx, _user: Engineer, fleet: Modbus, device_id: DeviceId
                    ) -> list[RegisterOut]:
    """The registers that may be written, with their limits; empty for a device with none
    (a meter, or a device that is not a Modbus unit)."""
    if device_id not in fleet.device_ids:
        if ctx.config.device(device_id) is None:
            raise _unknown(device_id)
        return []
    return [_register_out(r) for r in fleet.profile(device_id).registers if r.writable]
