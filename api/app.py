"""The FastAPI application factory.

Bad input never becomes a 500: pydantic validation gives 422, unknown things 404, wrong
roles 403; an unexpected error is logged and answered as a JSON 500 without internals.

/openapi.json tells the truth about error bodies: every 422 is declared as `InvalidOut`
(`detail` is a message or pydantic's list of problems, both of which routes answer), also on
routes that leave the 422 to FastAPI, whose default schema allows only the list. A path no
route serves is a 404 that says so (`no route GET /nosuch`).

Everything the browser loads comes from this process: the dashboard's files under
`/static` (api/static), and Swagger UI at `/docs` from the copy vendored in
api/static/swagger, so both work on a site without internet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from api import auth
from api.context import ApiContext
from api.errors import InvalidOut
from api.login import LoginGuard, LoginLimits
from api.routers import access, system

log = logging.getLogger(__name__)
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"
_OUR_422 = "#/components/schemas/InvalidOut"
STATIC_DIR = Path(__file__).with_name("static")
# Vendored, versioned libraries may be cached a day; our own files are revalidated (ETag).
_LONG_CACHED = ("vendor/", "swagger/")


class _StaticFiles(StaticFiles):
    """api/static with Cache-Control set per kind of file."""

    def file_response(self, full_path: Any, stat_result: Any, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        path = str(scope.get("path", ""))
        long = any(f"/{prefix}" in path for prefix in _LONG_CACHED)
        response.headers["Cache-Control"] = "public, max-age=86400" if long else "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _mount_static(app: FastAPI) -> None:
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="scgw API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        icon = STATIC_DIR / "favicon.ico"
        if not icon.is_file():  # the dashboard's own icon, else Swagger UI's
            return FileResponse(STATIC_DIR / "swagger" / "favicon-32x32.png",
                                media_type="image/png",
                                headers={"Cache-Control": "public, max-age=86400"})
        return FileResponse(icon, media_type="image/x-icon",
                            headers={"Cache-Control": "public, max-age=86400"})


def create_app(ctx: ApiContext, extra_routers: Iterable[APIRouter] = ()) -> FastAPI:
    app = FastAPI(
        title="scgw",
        version="1",
        description="Smart-community gateway: access, canteen, energy.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    api = ctx.config.api
    app.state.login_guard = LoginGuard(
        window_s=api.login_window_s, per_username=api.login_attempts_per_username,
        per_client=api.login_attempts_per_client, max_waiting=api.login_queue)
    ctx.metrics.counter("scgw_api_logins_total", "API logins, by result.")
    app.add_middleware(
        LoginLimits, guard=app.state.login_guard,
        client_of=lambda scope: scope["client"][0] if scope.get("client") else "unknown",
        on_refused=lambda result: ctx.metrics.inc("scgw_api_logins_total", result=result))
    for router in (auth.router, system.router, access.router, *extra_routers):
        app.include_router(router)
    _mount_static(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers a body it cannot even decode (not UTF-8, say) with a 400 that no
        # route declares; it is invalid input like any other, so it is a 422 here.
        if exc.status_code == 400:
            return JSONResponse({"detail": str(exc.detail)}, status_code=422)
        if exc.status_code in (404, 405) and exc.detail in ("Not Found", "Method Not Allowed"):
            # Starlette's own answer for a path or method no route serves: say which.
            what = "no route" if exc.status_code == 404 else "method not allowed:"
            return JSONResponse({"detail": f"{what} {request.method} {request.url.path[:200]}"},
                                status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(DataError)
    async def bad_data(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the validation let through (a NUL, an overlong id).
        log.info("database refused input on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "a value is not acceptable"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_422(get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def truthful_422(spec: dict[str, Any]) -> dict[str, Any]:
    """Every 422 declared as InvalidOut; FastAPI's list-only schemas dropped once unused."""
    replaced = False
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            invalid = operation.get("responses", {}).get("422")
            if invalid is None:
                continue
            schema = invalid.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == _FASTAPI_422:
                schema["$ref"] = _OUR_422
                replaced = True
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    if replaced and "InvalidOut" not in schemas:
        ours = InvalidOut.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(ours.pop("$defs", {}))
        schemas["InvalidOut"] = ours
    if _FASTAPI_422.rsplit("/", 1)[1] in schemas and _FASTAPI_422 not in str(spec["paths"]):
        del schemas["HTTPValidationError"]
        if "#/components/schemas/ValidationError" not in str(spec):
            schemas.pop("ValidationError", None)
    return spec
