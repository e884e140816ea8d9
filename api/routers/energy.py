"""Energy time series from the local store (CONTRACT.md section 3), for facilities engineers.

`GET /api/v1/energy/series?device_id=&metric=&start=&end=&step=` answers from the 1-minute
rollups the telemetry worker keeps for `telemetry.local_retention_days`, so the built-in
dashboard works without InfluxDB. `device_id` is a device id or a sum: `building:{id}`,
`kind:{kind}` or `site:{site id}` (every device of the site); the sum rules are documented
in gateway/telemetry/series.py: per step, each device's min, max, mean and last, then added.

Community power in one request each:
- now: `?device_id=kind:meter&metric=power_w&start={now - 60}` (the current minute's point;
  its `last` is the sum of every meter's latest power in it);
- over a day: `?device_id=kind:meter&metric=power_w` (defaults: the last 24 h, 1-minute steps).

Defaults: `end` = now, `start` = `end` - 24 h, `step` = the smallest multiple of 60 s giving at
most 1,440 points. Bad input is a 4xx, never a 500: an unknown device, building, kind or site
is a 404 naming it; start >= end, a step that is not a positive multiple of 60, or more than
10,000 points is a 422.
"""

from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.auth import require_roles
from api.deps import Energy
from api.errors import errors
from api.services import SeriesAnswer
from gateway.store.users import Role, User

router = APIRouter(prefix="/api/v1/energy", tags=["energy"])
Engineer = Annotated[User, Depends(require_roles(Role.ENGINEER))]
UNPROCESSABLE = 422  # Starlette renamed the constant; the number is what clients see
DEFAULT_SPAN_S = 86_400.0
DEFAULT_MAX_POINTS = 1_440
MINUTE = 60
LATEST_TS = 4_102_444_800.0  # 2100-01-01: far beyond any reading, well inside every type


class PointOut(BaseModel):
    ts: float = Field(description="start of the step (a multiple of `step`), Unix seconds")
    min: float
    max: float
    mean: float
    last: float = Field(description="the value with the greatest timestamp in the step")
    count: int = Field(description="readings in the step (over all devices of a sum)")


class SeriesOut(BaseModel):
    device_id: str
    metric: str
    unit: str = Field(description="from the standard metric names; empty when not standard")
    step: int
    points: list[PointOut]


def default_step(start: float, end: float) -> int:
    """The smallest multiple of 60 s that keeps a range within DEFAULT_MAX_POINTS steps."""
    return MINUTE * max(1, math.ceil((end - start) / MINUTE / DEFAULT_MAX_POINTS))


def _to_out(device_id: str, metric: str, step: int, answer: SeriesAnswer) -> SeriesOut:
    return SeriesOut(
        device_id=device_id, metric=metric, unit=answer.unit, step=step,
        points=[PointOut(ts=p.ts, min=p.min, max=p.max, mean=p.mean, last=p.last,
                         count=p.count) for p in answer.points],
    )


@router.get("/series", response_model=SeriesOut, responses=errors(401, 403, 404, 422, 503))
async def energy_series(
    _user: Engineer,
    energy: Energy,
    device_id: Annotated[str, Query(
        min_length=1, max_length=200,
        description="a device id, or building:{id}, kind:{kind}, site:{site id} for a sum")],
    metric: Annotated[str, Query(min_length=1, max_length=128, examples=["power_w"])],
    start: Annotated[float | None, Query(
        ge=0, le=LATEST_TS, allow_inf_nan=False,
        description="Unix seconds; default end - 24 h")] = None,
    end: Annotated[float | None, Query(
        ge=0, le=LATEST_TS, allow_inf_nan=False, description="Unix seconds; default now")
    ] = None,
    step: Annotated[int | None, Query(
        ge=MINUTE, le=366 * 86_400, multiple_of=MINUTE,
        description="seconds, a multiple of 60; default: at most 1,440 points")] = None,
) -> SeriesOut:
    if end is None:
        end = time.time()
    if start is None:
        start = end - DEFAULT_SPAN_S
    if start >= end:
        raise HTTPException(UNPROCESSABLE, detail="start must be before end")
    chosen = step if step is not None else default_step(start, end)
    try:
        answer = await run_in_threadpool(
            energy.series, device_id=device_id, metric=metric, start=start, end=end,
            step=chosen)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    except ValueError as exc:
        raise HTTPException(UNPROCESSABLE, detail=str(exc)) from None
    return _to_out(device_id, metric, chosen, answer)
