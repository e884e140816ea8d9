"""`GET /api/v1/events`: the gateway's live events as Server-Sent Events (CONTRACT.md 3).

The hub (gateway.events) decides what each role sees and keeps every client's queue
bounded; this route only turns a subscription into a stream, replays what a reconnecting
client missed, sends keep-alives, and re-checks the session, so a resident who moves out
or a user who is disabled stops receiving within one keep-alive interval.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import StreamingResponse

from api.auth import QUERY_TOKEN, Ctx, StreamSession, session_user, stream_session
from api.context import ApiContext
from api.errors import errors
from gateway.events import EVENT_KINDS, EventHub, View

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["events"])
KEEPALIVE_S = 15.0  # a comment line this often; the session is re-checked as often
RETRY_MS = 3000  # what EventSource waits before reconnecting


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


_DESCRIPTION = f"""Live events as Server-Sent Events (`text/event-stream`).

Each event has an `id:`, an `event:` (one of {", ".join(f"`{k}`" for k in EVENT_KINDS)}) and
a `data:` line with one JSON object:
- `access`: the decision as the reader got it (`request_id`, `granted`, `action`,
  `duration_s`, `floors`, `reason`, `ts`) plus `device_id`, `device_kind`, `method`
  (`qr`, `ble`, `card`, `remote`, `visitor`) and `resident_id`;
- `payment`: the terminal's `payment/result` (`txn_id`, `approved`, `balance_cents`,
  `reason`) plus `device_id`;
- `alert`: the alert object as published on `{{root}}/alerts/...`;
- `device`: `device_id`, `kind`, `online` (true/false) and `last_seen`, when a device goes
  online or offline (Modbus-polled units included);
- `reading`: `device_id`, `kind`, `ts`, `seq`, `metrics`. Readings are thinned to at most
  one per device per second and are not replayed after a reconnect.

What a role sees is what its REST routes show it: a resident only its own access decisions
(and its visitors') and payments; staff access, payment and device events; engineers alert,
device and reading events; admins everything.

Reconnect with the `Last-Event-ID` header (EventSource does this by itself) to get what was
missed from a bounded buffer. When that cannot be known (the id is too old, or from before
a gateway restart), or when this client read too slowly and events were dropped for it, the
stream sends `event: reset`: reload the state from the REST routes. A comment line comes
every {KEEPALIVE_S:g} s. The stream ends with `event: end` when the session ends (token
expired, user disabled, resident moved out).

The token: `Authorization: Bearer ...`, or, because EventSource cannot set headers, the
query parameter `{QUERY_TOKEN}` (accepted on this route only; never logged).
"""

Session = Annotated[StreamSession, Depends(stream_session)]
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


def _control(kind: str, data: dict[str, object]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


@router.get(
    "/events",
    response_class=EventStream,
    description=_DESCRIPTION,
    responses={200: {"description": "the event stream",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}},
               # JSON errors on a stream route: named explicitly, or they would be
               # declared as text/event-stream like the stream itself.
               **{code: {"description": spec["description"], "content": _JSON_ERROR}
                  for code, spec in errors(401, 503).items()}},
    openapi_extra={"parameters": [
        {"name": QUERY_TOKEN, "in": "query", "required": False,
         "schema": {"type": "string"},
         "description": "the bearer token, for clients that cannot set headers"},
        {"name": "Last-Event-ID", "in": "header", "required": False,
         "schema": {"type": "string"},
         "description": "the id of the last event received, to replay what came after it"},
    ]},
)
async def events(request: Request, ctx: Ctx, session: Session) -> EventStream:
    hub = ctx.events
    if hub is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            detail="live events are not running")
    user = session.user
    view = View.of(user.role.value, user.resident_id)
    last_id = request.headers.get("last-event-id")
    return EventStream(_stream(ctx, hub, view, session, last_id),
                       headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _stream(ctx: ApiContext, hub: EventHub, view: View, session: StreamSession,
                  last_id: str | None) -> AsyncIterator[bytes]:
    sub = hub.subscribe(view, last_id)
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        if sub.reset:
            yield _control("reset", {"reason": "unknown_last_event_id"})
        for missed in sub.replay:
            yield missed.frame()
        check_at = time.monotonic() + KEEPALIVE_S
        while True:
            event = await sub.next(KEEPALIVE_S)
            if sub.take_lag():
                yield _control("reset", {"reason": "dropped"})
                continue
            if event is not None:
                yield event.frame()
            if event is None or time.monotonic() >= check_at:
                check_at = time.monotonic() + KEEPALIVE_S
                if not await _still_signed_in(ctx, session):
                    yield _control("end", {"reason": "session_ended"})
                    return
                if event is None:
                    yield b": keep-alive\n\n"
    finally:
        hub.unsubscribe(sub)


async def _still_signed_in(ctx: ApiContext, session: StreamSession) -> bool:
    if time.time() >= session.expires_at:
        return False
    user = await session_user(ctx, session.claims)
    return user is not None and user.role is session.user.role
