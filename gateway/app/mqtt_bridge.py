"""The site broker's bridge to a central MQTT broker (`scgw mqtt-config --bridge-to`).

Past one machine the gateway stays as it is; Mosquitto's own bridge carries what a
property group's centre needs (docs/scale.md): alert transitions, telemetry and the
devices' and gateway's status, out only, each under `sites/{site_id}/` on the central broker
(EMQX, a Mosquitto, any MQTT 3.1.1/5 broker). Nothing carrying QR tokens, card numbers or
payments (`access/*`, `payment/*`, `event`, `command`) is bridged, and nothing comes back
in: the centre cannot open a gate or debit a purse through it.

The bridge's session is persistent (`cleansession false`) and the site broker queues what
it cannot send (the site's `max_queued_messages` / `max_queued_bytes`, QoS 0 too), so an
uplink outage delays the centre's view and costs the site nothing (docs/scale.md, "Uplink
down").

Mosquitto reads the central password only from its configuration, so the bridge lives in
its own file, DIR/bridge.d/bridge.conf (mode 0640, like `passwd`), pulled in by
`include_dir`; the password itself comes from a file or the environment, never a command
line (where `ps` would show it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

BRIDGE_USER: Final = "scgw-bridge"  # the bridge's identity on the site broker (ACL only)
BRIDGE_DIR: Final = "bridge.d"
BRIDGE_FILE: Final = "bridge.conf"
PASSWORD_ENV: Final = "SCGW_BRIDGE_PASSWORD"  # noqa: S105 (a variable name)
_HOST_RE: Final = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):(\d{1,5})$")
_USER_RE: Final = re.compile(r"^[^\s#\"]{1,128}$")

# Relative to `{root}/`: what leaves the site. Kept to a list a reviewer can read at once.
SITE_TOPICS: Final = (
    "alerts/#",              # alert transitions (CONTRACT.md section 1)
    "devices/+/telemetry",   # readings of MQTT devices
    "devices/+/status",      # device online/offline (retained)
)
# Under `{root}/gateway/{site}/`: the gateway's status, its telemetry worker's health, and
# the readings it polls from Modbus units on their behalf.
GATEWAY_TOPICS: Final = ("status", "telemetry", "polled/+")


class BridgeError(ValueError):
    """The bridge options cannot be turned into a working configuration."""


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    cafile: Path | None = None  # set: TLS to the central broker, verified against this CA
    protocol: Literal["mqttv311", "mqttv50"] = "mqttv311"
    backoff_s: tuple[int, int] = (5, 60)  # restart_timeout: jittered back-off, base and cap
    qos: int = 1


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); BridgeError says what is wrong."""
    match = _HOST_RE.match(address.strip())
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise BridgeError(f"--bridge-to {address!r}: expected HOST:PORT (e.g. "
                          "central.example.net:8883)")
    return match.group(1), int(match.group(2))


def parse_backoff(text: str) -> tuple[int, int]:
    """`BASE:CAP` seconds (or one number for both)."""
    try:
        base, _, cap = text.partition(":")
        values = (int(base), int(cap or base))
    except ValueError:
        raise BridgeError(f"--bridge-backoff {text!r}: expected BASE:CAP seconds, e.g. 5:60"
                          ) from None
    if not 1 <= values[0] <= values[1] <= 3600:
        raise BridgeError(f"--bridge-backoff {text!r}: need 1 <= BASE <= CAP <= 3600")
    return values


def read_password(path: Path | None, environ: dict[str, str]) -> str:
    """The central broker's password from `path` (first line) or $SCGW_BRIDGE_PASSWORD."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BridgeError(f"--bridge-password-file {path}: {exc.strerror}") from None
        password = text.splitlines()[0] if text else ""
    else:
        password = environ.get(PASSWORD_ENV, "")
    if not password:
        raise BridgeError("the bridge needs the central broker's password: "
                          f"--bridge-password-file FILE or {PASSWORD_ENV}")
    if any(c.isspace() for c in password) or "#" in password:
        # Mosquitto's configuration has no quoting: a space or # would cut the password.
        raise BridgeError("the central broker's password cannot contain spaces or '#' "
                          "(Mosquitto's configuration cannot quote them)")
    return password


def check_username(username: str) -> str:
    if not _USER_RE.match(username):
        raise BridgeError(f"--bridge-username {username!r}: 1-128 characters, no spaces, "
                          "quotes or '#'")
    return username


def remote_prefix(site_id: str) -> str:
    return f"sites/{site_id}/"


def bridged_topics(root: str, site_id: str) -> list[str]:
    """Local topic filters that leave the site (absolute, for the ACL and the docs)."""
    return ([f"{root}/{t}" for t in SITE_TOPICS]
            + [f"{root}/gateway/{site_id}/{t}" for t in GATEWAY_TOPICS])


def bridge_conf_text(bridge: BridgeSettings, root: str, site_id: str) -> str:
    """The `connection` section: each local `{root}/X` published centrally as
    `sites/{site_id}/X`, at QoS `bridge.qos`, out only."""
    remote = remote_prefix(site_id)
    topics = [*SITE_TOPICS, *(f"gateway/{site_id}/{t}" for t in GATEWAY_TOPICS)]
    out = [
        f"# Written by `scgw mqtt-config --bridge-to` for site {site_id} (docs/scale.md).",
        "# Holds the central broker's password: mode 0640, like passwd. Regenerate, do not edit.",
        f"connection scgw-{site_id}",
        f"address {bridge.host}:{bridge.port}",
        f"bridge_protocol_version {bridge.protocol}",
        f"remote_clientid scgw-bridge-{site_id}",
        f"remote_username {bridge.username}",
        f"remote_password {bridge.password}",
        f"local_clientid scgw-bridge-local-{site_id}",
        f"local_username {BRIDGE_USER}",
        "# A persistent session on the central broker: a reconnect drops nothing in flight.",
        "cleansession false",
        "start_type automatic",
        f"restart_timeout {bridge.backoff_s[0]} {bridge.backoff_s[1]}",
        "keepalive_interval 60",
        "# Any MQTT broker, not only Mosquitto (no bridge-private protocol bit).",
        "try_private false",
        "# The centre sees the site come and go: 1 connected, 0 (the bridge's will) gone.",
        "notifications true",
        f"notification_topic {remote}bridge/state",
        "# Messages waiting for the central broker count against the site's",
        "# max_queued_messages / max_queued_bytes (mosquitto.conf).",
    ]
    if bridge.cafile is not None:
        out += [f"bridge_cafile {bridge.cafile}", "bridge_tls_version tlsv1.2",
                "bridge_insecure false"]
    out += ["", "# Out only: nothing from the centre reaches the site's devices."]
    out += [f'topic {t} out {bridge.qos} {root}/ {remote}' for t in topics]
    return "\n".join(out) + "\n"


def bridge_acl_lines(root: str, site_id: str) -> list[str]:
    """The bridge's read rights on the site broker: exactly what it forwards."""
    return [f"user {BRIDGE_USER}", *(f"topic read {t}" for t in bridged_topics(root, site_id))]
