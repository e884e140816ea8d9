"""`GET /api/v1/access/log`: the access decisions of the audit log, for property staff.

Read from the hash-chained audit table (gateway.access.audit) through the read engine, so
a long query never holds the write lock that decisions need. Staff actions recorded in the
same table (card enrolment, with an `actor`) are not access decisions and are left out.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy import select

from api.auth import Ctx, require_roles
from api.errors import errors
from device_drivers.vocabulary import DEVICE_ID_PATTERN
from gateway.access.audit import audit_log
from gateway.store.users import Role, User

router = APIRouter(prefix="/api/v1/access", tags=["access"])
Staff = Annotated[User, Depends(require_roles(Role.STAFF))]
MAX_LIMIT = 1000


class AccessLogItem(BaseModel):
    ts: float
    device_id: str
    device_kind: str
    method: str | None  # qr, ble, card, remote, visitor
    granted: bool
    reason: str | None
    resident_id: str | None  # for a visitor pass: the resident who issued it
    floor: int | None  # the floor enabled, when exactly one was
    floors: list[int] | None  # every floor enabled (elevators)
    action: str
    request_id: str | None
    visitor_pass_id: str | None


def parse_time(text: str | None, name: str) -> float | None:
    """Epoch seconds, or ISO 8601 (without a zone: UTC)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"{name}: {text[:40]!r} is neither epoch seconds nor ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        value = moment.timestamp()
    if not math.isfinite(value):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            detail=f"{name} must be a finite time")
    return value


def _method(credential_type: str | None, visitor_pass_id: str | None) -> str | None:
    if visitor_pass_id is not None:
        return "visitor"
    return "remote" if credential_type == "app" else credential_type


TimeQuery = Query(max_length=40, description="epoch seconds or ISO 8601 (no zone: UTC)")


@router.get("/log", response_model=list[AccessLogItem], responses=errors(401, 403, 422))
async def access_log(
    ctx: Ctx,
    _user: Staff,
    device_id: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    resident_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    granted: bool | None = None,
    since: Annotated[str | None, TimeQuery] = None,
    until: Annotated[str | None, TimeQuery] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[AccessLogItem]:
    """Access decisions, newest first (gates, elevators, canteen readers, remote opens)."""
    start, end = parse_time(since, "since"), parse_time(until, "until")
    t = audit_log.c
    query = select(t.ts, t.device_id, t.device_kind, t.credential_type, t.granted, t.reason,
                   t.resident_id, t.floors, t.action, t.request_id, t.visitor_pass_id
                   ).where(t.actor.is_(None))
    if device_id is not None:
        query = query.where(t.device_id == device_id)
    if resident_id is not None:
        query = query.where(t.resident_id == resident_id)
    if granted is not None:
        query = query.where(t.granted.is_(granted))
    if start is not None:
        query = query.where(t.ts >= start)
    if end is not None:
        query = query.where(t.ts <= end)
    query = query.order_by(t.ts.desc(), t.id.desc()).limit(limit)

    def load() -> list[AccessLogItem]:
        with ctx.reader.connect() as conn:
            rows = conn.execute(query).all()
        items = []
        for r in rows:
            floors = json.loads(r.floors) if r.floors else None
            items.append(AccessLogItem(
                ts=r.ts, device_id=r.device_id, device_kind=r.device_kind,
                method=_method(r.credential_type, r.visitor_pass_id), granted=r.granted,
                reason=r.reason, resident_id=r.resident_id,
                floor=floors[0] if floors is not None and len(floors) == 1 else None,
                floors=floors, action=r.action, request_id=r.request_id,
                visitor_pass_id=r.visitor_pass_id))
        return items

    return await run_in_threadpool(load)
