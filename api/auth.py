"""Authentication (argon2 passwords, HS256 JWTs with a fixed audience) and role checks.

Every route declares the roles it admits with `require_roles`; the user is re-read from the
store on each request so a disabled user or a moved-out resident loses access at once, not
when their token expires.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

import jwt
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from pydantic import BaseModel

from api.context import ApiContext, JwtSettings
from api.errors import errors
from gateway.store.users import Role, User, authenticate, get_user

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
    }
    return jwt.encode(claims, settings.secret, algorithm=settings.algorithm)


def decode_token(settings: JwtSettings, token: str) -> dict[str, Any] | None:
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
    return claims


@router.post("/token", response_model=TokenResponse, responses=errors(401, 422))
async def login(
    request: Request, ctx: Ctx, form: Annotated[OAuth2PasswordRequestForm, Depends()]
) -> TokenResponse:
    if "\x00" in form.username or len(form.username) > 128 or len(form.password) > 1024:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail="bad username or password"
        )

    def check() -> User | None:
        with ctx.engine.connect() as conn:
            return authenticate(conn, form.username, form.password)

    # argon2 takes tens of milliseconds on purpose: keep it off the event loop.
    async with request.app.state.login_slots:
        user = await run_in_threadpool(check)
    if user is None:
        ctx.metrics.inc("scgw_api_logins_total", result="refused")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="wrong username or password")
    ctx.metrics.inc("scgw_api_logins_total", result="ok")
    token = issue_token(ctx.jwt, user, time.time())
    return TokenResponse(access_token=token, expires_in=ctx.jwt.ttl_s, role=user.role.value)


async def current_user(
    ctx: Ctx, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> User:
    if token is None:
        raise _UNAUTHORIZED
    claims = decode_token(ctx.jwt, token)
    if claims is None:
        raise _UNAUTHORIZED

    def load() -> User | None:
        with ctx.engine.connect() as conn:
            return get_user(conn, str(claims["sub"]))

    user = await run_in_threadpool(load)
    if user is None:
        raise _UNAUTHORIZED
    return user


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
