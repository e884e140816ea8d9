"""Health, readiness, Prometheus metrics and the device list."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel

from api.auth import Ctx, require_roles
from gateway.store.users import Role, User

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ctx: Ctx, response: Response) -> dict[str, Any]:
    ready = ctx.ready()
    if not ready:
        response.status_code = 503
    return {"ready": ready}


@router.get("/metrics")
async def metrics(ctx: Ctx) -> Response:
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")


class DeviceOut(BaseModel):
    device_id: str
    kind: str
    name: str
    building: str | None
    online: bool | None
    last_seen: float | None


@router.get("/api/v1/devices", response_model=list[DeviceOut])
async def list_devices(
    ctx: Ctx, _user: Annotated[User, Depends(require_roles(Role.STAFF, Role.ENGINEER))]
) -> list[DeviceOut]:
    out = []
    for device in ctx.config.devices:
        state = ctx.device_state.get(device.device_id)
        out.append(
            DeviceOut(
                device_id=device.device_id,
                kind=device.kind,
                name=device.name,
                building=device.building,
                online=getattr(state, "online", None),
                last_seen=getattr(state, "last_seen", None),
            )
        )
    return out
