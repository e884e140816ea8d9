"""The FastAPI application factory.

Bad input never becomes a 500: pydantic validation gives 422, unknown things 404, wrong
roles 403; an unexpected error is logged and answered as a JSON 500 without internals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

from api import auth
from api.context import ApiContext
from api.routers import access, system

log = logging.getLogger(__name__)
LOGIN_CONCURRENCY = 4


def create_app(ctx: ApiContext, extra_routers: Iterable[APIRouter] = ()) -> FastAPI:
    app = FastAPI(
        title="scgw",
        version="1",
        description="Smart-community gateway: access, canteen, energy.",
        openapi_url="/openapi.json",
        docs_url="/docs",
    )
    app.state.ctx = ctx
    # argon2 costs 64 MiB and tens of ms per check: a few at a time, so a flood of logins
    # cannot exhaust memory or the thread pool every other request needs.
    app.state.login_slots = asyncio.Semaphore(LOGIN_CONCURRENCY)
    ctx.metrics.counter("scgw_api_logins_total", "API logins, by result.")
    for router in (auth.router, system.router, access.router, *extra_routers):
        app.include_router(router)

    @app.exception_handler(DataError)
    async def bad_data(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the validation let through (a NUL, an overlong id).
        log.info("database refused input on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "a value is not acceptable"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app
