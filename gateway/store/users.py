"""API users: login names, argon2 password hashes and roles.

Residents' users point at their resident record; staff, engineers and admins do not. A user
may sign in and keep a session only while it is enabled and, for a resident, while that
resident has not moved out: `find_login` and `get_user` both read the resident's state with
the user in one indexed query, so the API can check it on every request.

Sessions also end when the password changes or the user is disabled through `update_user`:
both bump `session_epoch`, which tokens carry (claim `sv`), and `get_user` refuses a token
of an older epoch. So a stolen token dies with the password reset, and re-enabling a user
does not bring its old tokens back.

Hashing is split from the lookup (`find_login`, then `verify_password`; `hash_password`,
then `create_user(password_hash=...)` or `set_password_hash`) so the API can run the
lookups on its ordinary worker threads and the 64 MiB argon2 work on its one bounded,
low-priority hashing thread.
"""

from __future__ import annotations

import functools
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    Select,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from gateway.store.directory_schema import Conflict, DirectoryError, NotFound, residents
from gateway.store.metadata import metadata


class Role(StrEnum):
    RESIDENT = "resident"
    STAFF = "staff"
    ENGINEER = "engineer"
    ADMIN = "admin"


users = Table(
    "users",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("password_hash", String(256), nullable=False),
    Column("role", String(16), nullable=False),
    Column("resident_id", String(64), nullable=True, index=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    # Bumped by a password change or reset and by disabling: older tokens stop working.
    Column("session_epoch", Integer, nullable=False, default=0, server_default="0"),
)

PASSWORD_MIN = 10
PASSWORD_MAX = 1024  # the sign-in form refuses longer ones
# Letters, digits and . _ @ + - (an e-mail address fits); no ':' so rate-limit keys of
# other kinds ("invitation:...") never collide with a user name.
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"
_USERNAME = re.compile(USERNAME_PATTERN)

# argon2id, 64 MiB, 3 passes, 4 lanes (argon2-cffi's defaults, RFC 9106's second choice).
_hasher = PasswordHasher()


class PasswordRejected(DirectoryError):
    """A password the policy refuses; the message says why."""


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so login timing stays uniform.
    Made on first use: importing the store should not cost a 64 MiB hash."""
    return _hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str
    role: Role
    resident_id: str | None
    session_epoch: int = 0


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as the admin sees it (never the hash)."""

    user_id: str
    username: str
    role: Role
    resident_id: str | None
    disabled: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """What a sign-in needs: the user, the stored hash and whether the user may sign in."""

    user: User
    password_hash: str
    active: bool  # enabled, and (for a resident) the resident has not moved out


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise DirectoryError(f"role must be one of {', '.join(Role)}, got {role!r}") from None


def check_username(username: str) -> str:
    if not _USERNAME.fullmatch(username):
        raise DirectoryError(
            "username must be 1-128 letters, digits or . _ @ + - and start with a letter or "
            f"digit, got {username[:140]!r}")
    return username


def check_password(username: str, password: str) -> None:
    """The password policy: long enough, not absurdly long, not the user name."""
    if len(password) < PASSWORD_MIN:
        raise PasswordRejected(f"password must have at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise PasswordRejected(f"password must have at most {PASSWORD_MAX} characters")
    if password.casefold() == username.casefold():
        raise PasswordRejected("password must not be the username")


def hash_password(password: str) -> str:
    """argon2id (CPU and 64 MiB for ~0.15 s): the API runs this on its hashing thread."""
    return _hasher.hash(password)


def require_loginless_resident(conn: Connection, resident_id: str) -> None:
    """A resident login needs a resident who exists, lives here and has no login yet."""
    row = conn.execute(select(residents.c.moved_out_at).where(
        residents.c.resident_id == resident_id)).first()
    if row is None:
        raise NotFound(f"resident {resident_id!r} does not exist")
    if row.moved_out_at is not None:
        raise Conflict(f"resident {resident_id!r} has moved out")
    holder = conn.execute(select(users.c.username).where(
        users.c.resident_id == resident_id)).scalar()
    if holder is not None:
        raise Conflict(f"resident {resident_id!r} already has the login {holder!r}; "
                       "reset its password or enable it instead")


def create_user(
    conn: Connection,
    username: str,
    password: str,
    role: Role,
    resident_id: str | None = None,
    *,
    password_hash: str | None = None,
) -> User:
    """A new enabled user. `password_hash`, when given, is `hash_password(password)` made
    by the caller on its own hashing thread; the policy is checked on `password` either way.
    Raises DirectoryError (bad name, role or password), NotFound (no such resident),
    Conflict (name taken, resident moved out or already with a login)."""
    check_username(username)
    check_password(username, password)
    role = parse_role(role)
    if role is Role.RESIDENT and resident_id is None:
        raise DirectoryError("a resident user needs a resident_id")
    if role is not Role.RESIDENT and resident_id is not None:
        raise DirectoryError(f"a {role.value} user has no resident_id; only residents do")
    if resident_id is not None:
        require_loginless_resident(conn, resident_id)
    taken = conn.execute(select(users.c.username).where(
        func.lower(users.c.username) == username.lower())).scalar()
    if taken is not None:
        raise Conflict(f"username {username!r} is taken" + (
            "" if taken == username else f" (as {taken!r})"))
    user = User(f"u-{secrets.token_hex(6)}", username, role, resident_id)
    try:
        with conn.begin_nested():
            conn.execute(insert(users).values(
                user_id=user.user_id,
                username=username,
                password_hash=password_hash or hash_password(password),
                role=role.value,
                resident_id=resident_id,
                disabled=False,
                created_at=time.time(),
                session_epoch=0,
            ))
    except IntegrityError:  # another request took the name between the check and here
        raise Conflict(f"username {username!r} is taken") from None
    return user


def _record(row: Any) -> UserRecord:
    return UserRecord(row.user_id, row.username, Role(row.role), row.resident_id,
                      bool(row.disabled), row.created_at)


_LISTED = (users.c.user_id, users.c.username, users.c.role, users.c.resident_id,
           users.c.disabled, users.c.created_at)


def list_users(conn: Connection) -> list[UserRecord]:
    return [_record(r) for r in conn.execute(select(*_LISTED).order_by(users.c.username))]


def get_record(conn: Connection, user_id: str) -> UserRecord:
    row = conn.execute(select(*_LISTED).where(users.c.user_id == user_id)).first()
    if row is None:
        raise NotFound(f"user {user_id!r} does not exist")
    return _record(row)


def find_user(conn: Connection, username: str) -> UserRecord:
    """By login name (exactly as typed at sign-in); NotFound names it."""
    row = conn.execute(select(*_LISTED).where(users.c.username == username)).first()
    if row is None:
        raise NotFound(f"user {username!r} does not exist")
    return _record(row)


def _keep_an_admin(conn: Connection, user: UserRecord) -> None:
    """Refuse to leave the site without an enabled admin (nobody could manage users).
    The enabled admins' rows are locked first (PostgreSQL), so two admins disabling each
    other at once cannot both pass; SQLite's transactions hold the write lock already."""
    admins = conn.execute(select(users.c.user_id).where(
        users.c.role == Role.ADMIN.value, users.c.disabled.is_(False)).with_for_update()
    ).scalars().all()
    if list(admins) == [user.user_id]:
        raise Conflict(f"{user.username!r} is the last enabled admin; make another admin "
                       "first")


def update_user(conn: Connection, user_id: str, *, role: Role | None = None,
                disabled: bool | None = None) -> UserRecord:
    """Change a user's role or enabled state. Disabling ends its sessions for good (they do
    not come back when it is enabled again); a resident login keeps the resident role."""
    user = get_record(conn, user_id)
    role = None if role is None else parse_role(role)
    if role is not None and role != user.role and Role.RESIDENT in (role, user.role):
        raise DirectoryError("a resident login cannot change role, nor another become one; "
                             "create a new user instead")
    demoted = role is not None and role is not Role.ADMIN
    if user.role is Role.ADMIN and not user.disabled and (demoted or disabled):
        _keep_an_admin(conn, user)
    values: dict[str, Any] = {}
    if role is not None:
        values["role"] = role.value
    if disabled is not None:
        values["disabled"] = disabled
        if disabled and not user.disabled:
            values["session_epoch"] = users.c.session_epoch + 1
    if values:
        conn.execute(update(users).where(users.c.user_id == user_id).values(**values))
    return get_record(conn, user_id)


def set_password_hash(conn: Connection, user_id: str, password_hash: str) -> None:
    """Store a new password (hashed by the caller) and end every session of the user."""
    done = conn.execute(update(users).where(users.c.user_id == user_id).values(
        password_hash=password_hash, session_epoch=users.c.session_epoch + 1))
    if done.rowcount != 1:
        raise NotFound(f"user {user_id!r} does not exist")


def set_disabled(conn: Connection, user_id: str, disabled: bool = True) -> bool:
    """Disable (or enable again) a user; their sessions are refused while it is disabled,
    and come back when it is enabled (`update_user` ends them for good). False when there
    is no such user."""
    result = conn.execute(update(users).where(users.c.user_id == user_id)
                          .values(disabled=disabled))
    return result.rowcount == 1


def _with_resident() -> Select[Any]:
    return select(users, residents.c.moved_out_at).select_from(
        users.outerjoin(residents, users.c.resident_id == residents.c.resident_id))


def _user(row: Any) -> User:
    return User(row["user_id"], row["username"], Role(row["role"]), row["resident_id"],
                row["session_epoch"])


def find_login(conn: Connection, username: str) -> LoginRecord | None:
    """The user named `username` with their hash; None when there is no such user."""
    row = conn.execute(_with_resident().where(users.c.username == username)).mappings().first()
    if row is None:
        return None
    active = not row["disabled"] and not (
        row["resident_id"] is not None and row["moved_out_at"] is not None)
    return LoginRecord(_user(row), row["password_hash"], active)


def verify_password(password_hash: str | None, password: str) -> bool:
    """The argon2 check (CPU and 64 MiB for ~0.15 s); None checks against a dummy hash so
    an unknown user costs the same as a known one."""
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and (
            password_hash is not None)
    except (VerificationError, InvalidHashError):
        return False


def authenticate(conn: Connection, username: str, password: str) -> User | None:
    """Lookup and check in one call (for tools; the API splits them)."""
    record = find_login(conn, username)
    ok = verify_password(None if record is None else record.password_hash, password)
    if not ok or record is None or not record.active:
        return None
    return record.user


def get_user(conn: Connection, user_id: str, session_epoch: object = None) -> User | None:
    """The user behind a session, or None when it no longer may act: unknown, disabled,
    a resident who has moved out, or (when the token's `session_epoch` is given) a session
    begun before the password changed or the user was disabled."""
    row = conn.execute(_with_resident().where(users.c.user_id == user_id)).mappings().first()
    if row is None or row["disabled"]:
        return None
    if row["resident_id"] is not None and row["moved_out_at"] is not None:
        return None
    if session_epoch is not None and session_epoch != row["session_epoch"]:
        return None
    return _user(row)
