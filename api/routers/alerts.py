"""Alerts of the rules engine (CONTRACT.md section 3), for facilities engineers.

`GET /api/v1/alerts?state=firing|resolved&device_id=&since=&limit=` lists them newest first
(`since`: alerts that changed at or after it, Unix seconds); `POST /api/v1/alerts/{id}/ack`
records who acknowledged an alert and when (the first acknowledgement wins; repeating it
answers the same). Each object is the MQTT alert object plus `alert_id`, `labels` and the
lifecycle times. An unknown alert id is a 404 naming it.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.auth import require_roles
from api.deps import Alerts
from api.errors import errors
from api.services import AlertItem
from gateway.store.users import Role, User

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])
Engineer = Annotated[User, Depends(require_roles(Role.ENGINEER))]
LATEST_TS = 4_102_444_800.0


class AlertOut(BaseModel):
    alert_id: str
    rule_id: str
    device_id: str
    metric: str | None
    state: Literal["firing", "resolved"]
    severity: str
    value: float | None
    started_at: float = Field(description="when the condition began (Unix seconds, event time)")
    ts: float = Field(description="time of the latest transition (event time)")
    message: str
    labels: dict[str, str]
    fired_at: float
    resolved_at: float | None
    acked_at: float | None = Field(description="wall-clock time of the acknowledgement")
    acked_by: str | None


def _out(item: AlertItem) -> AlertOut:
    return AlertOut(
        alert_id=item.alert_id, rule_id=item.rule_id, device_id=item.device_id,
        metric=item.metric, state="firing" if item.state == "firing" else "resolved",
        severity=item.severity, value=item.value, started_at=item.started_at, ts=item.ts,
        message=item.message, labels=dict(item.labels), fired_at=item.fired_at,
        resolved_at=item.resolved_at, acked_at=item.acked_at, acked_by=item.acked_by)


@router.get("", response_model=list[AlertOut], responses=errors(401, 403, 422, 503))
async def list_alerts(
    _user: Engineer,
    book: Alerts,
    state: Literal["firing", "resolved"] | None = None,
    device_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    since: Annotated[float | None, Query(ge=0, le=LATEST_TS, allow_inf_nan=False)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[AlertOut]:
    items = await run_in_threadpool(book.list_alerts, state=state, device_id=device_id,
                                    since=since, limit=limit)
    return [_out(item) for item in items]


@router.post("/{alert_id}/ack", response_model=AlertOut, responses=errors(401, 403, 404, 503))
async def ack_alert(
    user: Engineer,
    book: Alerts,
    alert_id: Annotated[str, Path(min_length=1, max_length=64)],
) -> AlertOut:
    item = await run_in_threadpool(book.ack, alert_id, user.username, time.time())
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no alert {alert_id!r}")
    return _out(item)
