"""Residents' access: a QR for the phone's screen, remote gate unlock, elevator call.

Remote actions run through the same access rules as a credential at the reader, so the
API can never open what the resident's card could not.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from aiomqtt import MqttError
from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from api.auth import Ctx, Resident
from api.deps import Access, DeviceId
from api.errors import errors
from api.services import RemoteDecision
from device_drivers.mqtt_protocol import device_topic, encode

router = APIRouter(prefix="/api/v1", tags=["access"])


class AccessTokenOut(BaseModel):
    qr: str
    expires_at: float
    credential_id: str


class CommandAccepted(BaseModel):
    command_id: str
    device_id: str
    action: str
    floor: int | None = None


class CallFloorIn(BaseModel):
    floor: int = Field(ge=-20, le=300)


class PermittedDeviceOut(BaseModel):
    device_id: str
    kind: str
    floors: list[int] | None = None  # elevators: the floors a call may ask for, right now


@router.get("/me/devices", response_model=list[PermittedDeviceOut],
            responses=errors(401, 403, 503))
async def my_devices(user: Resident, access: Access) -> list[PermittedDeviceOut]:
    """The gates the resident may open and the elevators it may call now, decided by the
    same rules as a remote unlock (schedules included), so the app offers only what works."""
    assert user.resident_id is not None
    now = time.time()
    permitted = []
    for device_id, kind in sorted(access.remote_readers().items()):
        decision = access.check_remote(user.resident_id, device_id, now)
        if decision.granted:
            floors = list(decision.floors) if decision.floors is not None else None
            permitted.append(PermittedDeviceOut(device_id=device_id, kind=kind, floors=floors))
    return permitted


@router.post("/me/access-token", response_model=AccessTokenOut,
             responses=errors(401, 403, 409, 503))
async def access_token(user: Resident, access: Access) -> AccessTokenOut:
    assert user.resident_id is not None
    issued = access.issue_qr(user.resident_id, time.time())
    if issued is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="no active phone credential is enrolled for you"
        )
    return AccessTokenOut(
        qr=issued.qr, expires_at=issued.expires_at, credential_id=issued.credential_id
    )


@dataclass(frozen=True, slots=True)
class _Called:
    """An elevator call as audited: the floor actually called, or the refusal of a floor
    the resident may not reach, over the service's decision for the car."""

    decision: RemoteDecision
    granted: bool = True
    action: str = "enable_floors"
    reason: str | None = None
    floors: tuple[int, ...] | None = None

    @property
    def resident_id(self) -> str | None:
        return self.decision.resident_id

    @property
    def credential_ref(self) -> str | None:
        return self.decision.credential_ref

    @property
    def credential_type(self) -> str | None:
        return self.decision.credential_type

    @property
    def visitor_pass_id(self) -> str | None:
        return self.decision.visitor_pass_id

    @property
    def duration_s(self) -> int:
        return self.decision.duration_s


def _device(ctx: Ctx, device_id: str, kind: str) -> None:
    device = ctx.config.device(device_id)
    if device is None or device.kind != kind:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no {kind} named {device_id!r}")


async def _audit(ctx: Ctx, device_id: str, decision: RemoteDecision, command_id: str) -> None:
    """Remote opens are decisions too: they go into the same hash-chained audit log, and a
    grant is written there (or to the audit's spill file when the store is down) before
    its command is published, so no door opens that the log does not hold. A refusal
    opens nothing and is only queued."""
    audit = ctx.services.audit
    device = ctx.config.device(device_id)
    if audit is None or device is None:
        return
    if decision.granted:
        await audit.record_decision_durably(device_id, device.kind, decision, time.time(),
                                            command_id)
    else:
        audit.record_decision(device_id, device.kind, decision, time.time(), command_id)


async def _send(ctx: Ctx, device_id: str, command: dict[str, object], command_id: str) -> None:
    topic = device_topic(ctx.config.mqtt.root, device_id, "command")
    try:
        await ctx.publish(topic, encode({"command_id": command_id, **command}))
    except MqttError:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the device network is unreachable"
        ) from None


@router.post(
    "/gates/{device_id}/unlock",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CommandAccepted,
    responses=errors(401, 403, 404, 422, 503),
)
async def unlock_gate(ctx: Ctx, user: Resident, access: Access, device_id: DeviceId
                      ) -> CommandAccepted:
    _device(ctx, device_id, "gate")
    assert user.resident_id is not None
    decision = access.check_remote(user.resident_id, device_id, time.time())
    command_id = f"c-{secrets.token_hex(8)}"
    await _audit(ctx, device_id, decision, command_id)
    if not decision.granted:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=decision.reason)
    duration = decision.duration_s
    await _send(ctx, device_id, {"action": "unlock", "duration_s": duration}, command_id)
    return CommandAccepted(command_id=command_id, device_id=device_id, action="unlock")


@router.post(
    "/elevators/{device_id}/call",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CommandAccepted,
    responses=errors(401, 403, 404, 422, 503),
)
async def call_elevator(
    ctx: Ctx, user: Resident, access: Access, device_id: DeviceId, body: CallFloorIn
) -> CommandAccepted:
    _device(ctx, device_id, "elevator")
    assert user.resident_id is not None
    decision = access.check_remote(user.resident_id, device_id, time.time())
    command_id = f"c-{secrets.token_hex(8)}"
    if decision.granted and body.floor not in (decision.floors or ()):
        decision = _Called(decision, granted=False, action="none", reason="not_permitted",
                           floors=None)
    elif decision.granted:
        decision = _Called(decision, floors=(body.floor,))  # the log says which floor
    await _audit(ctx, device_id, decision, command_id)
    if not decision.granted:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=decision.reason)
    await _send(ctx, device_id, {"action": "call_floor", "floor": body.floor}, command_id)
    return CommandAccepted(
        command_id=command_id, device_id=device_id, action="call_floor", floor=body.floor
    )
