"""Facilities control of Modbus units: set power, mode, setpoint, fan speed (engineer role).

Values are checked against the unit's profile (writable, min/max) before anything is sent;
the answer carries the values read back from the unit after the write.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field

from api.auth import require_roles
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
    input_type: str
    unit: str
    writable: bool
    min: float | None
    max: float | None


def _unknown(device_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no Modbus unit {device_id!r}")


@router.post("/{device_id}/set", response_model=SetOut,
             responses=errors(401, 403, 404, 422, 502, 503))
async def set_values(_user: Engineer, fleet: Modbus, device_id: DeviceId, body: SetIn) -> SetOut:
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
async def registers(_user: Engineer, fleet: Modbus, device_id: DeviceId) -> list[RegisterOut]:
    if device_id not in fleet.device_ids:
        raise _unknown(device_id)
    return [
        RegisterOut(
            name=r.name, input_type=r.input_type, unit=r.unit, writable=r.writable,
            min=r.min, max=r.max,
        )
        for r in fleet.profile(device_id).registers
    ]
