"""The token format: documented vectors, every refusal reason, and forgery resistance."""

from __future__ import annotations

import base64
import re
import secrets
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers import tokens as c

SECRET = bytes(range(32))
CID = "0123456789abcdef"
NOW = 1763800000.0


def _verify(text: str, secret: bytes, now: float) -> str | None:
    token = c.parse_qr(text)
    if token is None:
        return "invalid_token"
    error = c.check(token, secret, now)
    return error.value if error else None


def test_documented_vectors_match_the_code() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "credentials.md").read_text()
    rows = re.findall(r"\| ([\d.]+) \| (\d+) \| `([0-9a-f]+)` \| (QR|BLE) `([^`]+)` \|", doc)
    assert len(rows) == 4
    for now, step, nonce, kind, token in rows:
        assert c.time_step(float(now)) == int(step)
        if kind == "QR":
            assert c.mint_qr(CID, SECRET, float(now), bytes.fromhex(nonce)) == token
        else:
            assert c.mint_ble(CID, SECRET, float(now), bytes.fromhex(nonce)).hex() == token


def test_valid_token_within_one_step_of_skew() -> None:
    qr = c.mint_qr(CID, SECRET, NOW)
    assert _verify(qr, SECRET, NOW) is None
    assert _verify(qr, SECRET, NOW + 30) is None  # phone clock one step behind
    assert _verify(qr, SECRET, NOW - 30) is None  # phone clock one step ahead


def test_expired_and_future_steps() -> None:
    qr = c.mint_qr(CID, SECRET, NOW)
    assert _verify(qr, SECRET, NOW + 60) == "expired_token"
    assert _verify(qr, SECRET, NOW - 60) == "invalid_token"


def test_expires_at_is_the_last_accepted_instant() -> None:
    qr = c.mint_qr(CID, SECRET, NOW)
    expires = c.qr_expires_at(NOW)
    assert _verify(qr, SECRET, expires - 0.001) is None
    assert _verify(qr, SECRET, expires) == "expired_token"


def test_every_flipped_bit_is_refused() -> None:
    raw = c.mint_bytes(c.TokenKind.QR, CID, SECRET, NOW)
    for bit in range(len(raw) * 8):
        mutated = bytearray(raw)
        mutated[bit // 8] ^= 1 << (bit % 8)
        text = c.QR_PREFIX + base64.urlsafe_b64encode(bytes(mutated)).rstrip(b"=").decode()
        assert _verify(text, SECRET, NOW) == "invalid_token", bit


def test_token_of_another_credential_fails_with_this_secret() -> None:
    other_secret = c.new_secret()
    qr = c.mint_qr(CID, other_secret, NOW)
    assert _verify(qr, SECRET, NOW) == "invalid_token"


def test_ble_tag_cannot_be_promoted_to_qr() -> None:
    ble = c.mint_ble(CID, SECRET, NOW)
    assert c.parse_qr(c.QR_PREFIX + base64.urlsafe_b64encode(ble).decode()) is None
    assert c.parse_ble_hex(ble.hex()) is not None
    assert len(ble) == c.BLE_TOKEN_BYTES == 23


def test_replay_guard_is_single_use_and_bounded() -> None:
    wall = [NOW]
    guard = c.ReplayGuard(wall_clock=lambda: wall[0])
    token = c.parse_qr(c.mint_qr(CID, SECRET, NOW))
    assert token is not None
    assert guard.use(token, NOW)
    assert not guard.use(token, NOW + 1)
    for i in range(100):
        fresh = c.parse_qr(c.mint_qr(CID, SECRET, NOW))
        assert fresh is not None and guard.use(fresh, NOW + i * 0.1)
    wall[0] = NOW + 300
    assert not guard.use(token, NOW + 300)  # still remembered five minutes later
    wall[0] = NOW + 3600
    later = c.parse_qr(c.mint_qr(CID, SECRET, NOW + 3600))
    assert later is not None and guard.use(later, NOW + 3600)
    assert len(guard) == 1  # old steps were forgotten once long unusable


def test_a_future_timestamp_cannot_wipe_the_replay_memory() -> None:
    guard = c.ReplayGuard(wall_clock=lambda: NOW)
    token = c.parse_qr(c.mint_qr(CID, SECRET, NOW))
    assert token is not None and guard.use(token, NOW)
    future = c.parse_qr(c.mint_qr(CID, SECRET, NOW + 86400))
    assert future is not None and guard.use(future, NOW + 86400)
    assert not guard.use(token, NOW)


def test_ten_thousand_random_tokens_are_all_refused() -> None:
    granted = 0
    for _ in range(10_000):
        raw = bytes([1]) + bytes.fromhex(CID) + c.time_step(NOW).to_bytes(4, "big")
        raw += secrets.token_bytes(20)
        text = c.QR_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        if _verify(text, SECRET, NOW) is None:
            granted += 1
    assert granted == 0


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=80), st.text(max_size=60).map(lambda t: c.QR_PREFIX + t)))
def test_arbitrary_text_is_never_a_valid_token(text: str) -> None:
    assert _verify(text, SECRET, NOW) == "invalid_token"
