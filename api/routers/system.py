"""Health, readiness, Prometheus metrics and the device list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel

from api.auth import Ctx, require_roles
from api.deps import Latest
from api.errors import errors
from gateway.store.users import Role, User

router = APIRouter(tags=["system"])
StaffOrEngineer = Annotated[User, Depends(require_roles(Role.STAFF, Role.ENGINEER))]


class PrometheusText(PlainTextResponse):
    """Declares Prometheus' own content type, so /openapi.json names it too."""

    media_type = "text/plain; version=0.0.4"  # the text format generate_latest() writes


_DASHBOARD = Path(__file__).parents[1] / "static" / "dashboard.html"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The web dashboard: a static page that talks to this API with the user's token."""
    return HTMLResponse(_DASHBOARD.read_text(encoding="utf-8"))


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    ready: bool
    problems: list[str] = []  # e.g. "influxdb: behind by 42 s (retrying) ..."


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut,
            responses={503: {"model": ReadyOut, "description": "not connected to the broker"}})
async def readyz(ctx: Ctx, response: Response) -> ReadyOut:
    problems = ctx.problems()
    ready = ctx.ready()
    if not ready:
        problems = ["mqtt: not connected to the broker", *problems]
    # A sink that is behind is degraded, not down: the spool holds its readings. A silent
    # telemetry worker or a lost broker is down.
    ready = ready and not any(p.startswith("telemetry worker") for p in problems)
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return ReadyOut(ready=ready, problems=problems)


@router.get("/metrics", response_class=PrometheusText,
            responses={200: {"description": "Prometheus text exposition format"}})
async def metrics(ctx: Ctx) -> PrometheusText:
    return PrometheusText(ctx.metrics.render())


class DeviceOut(BaseModel):
    device_id: str
    kind: str
    name: str
    building: str | None
    online: bool | None
    last_seen: float | None


@router.get("/api/v1/devices", response_model=list[DeviceOut], responses=errors(401, 403))
async def list_devices(ctx: Ctx, _user: StaffOrEngineer) -> list[DeviceOut]:
    out = []
    for device in ctx.config.devices:
        state = ctx.services.device_state.get(device.device_id)
        out.append(
            DeviceOut(
                device_id=device.device_id,
                kind=device.kind,
                name=device.name,
                building=device.building,
                online=None if state is None else state.online,
                last_seen=None if state is None else state.last_seen,
            )
        )
    return out


class LatestOut(BaseModel):
    device_id: str
    kind: str
    ts: float
    metrics: dict[str, float]


@router.get("/api/v1/devices/{device_id}/latest", response_model=LatestOut,
            responses=errors(401, 403, 404, 422, 503))
async def latest_reading(_user: StaffOrEngineer, latest: Latest, device_id: str) -> LatestOut:
    """The newest value of every metric the device reported (Modbus poll or MQTT telemetry)."""
    reading = latest.get(device_id)
    if reading is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no readings from {device_id!r}")
    return LatestOut(device_id=reading.device_id, kind=reading.kind, ts=reading.ts,
                     metrics=dict(reading.metrics))
