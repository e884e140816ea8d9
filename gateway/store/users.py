"""API users: login names, argon2 password hashes and roles.

Residents' users point at their resident record; staff, engineers and admins do not. A user
may sign in and keep a session only while it is enabled and, for a resident, while that
resident has not moved out: `find_login` and `get_user` both read the resident's state with
the user in one indexed query, so the API can check it on every request.

Hashing is split from the lookup (`find_login`, then `verify_password`) so the API can run
the lookup on its ordinary worker threads and the 64 MiB argon2 check on its one bounded,
low-priority hashing thread.
"""

from __future__ import annotations

import functools
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
    Select,
    String,
    Table,
    insert,
    select,
    update,
)

from gateway.store.directory_schema import residents
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
    Column("resident_id", String(64), nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

# argon2id, 64 MiB, 3 passes, 4 lanes (argon2-cffi's defaults, RFC 9106's second choice).
_hasher = PasswordHasher()


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


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """What a sign-in needs: the user, the stored hash and whether the user may sign in."""

    user: User
    password_hash: str
    active: bool  # enabled, and (for a resident) the resident has not moved out


def create_user(
    conn: Connection,
    username: str,
    password: str,
    role: Role,
    resident_id: str | None = None,
) -> User:
    if len(password) < 12:
        raise ValueError("password must have at least 12 characters")
    if role is Role.RESIDENT and resident_id is None:
        raise ValueError("a resident user needs a resident_id")
    user = User(f"u-{secrets.token_hex(6)}", username, role, resident_id)
    conn.execute(
        insert(users).values(
            user_id=user.user_id,
            username=username,
            password_hash=_hasher.hash(password),
            role=role.value,
            resident_id=resident_id,
            disabled=False,
            created_at=time.time(),
        )
    )
    return user


def set_disabled(conn: Connection, user_id: str, disabled: bool = True) -> bool:
    """Disable (or enable again) a user; their sessions end at their next request.
    False when there is no such user."""
    result = conn.execute(update(users).where(users.c.user_id == user_id)
                          .values(disabled=disabled))
    return result.rowcount == 1


def _with_resident() -> Select[Any]:
    return select(users, residents.c.moved_out_at).select_from(
        users.outerjoin(residents, users.c.resident_id == residents.c.resident_id))


def find_login(conn: Connection, username: str) -> LoginRecord | None:
    """The user named `username` with their hash; None when there is no such user."""
    row = conn.execute(_with_resident().where(users.c.username == username)).mappings().first()
    if row is None:
        return None
    user = User(row["user_id"], row["username"], Role(row["role"]), row["resident_id"])
    active = not row["disabled"] and not (
        row["resident_id"] is not None and row["moved_out_at"] is not None)
    return LoginRecord(user, row["password_hash"], active)


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


def get_user(conn: Connection, user_id: str) -> User | None:
    """The user behind a session, or None when it no longer may act: unknown, disabled,
    or a resident who has moved out."""
    row = conn.execute(_with_resident().where(users.c.user_id == user_id)).mappings().first()
    if row is None or row["disabled"]:
        return None
    if row["resident_id"] is not None and row["moved_out_at"] is not None:
        return None
    return User(row["user_id"], row["username"], Role(row["role"]), row["resident_id"])
