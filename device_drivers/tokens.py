"""Dynamic phone credentials: the QR and BLE token format (CONTRACT.md section 2).

Pure functions only. A phone that holds its credential id and secret computes the same
tokens offline; the gateway verifies them with the same code. The byte layout is
documented with test vectors in docs/credentials.md; changing it breaks every phone app.

Layout (all integers big-endian):

    version(1) | credential_id(8) | time_step(4) | nonce(n) | tag(t)

    QR  : version 0x01, nonce 4 bytes, tag 16 bytes (128 bit), text "SC1." + base64url
    BLE : version 0x02, nonce 2 bytes, tag  8 bytes  (64 bit), 23 raw bytes that fit the
          manufacturer data of a 31-byte advertisement

    tag = HMAC-SHA256(secret, b"scgw-token" | version | credential_id | time_step | nonce)[:t]

The nonce lets one phone open several doors within one 30 s step while every single token
stays single-use; the version byte inside the MAC keeps a BLE tag from being promoted to QR.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

TIME_STEP_S = 30
MAX_SKEW_STEPS = 1
QR_PREFIX = "SC1."
BLE_COMPANY_ID = 0xFFFF  # Bluetooth SIG "reserved for testing"; vendors may configure their own.
CREDENTIAL_ID_BYTES = 8
SECRET_BYTES = 32
_DOMAIN = b"scgw-token"


class TokenKind(Enum):
    QR = 0x01
    BLE = 0x02


@dataclass(frozen=True, slots=True)
class _Layout:
    nonce_len: int
    tag_len: int

    @property
    def size(self) -> int:
        return 1 + CREDENTIAL_ID_BYTES + 4 + self.nonce_len + self.tag_len


_LAYOUT = {TokenKind.QR: _Layout(nonce_len=4, tag_len=16), TokenKind.BLE: _Layout(2, 8)}
BLE_TOKEN_BYTES = _LAYOUT[TokenKind.BLE].size


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token whose shape is right; its tag is not yet checked."""

    kind: TokenKind
    credential_id: str  # 16 lowercase hex characters
    step: int
    nonce: bytes
    tag: bytes
    signed: bytes  # the bytes the tag covers (without the domain prefix)

    @property
    def replay_key(self) -> tuple[str, int, bytes, int]:
        return (self.credential_id, self.step, self.nonce, self.kind.value)

    @property
    def spent_key(self) -> str:
        """What identifies this token for good, never the token itself (no tag):
        "qr|ble:credential:step:nonce", at most 41 characters. The gateway's durable
        spent-token record and the ledger key single use on it."""
        kind = "qr" if self.kind is TokenKind.QR else "ble"
        return f"{kind}:{self.credential_id}:{self.step}:{self.nonce.hex()}"

    @property
    def issued_at(self) -> float:
        """The start of the token's time step: it cannot pass `check` before this minus the
        allowed skew, nor after its step plus the skew."""
        return float(self.step * TIME_STEP_S)


class TokenError(Enum):
    """Why a token is refused; values are CONTRACT.md denial reasons."""

    INVALID = "invalid_token"
    EXPIRED = "expired_token"


def new_credential_id() -> str:
    return secrets.token_hex(CREDENTIAL_ID_BYTES)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def time_step(now: float) -> int:
    return int(now // TIME_STEP_S)


def _tag(secret: bytes, signed: bytes, tag_len: int) -> bytes:
    return hmac.new(secret, _DOMAIN + signed, hashlib.sha256).digest()[:tag_len]


def mint_bytes(
    kind: TokenKind, credential_id: str, secret: bytes, now: float, nonce: bytes | None = None
) -> bytes:
    layout = _LAYOUT[kind]
    cid = bytes.fromhex(credential_id)
    if len(cid) != CREDENTIAL_ID_BYTES:
        raise ValueError("credential id must be 16 hex characters")
    if nonce is None:
        nonce = secrets.token_bytes(layout.nonce_len)
    if len(nonce) != layout.nonce_len:
        raise ValueError(f"nonce must be {layout.nonce_len} bytes")
    signed = bytes([kind.value]) + cid + time_step(now).to_bytes(4, "big") + nonce
    return signed + _tag(secret, signed, layout.tag_len)


def mint_qr(credential_id: str, secret: bytes, now: float, nonce: bytes | None = None) -> str:
    raw = mint_bytes(TokenKind.QR, credential_id, secret, now, nonce)
    return QR_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def mint_ble(credential_id: str, secret: bytes, now: float, nonce: bytes | None = None) -> bytes:
    return mint_bytes(TokenKind.BLE, credential_id, secret, now, nonce)


def qr_expires_at(now: float) -> float:
    """The last instant a QR minted now is accepted (its step plus the allowed skew)."""
    return float((time_step(now) + 1 + MAX_SKEW_STEPS) * TIME_STEP_S)


def parse_bytes(raw: bytes) -> ParsedToken | None:
    if not raw:
        return None
    try:
        kind = TokenKind(raw[0])
    except ValueError:
        return None
    layout = _LAYOUT[kind]
    if len(raw) != layout.size:
        return None
    body_end = layout.size - layout.tag_len
    return ParsedToken(
        kind=kind,
        credential_id=raw[1:9].hex(),
        step=int.from_bytes(raw[9:13], "big"),
        nonce=raw[13:body_end],
        tag=raw[body_end:],
        signed=raw[:body_end],
    )


def parse_qr(text: str) -> ParsedToken | None:
    if not text.startswith(QR_PREFIX) or len(text) > 128:
        return None
    body = text[len(QR_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None
    token = parse_bytes(raw)
    return token if token is not None and token.kind is TokenKind.QR else None


def parse_ble_hex(text: str) -> ParsedToken | None:
    """BLE tokens travel over MQTT as lowercase hex of the 23 advertised bytes."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    token = parse_bytes(raw)
    return token if token is not None and token.kind is TokenKind.BLE else None


def check(token: ParsedToken, secret: bytes, now: float) -> TokenError | None:
    """Authenticate a parsed token and check its time step; None means valid.

    The tag is checked first and in constant time, so a forger learns nothing from the
    reason; only a genuine token can be reported as expired.
    """
    expected = _tag(secret, token.signed, _LAYOUT[token.kind].tag_len)
    if not hmac.compare_digest(expected, token.tag):
        return TokenError.INVALID
    current = time_step(now)
    if token.step < current - MAX_SKEW_STEPS:
        return TokenError.EXPIRED
    if token.step > current + MAX_SKEW_STEPS:
        return TokenError.INVALID
    return None


class ReplayGuard:
    """Remembers used tokens until they could no longer pass `check` anyway.

    Site-wide single use: one guard is shared by every reader the gateway serves.
    Forgetting is driven by the earlier of the caller's `now` and the wall clock, so a
    request carrying a far-future timestamp cannot wipe the memory, and a token is kept for
    RETAIN_STEPS (10 minutes) rather than the bare validity window, which covers terminals
    whose clocks or uploads lag. Memory is bounded by the traffic of those steps.
    """

    RETAIN_STEPS = 20

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._seen: dict[int, set[tuple[str, int, bytes, int]]] = {}

    def use(self, token: ParsedToken, now: float) -> bool:
        """Mark the token used; False when it had been used before."""
        horizon = time_step(min(now, self._wall_clock())) - self.RETAIN_STEPS
        for step in [s for s in self._seen if s < horizon]:
            del self._seen[step]
        bucket = self._seen.setdefault(token.step, set())
        key = token.replay_key
        if key in bucket:
            return False
        bucket.add(key)
        return True

    def __len__(self) -> int:
        return sum(len(b) for b in self._seen.values())
