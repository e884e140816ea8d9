"""Resident invitations: how an imported resident gets an app login.

Staff create a one-time invitation for a resident who lives here and has no login yet and
hand its text over (printed, by message). The resident's app sends it back with a user name
and a password of their choosing; that creates their resident login and spends the
invitation.

The invitation text is `{invitation_id}.{secret}`; only SHA-256 of the secret is stored (the
secret is 192 random bits, so a fast hash is enough, and the API rate-limits guesses), and it
is compared in constant time. An invitation works once, until it expires, and never for a
resident who has moved out since.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    String,
    Table,
    insert,
    select,
    update,
)

from gateway.store.directory_schema import DirectoryError, residents
from gateway.store.metadata import metadata
from gateway.store.users import Role, User, create_user, require_loginless_resident

user_invitations = Table(
    "user_invitations",
    metadata,
    Column("invitation_id", String(32), primary_key=True),
    Column("resident_id", String(64), ForeignKey("residents.resident_id"), nullable=False,
           index=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(64), nullable=True),  # the staff user
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
    Column("used_by", String(64), nullable=True),  # the user it created
)

DEFAULT_TTL_S = 72 * 3600
MAX_TTL_S = 30 * 24 * 3600
MIN_TTL_S = 60
_TEXT = re.compile(r"^([0-9a-f]{16})\.([A-Za-z0-9_-]{32})$")
_DUMMY_DIGEST = "0" * 64


class InvitationRefused(DirectoryError):
    """Not a usable invitation: unknown, wrong secret, expired, used, or the resident
    moved out. The message is safe to show to whoever holds the text."""


@dataclass(frozen=True, slots=True)
class Invitation:
    invitation_id: str
    resident_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class IssuedInvitation:
    invitation: Invitation
    text: str  # shown once; never stored


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_invitation(conn: Connection, resident_id: str, *, ttl_s: float, now: float,
                      created_by: str | None = None) -> IssuedInvitation:
    """Raises NotFound (no such resident), Conflict (moved out, or already has a login),
    DirectoryError (a lifetime out of range)."""
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise DirectoryError(f"ttl_s must be between {MIN_TTL_S} and {MAX_TTL_S} seconds")
    require_loginless_resident(conn, resident_id)
    invitation_id, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
    invitation = Invitation(invitation_id, resident_id, now + ttl_s)
    conn.execute(insert(user_invitations).values(
        invitation_id=invitation_id, resident_id=resident_id, secret_sha256=_digest(secret),
        created_at=now, created_by=created_by, expires_at=invitation.expires_at,
        used_at=None, used_by=None))
    return IssuedInvitation(invitation, f"{invitation_id}.{secret}")


def invitation_id_of(text: str) -> str | None:
    """The public part of an invitation text (for rate limits), None if it is not one."""
    match = _TEXT.fullmatch(text)
    return None if match is None else match.group(1)


def check_invitation(conn: Connection, text: str, now: float) -> Invitation:
    """The invitation the text proves, if it may be used now; else InvitationRefused.
    Used before the password is hashed (so junk costs no argon2) and again, in the
    accepting transaction, by `accept_invitation`."""
    match = _TEXT.fullmatch(text)
    row = None if match is None else conn.execute(select(user_invitations).where(
        user_invitations.c.invitation_id == match.group(1))).first()
    stored = _DUMMY_DIGEST if row is None else row.secret_sha256
    given = _digest("" if match is None else match.group(2))
    if not hmac.compare_digest(stored, given) or row is None:
        raise InvitationRefused("the invitation is not valid")
    if row.used_at is not None:
        raise InvitationRefused("the invitation has already been used")
    if row.expires_at <= now:
        raise InvitationRefused("the invitation has expired; ask the office for a new one")
    moved_out = conn.execute(select(residents.c.moved_out_at).where(
        residents.c.resident_id == row.resident_id)).scalar()
    if moved_out is not None:
        raise InvitationRefused("the invitation is for a resident who has moved out")
    return Invitation(row.invitation_id, row.resident_id, row.expires_at)


def accept_invitation(conn: Connection, text: str, username: str, password: str,
                      password_hash: str, now: float) -> User:
    """Spend the invitation and create the resident's login, in the caller's transaction.
    Raises InvitationRefused, or create_user's DirectoryError / Conflict (name taken)."""
    invitation = check_invitation(conn, text, now)
    spent = conn.execute(update(user_invitations).where(
        user_invitations.c.invitation_id == invitation.invitation_id,
        user_invitations.c.used_at.is_(None)).values(used_at=now))
    if spent.rowcount != 1:  # another request spent it first
        raise InvitationRefused("the invitation has already been used")
    user = create_user(conn, username, password, Role.RESIDENT, invitation.resident_id,
                       password_hash=password_hash)
    conn.execute(update(user_invitations).where(
        user_invitations.c.invitation_id == invitation.invitation_id).values(
        used_by=user.user_id))
    return user
