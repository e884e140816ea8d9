"""Users, passwords and resident invitations over the API.

Admins manage users and roles; staff invite imported residents; anyone changes their own
password; a resident with an invitation creates their own login (no sign-in needed, so that
route is rate-limited like sign-in, and answers 503 with Retry-After when the hashing queue
is full). Every argon2 hash or check runs on the sign-in guard's one low-priority hashing
thread (api.login), so a burst of password work queues behind it instead of taking the
cores from gates and payments.

A password change or reset, and disabling a user, end that user's sessions at once
(gateway.store.users: `session_epoch`). The site always keeps one enabled admin: demoting or
disabling the last one is a 409.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import Connection

from api.auth import Ctx, client_address, current_user, require_roles
from api.errors import errors
from api.login import BUSY, Busy, LoginGuard
from api.routers.admin_schemas import ID
from gateway.store import invitations as inv
from gateway.store import users as u
from gateway.store.directory_schema import Conflict, DirectoryError, NotFound
from gateway.store.users import PASSWORD_MAX, USERNAME_PATTERN, Role, User

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["users"])
Admin = Annotated[User, Depends(require_roles())]
Staff = Annotated[User, Depends(require_roles(Role.STAFF))]
Anyone = Annotated[User, Depends(current_user)]
UserId = Annotated[str, Path(pattern=ID, description="a user id")]
ResidentId = Annotated[str, Path(pattern=ID, description="a resident id")]
T = TypeVar("T")
_POLICY = f"at least {u.PASSWORD_MIN} characters, not the username"

# --- shapes -------------------------------------------------------------------------------


class UserOut(BaseModel):
    user_id: str
    username: str
    role: Role
    resident_id: str | None
    disabled: bool
    created_at: float


class UserIn(BaseModel):
    username: str = Field(pattern=USERNAME_PATTERN, max_length=128)
    password: str = Field(max_length=PASSWORD_MAX, description=_POLICY)
    role: Role
    resident_id: str | None = Field(default=None, pattern=ID,
                                    description="required for, and only for, residents")


class UserPatch(BaseModel):
    role: Role | None = None
    disabled: bool | None = Field(default=None, description="true ends the user's sessions")


class PasswordIn(BaseModel):
    password: str = Field(max_length=PASSWORD_MAX, description=_POLICY)


class MyPasswordIn(BaseModel):
    current_password: str = Field(max_length=PASSWORD_MAX)
    new_password: str = Field(max_length=PASSWORD_MAX, description=_POLICY)


class InvitationIn(BaseModel):
    ttl_s: int = Field(default=inv.DEFAULT_TTL_S, ge=inv.MIN_TTL_S, le=inv.MAX_TTL_S,
                       description="lifetime in seconds (default 72 h, at most 30 days)")


class InvitationOut(BaseModel):
    invitation: str = Field(description="the one-time secret for the resident; shown once")
    resident_id: str
    expires_at: float


class AcceptIn(BaseModel):
    invitation: str = Field(max_length=200)
    username: str = Field(pattern=USERNAME_PATTERN, max_length=128)
    password: str = Field(max_length=PASSWORD_MAX, description=_POLICY)


class AcceptedOut(BaseModel):
    user_id: str
    username: str
    role: Role
    resident_id: str


# --- helpers ------------------------------------------------------------------------------


def _user_out(record: u.UserRecord) -> UserOut:
    return UserOut(user_id=record.user_id, username=record.username, role=record.role,
                   resident_id=record.resident_id, disabled=record.disabled,
                   created_at=record.created_at)


async def _run(ctx: Ctx, work: Callable[[Connection], T], *, write: bool) -> T:
    """Store calls off the event loop; their refusals become 403/404/409/422."""

    def run() -> T:
        with ctx.engine.begin() if write else ctx.reader.connect() as conn:
            return work(conn)

    try:
        return await run_in_threadpool(run)
    except inv.InvitationRefused as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from None
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except DirectoryError as exc:
        raise HTTPException(422, detail=str(exc)) from None


def _policy(username: str, password: str) -> None:
    try:
        u.check_password(username, password)
    except DirectoryError as exc:
        raise HTTPException(422, detail=str(exc)) from None


def _guard(request: Request) -> LoginGuard:
    guard: LoginGuard = request.app.state.login_guard
    return guard


def _admit(request: Request, key: str) -> None:
    """Count an attempt like a sign-in (per key and per client address): 429 beyond."""
    refusal = _guard(request).admit(key, client_address(request))
    if refusal is not None:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=refusal.reason,
                            headers={"Retry-After": str(refusal.retry_after_s)})


async def _on_hasher(request: Request, work: Callable[[], T], *, bounded: bool) -> T:
    """Run argon2 work on the one hashing thread. `bounded`: take a place in its queue
    like a sign-in (503 with Retry-After when full) - for the route anyone may call; an
    admin's or a signed-in user's (rate-limited) work just queues behind."""
    hasher = _guard(request).hasher
    if not bounded:
        return await hasher.run(work)
    try:
        with hasher.place():
            return await hasher.run(work)
    except Busy as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=BUSY,
                            headers={"Retry-After": str(exc.retry_after_s)}) from None


# --- admin: users and roles ---------------------------------------------------------------


@router.get("/users", response_model=list[UserOut], responses=errors(401, 403))
async def list_users(ctx: Ctx, _: Admin) -> list[UserOut]:
    return [_user_out(r) for r in await _run(ctx, u.list_users, write=False)]


@router.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserOut,
             responses=errors(401, 403, 404, 409, 422))
async def create_user(ctx: Ctx, admin: Admin, request: Request, body: UserIn) -> UserOut:
    """404: no such resident; 409: the name is taken, or the resident moved out or already
    has a login; 422: the password policy or a resident_id where none belongs."""
    _policy(body.username, body.password)
    password_hash = await _on_hasher(request, lambda: u.hash_password(body.password),
                                     bounded=False)

    def create(conn: Connection) -> u.UserRecord:
        user = u.create_user(conn, body.username, body.password, body.role, body.resident_id,
                             password_hash=password_hash)
        return u.get_record(conn, user.user_id)

    record = await _run(ctx, create, write=True)
    log.info("user %s (%s) created by %s", record.username, record.role.value, admin.username)
    return _user_out(record)


@router.patch("/users/{user_id}", response_model=UserOut,
              responses=errors(401, 403, 404, 409, 422))
async def update_user(ctx: Ctx, admin: Admin, user_id: UserId, body: UserPatch) -> UserOut:
    """Role and enabled state; disabling ends the user's sessions. 409 for the last enabled
    admin; 422 for a resident login changing role (or another becoming one)."""
    record = await _run(ctx, lambda c: u.update_user(c, user_id, role=body.role,
                                                     disabled=body.disabled), write=True)
    log.info("user %s updated by %s: role %s, disabled %s", record.username, admin.username,
             record.role.value, record.disabled)
    return _user_out(record)


@router.post("/users/{user_id}/password", status_code=status.HTTP_204_NO_CONTENT,
             responses=errors(401, 403, 404, 422))
async def reset_password(ctx: Ctx, admin: Admin, request: Request, user_id: UserId,
                         body: PasswordIn) -> None:
    """Set a user's password; their sessions end at once."""
    record = await _run(ctx, lambda c: u.get_record(c, user_id), write=False)
    _policy(record.username, body.password)
    password_hash = await _on_hasher(request, lambda: u.hash_password(body.password),
                                     bounded=False)
    await _run(ctx, lambda c: u.set_password_hash(c, user_id, password_hash), write=True)
    log.info("password of %s reset by %s", record.username, admin.username)


# --- anyone: their own password -----------------------------------------------------------


@router.post("/me/password", status_code=status.HTTP_204_NO_CONTENT,
             responses=errors(401, 403, 422, 429))
async def change_my_password(ctx: Ctx, user: Anyone, request: Request,
                             body: MyPasswordIn) -> None:
    """Every session of the user ends, this one included: sign in again with the new
    password. A wrong current password is a 403 and counts against the sign-in limits of
    the user name and the client address (429 with Retry-After beyond them)."""
    _policy(user.username, body.new_password)
    if body.new_password == body.current_password:
        raise HTTPException(422, detail="the new password is the current one")
    _admit(request, user.username)
    record = await _run(ctx, lambda c: u.find_login(c, user.username), write=False)
    stored = None if record is None else record.password_hash

    def check_and_hash() -> str | None:
        if not u.verify_password(stored, body.current_password):
            return None
        return u.hash_password(body.new_password)

    password_hash = await _on_hasher(request, check_and_hash, bounded=False)
    if password_hash is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="the current password is wrong")
    await _run(ctx, lambda c: u.set_password_hash(c, user.user_id, password_hash), write=True)
    _guard(request).succeeded(user.username)
    log.info("user %s changed their password", user.username)


# --- invitations --------------------------------------------------------------------------


@router.post("/residents/{resident_id}/invitations", status_code=status.HTTP_201_CREATED,
             response_model=InvitationOut, responses=errors(401, 403, 404, 409, 422))
async def invite_resident(ctx: Ctx, staff: Staff, resident_id: ResidentId,
                          body: InvitationIn | None = None) -> InvitationOut:
    """A one-time invitation for the resident to create their app login. The answer is the
    only place the secret appears. 409: moved out, or the resident already has a login."""
    ttl_s = (body or InvitationIn()).ttl_s
    issued = await _run(ctx, lambda c: inv.create_invitation(
        c, resident_id, ttl_s=ttl_s, now=time.time(), created_by=staff.user_id), write=True)
    log.info("invitation %s for resident %s created by %s", issued.invitation.invitation_id,
             resident_id, staff.username)
    return InvitationOut(invitation=issued.text, resident_id=resident_id,
                         expires_at=issued.invitation.expires_at)


@router.post("/invitations/accept", status_code=status.HTTP_201_CREATED,
             response_model=AcceptedOut, responses=errors(403, 409, 422, 429, 503))
async def accept_invitation(ctx: Ctx, request: Request, body: AcceptIn) -> AcceptedOut:
    """Create the resident's login with an invitation (no sign-in needed). 403: the
    invitation is not valid, expired, used, or its resident moved out; 409: the user name
    is taken or the resident has a login already. Rate-limited like sign-in."""
    _policy(body.username, body.password)
    # Per invitation and per client address; junk counts per address only.
    key = inv.invitation_id_of(body.invitation) or f"malformed:{client_address(request)}"
    _admit(request, f"invitation:{key}")
    await _run(ctx, lambda c: inv.check_invitation(c, body.invitation, time.time()),
               write=False)
    password_hash = await _on_hasher(request, lambda: u.hash_password(body.password),
                                     bounded=True)
    user = await _run(ctx, lambda c: inv.accept_invitation(
        c, body.invitation, body.username, body.password, password_hash, time.time()),
        write=True)
    assert user.resident_id is not None  # a resident login, by construction
    log.info("invitation accepted: resident %s is user %s", user.resident_id, user.username)
    return AcceptedOut(user_id=user.user_id, username=user.username, role=user.role,
                       resident_id=user.resident_id)
