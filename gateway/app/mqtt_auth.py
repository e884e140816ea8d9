"""Mosquitto's password and ACL file formats, read and checked the way Mosquitto does.

Split from gateway/app/mqtt_config.py (which re-exports these names): `hash_password` writes
what `mosquitto_passwd` writes, `verify_password` checks its hashes, and `parse_acl` +
`acl_allows` evaluate an `acl_file` so that the embedded fallback broker
(simulators/demo/amqtt_acl.py) enforces the very same file Mosquitto does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

PBKDF2_ITERATIONS: Final = 101  # mosquitto_passwd's own default (2.0.x); see docs/security.md
SALT_BYTES: Final = 12  # as mosquitto_passwd
HASH_BYTES: Final = 64  # SHA-512 output

Access = Literal["read", "write", "readwrite"]


class MqttConfigError(ValueError):
    """The site (or an earlier credentials.json, passwd or acl file) cannot be turned into
    broker files. Defined here so both modules raise the one error."""


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """`$7$ITER$SALT$HASH` as mosquitto_passwd writes it (sha512-pbkdf2)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches a `$7$` (PBKDF2) or `$6$` (salted SHA-512) hash."""
    try:
        parts = encoded.split("$")
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            if not 1 <= iterations <= 10_000_000:
                return False
            salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations,
                                         len(expected))
        elif len(parts) == 4 and parts[1] == "6":
            salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            digest = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def parse_passwd(text: str) -> dict[str, str]:
    """username -> hash from a Mosquitto password file (comments and blanks skipped)."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            username, encoded = line.split(":", 1)
            users[username] = encoded
    return users


# ---- acl ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AclEntry:
    access: Access
    topic: str


def parse_acl(text: str) -> dict[str, list[AclEntry]]:
    """The `user`/`topic` lines of a Mosquitto acl_file (what acl_text writes)."""
    rules: dict[str, list[AclEntry]] = {}
    user: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "user":
            user = rest.strip()
            rules.setdefault(user, [])
        elif word == "topic" and user is not None:
            access, _, topic = rest.strip().partition(" ")
            if access not in ("read", "write", "readwrite") or not topic.strip():
                raise MqttConfigError(f"acl line {number}: unsupported {line!r}")
            rules[user].append(AclEntry(access, topic.strip()))  # type: ignore[arg-type]
        else:
            raise MqttConfigError(f"acl line {number}: unsupported {line!r}")
    return rules


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT matching of a concrete topic against a filter (`+`, `#`; `$` topics apart)."""
    if topic.startswith("$") and not pattern.startswith("$"):
        return False
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def filter_within(subscription: str, pattern: str) -> bool:
    """True when every topic `subscription` can match is matched by `pattern`."""
    sub, pat = subscription.split("/"), pattern.split("/")
    for i, level in enumerate(pat):
        if level == "#":
            return True
        if i >= len(sub) or sub[i] == "#":
            return False
        if level != "+" and (sub[i] == "+" or sub[i] != level):
            return False
    return len(sub) == len(pat)


def acl_allows(
    rules: Mapping[str, Sequence[AclEntry]], username: str | None, topic: str,
    access: Literal["read", "write", "subscribe"],
) -> bool:
    """Mosquitto's acl_file semantics: allowed when an entry of the user matches the topic
    with that access. `subscribe` (for brokers that check it; Mosquitto 2.0 defers to
    `read` at delivery) needs a `read` entry covering every topic the filter can match."""
    if username is None:
        return False
    for entry in rules.get(username, ()):
        if access == "subscribe":
            if entry.access != "write" and filter_within(topic, entry.topic):
                return True
        elif access in entry.access and topic_matches(entry.topic, topic):
            return True
    return False
