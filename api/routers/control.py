"""Facilities control of Modbus units: set power, mode, setpoint, fan speed (engineer role).

Values are checked against the unit's profile (writable, min/max) before anything is sent;
the answer carries the values read back from the unit after the write.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, Field

from api.auth import Ctx, require_roles
from gateway.devices.modbus import apply_set
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


_ERRORS = {
    "unknown_device": status.HTTP_404_NOT_FOUND,
    "refused": status.HTTP_422_UNPROCESSABLE_CONTENT,
    "device_error": status.HTTP_502_BAD_GATEWAY,
}


def _fleet(ctx: Ctx) -> Any:
    fleet = ctx.extras.get("modbus")
    if fleet is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="Modbus is not running")
    return fleet


@router.post("/{device_id}/set", response_model=SetOut)
async def set_values(ctx: Ctx, _user: Engineer, device_id: str, body: SetIn) -> SetOut:
    result = await apply_set(_fleet(ctx), device_id, body.values)
    if not result["ok"]:
        raise HTTPException(_ERRORS[result["error"]], detail=result["detail"])
    return SetOut(device_id=device_id, values=result["values"])


@router.get("/{device_id}/registers", response_model=list[RegisterOut])
async def registers(ctx: Ctx, _user: Engineer, device_id: str) -> list[RegisterOut]:
    fleet = _fleet(ctx)
    if device_id not in fleet.device_ids:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no Modbus unit {device_id!r}")
    return [
        RegisterOut(
            name=r.name, input_type=r.input_type, unit=r.unit, writable=r.writable,
            min=r.min, max=r.max,
        )
        for r in fleet.profile(device_id).registers
    ]
