"""Health, readiness, Prometheus metrics and the device list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from api.auth import Ctx, require_roles
from gateway.store.users import Role, User

router = APIRouter(tags=["system"])


_DASHBOARD = Path(__file__).parents[1] / "static" / "dashboard.html"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The web dashboard: a static page that talks to this API with the user's token."""
    return HTMLResponse(_DASHBOARD.read_text(encoding="utf-8"))


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


class LatestOut(BaseModel):
    device_id: str
    kind: str
    ts: float
    metrics: dict[str, float]


@router.get("/api/v1/devices/{device_id}/latest", response_model=LatestOut)
async def latest_reading(
    ctx: Ctx,
    device_id: str,
    _user: Annotated[User, Depends(require_roles(Role.STAFF, Role.ENGINEER))],
) -> LatestOut:
    """The newest value of every metric the device reported (Modbus poll or MQTT telemetry)."""
    latest = ctx.extras.get("latest")
    reading = latest.get(device_id) if latest is not None else None
    if reading is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no readings from {device_id!r}")
    return LatestOut(device_id=reading.device_id, kind=reading.kind, ts=reading.ts,
                     metrics=dict(reading.metrics))
