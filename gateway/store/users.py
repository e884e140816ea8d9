"""API users: login names, argon2 password hashes and roles.

Residents' users point at their resident record; staff, engineers and admins do not.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Boolean, Column, Connection, Float, String, Table, insert, select

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

_hasher = PasswordHasher()
# Verifying against this when the user does not exist keeps login timing uniform.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str
    role: Role
    resident_id: str | None


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


def authenticate(conn: Connection, username: str, password: str) -> User | None:
    row = conn.execute(select(users).where(users.c.username == username)).mappings().first()
    stored = row["password_hash"] if row is not None else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None or row["disabled"]:
        return None
    return User(row["user_id"], row["username"], Role(row["role"]), row["resident_id"])


def get_user(conn: Connection, user_id: str) -> User | None:
    row = conn.execute(select(users).where(users.c.user_id == user_id)).mappings().first()
    if row is None or row["disabled"]:
        return None
    return User(row["user_id"], row["username"], Role(row["role"]), row["resident_id"])
