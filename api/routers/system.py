"""Health, readiness, Prometheus metrics and the device list.

/metrics names every device, reader and terminal and how busy each is: it answers a request
carrying `Authorization: Bearer <api.metrics_token>` (from SCGW__API__METRICS_TOKEN,
compared in constant time) from anywhere, and without the token only a client in
`api.metrics_networks` (default: loopback only). Anyone else gets 401.
"""

from __future__ import annotations

import hmac
import ipaddress
from functools import cache
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel

from api.auth import Ctx, client_address, require_roles
from api.deps import DeviceId, Latest
from api.errors import errors
from gateway.store.users import Role, User

router = APIRouter(tags=["system"])
StaffOrEngineer = Annotated[User, Depends(require_roles(Role.STAFF, Role.ENGINEER))]


class PrometheusText(PlainTextResponse):
    """Declares Prometheus' own content type, so /openapi.json names it too."""

    media_type = "text/plain; version=0.0.4"  # the text format generate_latest() writes


_DASHBOARD = FilePath(__file__).parents[1] / "static" / "dashboard.html"


# The page loads only its own files: no inline script, nothing from elsewhere. Inline
# styles are allowed (they run no code; the chart library sizes its canvas with them).
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The web dashboard: a static page that talks to this API with the user's token."""
    return HTMLResponse(_DASHBOARD.read_text(encoding="utf-8"), headers={
        "Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@cache
def _networks(names: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in names)


def metrics_allowed(ctx: Ctx, request: Request) -> bool:
    """The token, compared in constant time; or, without one, a client in the networks."""
    expected = ctx.config.api.metrics_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if expected is not None and scheme.lower() == "bearer" and given:
        return hmac.compare_digest(given.strip().encode(),
                                   expected.get_secret_value().encode())
    try:
        client = ipaddress.ip_address(client_address(request))
    except ValueError:
        return False
    return any(client in net for net in _networks(tuple(ctx.config.api.metrics_networks)))


_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


@router.get("/metrics", response_class=PrometheusText,
            responses={200: {"description": "Prometheus text exposition format"},
                       401: {"description": "no or wrong metrics token, from a client "
                                            "outside api.metrics_networks",
                             "content": _JSON_ERROR}})
async def metrics(ctx: Ctx, request: Request) -> PrometheusText:
    if not metrics_allowed(ctx, request):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="metrics need the token",
                            headers={"WWW-Authenticate": "Bearer"})
    return PrometheusText(ctx.metrics.render())


class DeviceOut(BaseModel):
    device_id: str
    kind: str
    name: str
    building: str | None
    online: bool  # MQTT devices: their status; polled units: the poller's health
    last_seen: float | None  # None only for a device not heard from since the start


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
                online=bool(state is not None and state.online),
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
async def latest_reading(ctx: Ctx, _user: StaffOrEngineer, latest: Latest,
                         device_id: DeviceId) -> LatestOut:
    """The newest value of every metric the device reported (Modbus poll or MQTT telemetry)."""
    if ctx.config.device(device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no device {device_id!r}")
    reading = latest.get(device_id)
    if reading is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"no readings from {device_id!r} yet")
    return LatestOut(device_id=reading.device_id, kind=reading.kind, ts=reading.ts,
                     metrics=dict(reading.metrics))
