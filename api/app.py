"""The FastAPI application factory.

Bad input never becomes a 500: pydantic validation gives 422, unknown things 404, wrong
roles 403; an unexpected error is logged and answered as a JSON 500 without internals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from api import auth
from api.context import ApiContext
from api.routers import access, system

log = logging.getLogger(__name__)


def create_app(ctx: ApiContext, extra_routers: Iterable[APIRouter] = ()) -> FastAPI:
    app = FastAPI(
        title="scgw",
        version="1",
        description="Smart-community gateway: access, canteen, energy.",
        openapi_url="/openapi.json",
        docs_url="/docs",
    )
    app.state.ctx = ctx
    ctx.metrics.counter("scgw_api_logins_total", "API logins, by result.")
    for router in (auth.router, system.router, access.router, *extra_routers):
        app.include_router(router)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app
