"""Authentication (argon2 passwords, HS256 JWTs with a fixed audience) and role checks.

Every route declares the roles it admits with `require_roles`; the user is re-read from the
store on each request (one indexed read, with the resident's state) so a disabled user or a
moved-out resident loses access at once, not when their token expires. A token is accepted
only if its lifetime (exp - iat) is within `api.token_ttl_s` and it was not issued in the
future, so even a correctly signed token minted with `exp` in 9999 is refused.

Sign-in runs behind api.login: rate limits (429 with Retry-After, mostly answered by its
middleware before FastAPI sees the request) and the one bounded, low-priority hashing thread
(503 with Retry-After when its queue is full).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from pydantic import BaseModel

from api.context import ApiContext, JwtSettings
from api.errors import errors
from api.login import ADMITTED, BUSY, Busy, LoginGuard
from gateway.store.users import LoginRecord, Role, User, find_login, get_user, verify_password

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)
router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

_UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    detail="not authenticated",
    headers={"WWW-Authenticate": "Bearer"},
)


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(context)]


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int
    role: str


def issue_token(settings: JwtSettings, user: User, now: float) -> str:
    claims = {
        "sub": user.user_id,
        "role": user.role.value,
        "aud": settings.audience,
        "iat": int(now),
        "exp": int(now) + settings.ttl_s,
        "jti": secrets.token_hex(8),
        "sv": user.session_epoch,  # gateway.store.users: a password change ends the session
    }
    return jwt.encode(claims, settings.secret, algorithm=settings.algorithm)


CLOCK_SKEW_S = 60  # a token "issued" further in the future than this is refused


def decode_token(settings: JwtSettings, token: str, now: float | None = None
                 ) -> dict[str, Any] | None:
    """The claims of a valid token, else None: signature, algorithm, audience, expiry, and a
    lifetime no longer than `settings.ttl_s` (exp - iat), issued no later than now."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.secret,
            algorithms=[settings.algorithm],
            audience=settings.audience,
            options={"require": ["exp", "sub", "aud", "iat"]},
        )
    except jwt.PyJWTError:
        return None
    iat, exp = claims["iat"], claims["exp"]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp)):
        return None
    now = time.time() if now is None else now
    if exp - iat > settings.ttl_s or iat > now + CLOCK_SKEW_S:
        return None
    return claims


def client_address(request: Request) -> str:
    """The peer's address (uvicorn puts a trusted proxy's X-Forwarded-For client here)."""
    return request.client.host if request.client is not None else "unknown"


def _retry_later(code: int, detail: str, retry_after_s: int) -> HTTPException:
    return HTTPException(code, detail=detail, headers={"Retry-After": str(retry_after_s)})


@router.post("/token", response_model=TokenResponse, responses=errors(401, 422, 429, 503))
async def login(
    request: Request, ctx: Ctx, form: Annotated[OAuth2PasswordRequestForm, Depends()]
) -> TokenResponse:
    """Sign in. 429 beyond the attempts allowed per user name or per client address in the
    window (`api.login_*`), 503 when too many sign-ins wait for the password check; both
    with Retry-After (seconds)."""
    if "\x00" in form.username or len(form.username) > 128 or len(form.password) > 1024:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail="bad username or password"
        )
    guard: LoginGuard = request.app.state.login_guard
    counted = request.scope.get("state", {}).get(ADMITTED, False)  # by api.login.LoginLimits
    refusal = None if counted else guard.admit(form.username, client_address(request))
    if refusal is not None:
        ctx.metrics.inc("scgw_api_logins_total", result="rate_limited")
        raise _retry_later(status.HTTP_429_TOO_MANY_REQUESTS, refusal.reason,
                           refusal.retry_after_s)

    def lookup() -> LoginRecord | None:
        with ctx.reader.connect() as conn:
            return find_login(conn, form.username)

    try:
        with guard.hasher.place():
            record = await run_in_threadpool(lookup)
            stored = None if record is None else record.password_hash
            # argon2 takes ~0.15 s and 64 MiB on purpose: one at a time, at low priority.
            ok = await guard.hasher.run(lambda: verify_password(stored, form.password))
    except Busy as exc:
        ctx.metrics.inc("scgw_api_logins_total", result="busy")
        raise _retry_later(status.HTTP_503_SERVICE_UNAVAILABLE, BUSY,
                           exc.retry_after_s) from None
    if not ok or record is None or not record.active:
        ctx.metrics.inc("scgw_api_logins_total", result="refused")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="wrong username or password")
    guard.succeeded(form.username)
    ctx.metrics.inc("scgw_api_logins_total", result="ok")
    user = record.user
    token = issue_token(ctx.jwt, user, time.time())
    return TokenResponse(access_token=token, expires_in=ctx.jwt.ttl_s, role=user.role.value)


async def session_user(ctx: ApiContext, claims: dict[str, Any]) -> User | None:
    """The user behind valid claims, or None when its session has ended (disabled, moved
    out, password changed); one indexed read in a worker thread."""

    def load() -> User | None:
        with ctx.reader.connect() as conn:
            # A token from before epochs existed counts as epoch 0.
            return get_user(conn, str(claims["sub"]), claims.get("sv", 0))

    return await run_in_threadpool(load)


async def current_user(
    ctx: Ctx, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> User:
    if token is None:
        raise _UNAUTHORIZED
    claims = decode_token(ctx.jwt, token)
    if claims is None:
        raise _UNAUTHORIZED
    user = await session_user(ctx, claims)
    if user is None:
        raise _UNAUTHORIZED
    return user


@dataclass(frozen=True)
class StreamSession:
    """A signed-in user on a long-lived stream, and what to re-check it with."""

    user: User
    claims: dict[str, Any]

    @property
    def expires_at(self) -> float:
        return float(self.claims["exp"])


QUERY_TOKEN = "access_token"  # noqa: S105 - the name of the query parameter


async def stream_session(
    request: Request, ctx: Ctx, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> StreamSession:
    """For Server-Sent Events only: the token from `Authorization: Bearer`, or, because a
    browser's EventSource cannot set headers, from the `access_token` query parameter. The
    query string is never logged (uvicorn's access log is off and our logs name the path
    only); other routes accept the header alone."""
    token = token or request.query_params.get(QUERY_TOKEN)
    if not token:
        raise _UNAUTHORIZED
    claims = decode_token(ctx.jwt, token)
    if claims is None:
        raise _UNAUTHORIZED
    user = await session_user(ctx, claims)
    if user is None:
        raise _UNAUTHORIZED
    return StreamSession(user, claims)


def require_roles(*roles: Role) -> Callable[..., Any]:
    """A dependency admitting only `roles`; admin is always admitted."""
    allowed = {*roles, Role.ADMIN}

    async def dependency(user: Annotated[User, Depends(current_user)]) -> User:
        if user.role not in allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="not allowed for your role")
        return user

    return dependency


def require_resident(user: Annotated[User, Depends(current_user)]) -> User:
    """Routes about 'me' need a resident record behind the login."""
    if user.role is not Role.RESIDENT or user.resident_id is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="only residents have this")
    return user


Resident = Annotated[User, Depends(require_resident)]
