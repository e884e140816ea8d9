"""The broker's logins and ACL for a site (`scgw mqtt-config`, CONTRACT.md section 6).

Pure generation over the site file plus a small writer. One login per MQTT device, one for
the gateway (everything under `{root}/`), one read-only monitor; Modbus-polled units get
none (the gateway publishes for them, so nobody may speak on their topics). Files:

- `passwd`: Mosquitto's hashed format, `user:$7$ITER$SALT$HASH` (PBKDF2-HMAC-SHA512, 12-byte
  salt, 64-byte hash, standard base64), exactly as `mosquitto_passwd` writes it.
- `acl`: Mosquitto's `acl_file` syntax; `parse_acl` + `acl_allows` (in mqtt_auth.py, with
  the password hashing) evaluate it the way Mosquitto does, so the embedded fallback
  broker enforces the very same file.
- `mosquitto.conf`: the settings of deploy/mosquitto/mosquitto.conf (docs/deploy-mqtt.md)
  with this site's listener(s), password and ACL files, and TLS when certificates are given.
- `credentials.json` (mode 0600): the clear passwords, for provisioning devices and the
  gateway's SCGW__MQTT__PASSWORD. Regenerating keeps every password found in it unless
  asked to rotate, adds new devices and drops removed ones.
- `bridge.d/bridge.conf` (mode 0640), only with a bridge: the site's bridge to a central
  broker (gateway/app/mqtt_bridge.py, docs/scale.md); regenerating without one removes it.

Passwords come from `secrets` (192 bits) and never reach a log or the terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.app.mqtt_auth import (
    PBKDF2_ITERATIONS,
    AclEntry,
    MqttConfigError,
    acl_allows,
    filter_within,
    hash_password,
    parse_acl,
    parse_passwd,
    topic_matches,
    verify_password,
)
from gateway.app.mqtt_bridge import (
    BRIDGE_DIR,
    BRIDGE_FILE,
    BRIDGE_USER,
    BridgeSettings,
    bridge_acl_lines,
    bridge_conf_text,
)
from gateway.config import SiteConfig

# Re-exported: the password and ACL formats moved to gateway/app/mqtt_auth.py.
__all__ = ["PBKDF2_ITERATIONS", "AclEntry", "MqttConfigError", "acl_allows", "filter_within",
           "hash_password", "parse_acl", "parse_passwd", "topic_matches", "verify_password"]

DEFAULT_GATEWAY_USER: Final = "scgw-gateway"
MONITOR_USER: Final = "scgw-monitor"
PASSWORD_BYTES: Final = 24  # 192 bits of `secrets`, 32 URL-safe characters
USERNAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

# What a device may publish, relative to `{root}/devices/{its id}/` (CONTRACT.md section 1,
# device -> gw), by kind: a gate never pays, a meter never asks for a decision. Nothing a
# device publishes can be `command`, `access/decision`, `payment/result` or
# `payment/batch_result`: those are the gateway's words.
COMMON_PUBLISH: Final = ("status", "telemetry", "event")
KIND_PUBLISH: Final[Mapping[str, tuple[str, ...]]] = {
    "gate": ("access/request",),
    "elevator": ("access/request",),
    "canteen": ("access/request", "payment/request", "payment/batch"),
}
# What every device may read: its own inbound channels (gw -> device).
DEVICE_SUBSCRIBE: Final = ("command", "access/decision", "payment/result",
                           "payment/batch_result")

# The broker settings the gateway is measured with (docs/deploy-mqtt.md explains each);
# tests/test_mqtt_config.py checks them against deploy/mosquitto/mosquitto.conf.
TUNING: Final[tuple[tuple[str, str], ...]] = (
    ("set_tcp_nodelay", "true"),
    ("max_queued_messages", "200000"),
    ("max_queued_bytes", "268435456"),
    ("queue_qos0_messages", "true"),
    ("max_inflight_messages", "1000"),
    ("persistent_client_expiration", "14d"),
)


@dataclass(frozen=True, slots=True)
class Login:
    username: str
    password: str = field(repr=False)

    def as_json(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password}


@dataclass(frozen=True, slots=True)
class Credentials:
    """Everything in credentials.json: who logs in to the broker, with which password."""

    gateway: Login
    monitor: Login
    devices: Mapping[str, Login]  # device id -> login, MQTT devices only

    def logins(self) -> list[Login]:
        return [self.gateway, self.monitor, *self.devices.values()]

    def to_json(self) -> str:
        return json.dumps({
            "gateway": self.gateway.as_json(),
            "monitor": self.monitor.as_json(),
            "devices": {d: login.as_json() for d, login in sorted(self.devices.items())},
        }, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Credentials:
        """Parse a credentials.json written earlier; MqttConfigError says what is wrong."""
        try:
            data = json.loads(text)
            devices = data.get("devices", {})
            if not isinstance(devices, dict):
                raise TypeError("devices is not an object")
            return cls(
                _login(data["gateway"]),
                _login(data.get("monitor") or {"username": MONITOR_USER, "password": ""}),
                {str(device): _login(login) for device, login in devices.items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MqttConfigError(f"unreadable credentials.json ({type(exc).__name__}: "
                                  f"{exc}); fix it or regenerate with --rotate") from None


def _login(value: Any) -> Login:
    if not isinstance(value, dict):
        raise TypeError("a login is not an object")
    username, password = value["username"], value["password"]
    if not isinstance(username, str) or not isinstance(password, str):
        raise TypeError("username and password must be strings")
    return Login(username, password)


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def mqtt_device_ids(config: SiteConfig) -> list[str]:
    """Devices that speak MQTT themselves; Modbus-polled units (with a `profile`) do not."""
    return [d.device_id for d in config.devices if d.profile is None]


@dataclass(frozen=True, slots=True)
class Changes:
    kept: int
    created: int
    rotated: int
    removed: list[str]


def plan_credentials(
    config: SiteConfig,
    previous: Credentials | None = None,
    *,
    rotate: bool = False,
    rotate_users: Iterable[str] = (),
    gateway_user: str | None = None,
    monitor_user: str = MONITOR_USER,
) -> tuple[Credentials, Changes]:
    """The logins for this site: earlier passwords kept (unless rotated), new devices added,
    removed ones dropped. `rotate_users` names logins (device ids or the gateway/monitor
    username) to give new passwords; `rotate` gives everyone one."""
    gateway_name = gateway_user or config.mqtt.username or DEFAULT_GATEWAY_USER
    devices = mqtt_device_ids(config)
    _check_usernames(gateway_name, monitor_user, devices)
    old: dict[str, str] = {}
    if previous is not None:
        old = {login.username: login.password for login in previous.logins() if login.password}
    forced = set(rotate_users)
    unknown = forced - {gateway_name, monitor_user, *devices}
    if unknown:
        raise MqttConfigError(f"cannot rotate unknown login(s): {', '.join(sorted(unknown))}")
    counts = {"kept": 0, "created": 0, "rotated": 0}

    def login(username: str) -> Login:
        if username in old and not rotate and username not in forced:
            counts["kept"] += 1
            return Login(username, old[username])
        counts["rotated" if username in old else "created"] += 1
        return Login(username, new_password())

    credentials = Credentials(login(gateway_name), login(monitor_user),
                              {device: login(device) for device in devices})
    removed = sorted(set(previous.devices) - set(devices)) if previous is not None else []
    return credentials, Changes(counts["kept"], counts["created"], counts["rotated"], removed)


def _check_usernames(gateway: str, monitor: str, devices: Sequence[str]) -> None:
    for name in (gateway, monitor):
        if not USERNAME_RE.match(name):
            raise MqttConfigError(f"MQTT username {name!r} must match {USERNAME_RE.pattern}")
    if BRIDGE_USER in (gateway, monitor, *devices):
        raise MqttConfigError(f"{BRIDGE_USER!r} is the bridge's name in the ACL: choose "
                              "another username or device id")
    if gateway == monitor:
        raise MqttConfigError(f"the gateway and the monitor cannot both be {gateway!r}")
    for name, whose in ((gateway, "gateway"), (monitor, "monitor")):
        if name in devices:
            raise MqttConfigError(f"device id {name!r} is also the {whose}'s MQTT username: "
                                  "rename one of them")


# ---- passwd: Mosquitto's PBKDF2-SHA512 format ------------------------------------------

def passwd_text(credentials: Credentials, previous: Mapping[str, str] | None = None) -> str:
    """One `user:hash` line per login. A hash from `previous` that still matches its
    password is kept, so regenerating without changes rewrites the same file."""
    previous = previous or {}
    lines = []
    for login in credentials.logins():
        kept = previous.get(login.username)
        encoded = (kept if kept is not None and verify_password(login.password, kept)
                   else hash_password(login.password))
        lines.append(f"{login.username}:{encoded}\n")
    return "".join(lines)


# ---- acl ------------------------------------------------------------------------------

def device_acl(root: str, device_id: str, kind: str) -> list[AclEntry]:
    base = f"{root}/devices/{device_id}"
    publish = COMMON_PUBLISH + KIND_PUBLISH.get(kind, ())
    return ([AclEntry("write", f"{base}/{channel}") for channel in publish]
            + [AclEntry("read", f"{base}/{channel}") for channel in DEVICE_SUBSCRIBE])


def acl_rules(config: SiteConfig, credentials: Credentials) -> dict[str, list[AclEntry]]:
    """username -> what it may do (read: receive; write: publish)."""
    root = config.mqtt.root
    kinds = {d.device_id: d.kind for d in config.devices}
    rules = {credentials.gateway.username: [AclEntry("readwrite", f"{root}/#")],
             credentials.monitor.username: [AclEntry("read", f"{root}/#")]}
    if config.home_assistant.discovery:  # the gateway announces entities, retained
        rules[credentials.gateway.username].append(
            AclEntry("write", f"{config.home_assistant.prefix}/#"))
    for device_id, login in sorted(credentials.devices.items()):
        rules[login.username] = device_acl(root, device_id, kinds[device_id])
    return rules


def acl_text(config: SiteConfig, credentials: Credentials, *, bridge: bool = False) -> str:
    root = config.mqtt.root
    kinds = {d.device_id: d.kind for d in config.devices}
    rules = acl_rules(config, credentials)
    out = [
        f"# Written by `scgw mqtt-config` for site {config.site.id} (topic root {root}).",
        "# Regenerate rather than edit. No line applies to anonymous clients (there are none).",
        "# Mosquitto checks `read` on every delivery (a subscription to `#` receives only what",
        "# these lines allow) and `write` on every publish and last will.",
        "",
        "# The gateway: everything under the root (decisions, commands, results, health).",
        f"user {credentials.gateway.username}",
        *(f"topic {e.access} {e.topic}" for e in rules[credentials.gateway.username]),
        "",
        "# Read-only monitor (dashboards, demo observers): reads everything, publishes nothing.",
        f"user {credentials.monitor.username}",
        *(f"topic {e.access} {e.topic}" for e in rules[credentials.monitor.username]),
    ]
    for device_id, login in sorted(credentials.devices.items()):
        out += ["", f"# {device_id} ({kinds[device_id]}): its own topics only",
                f"user {login.username}",
                *(f"topic {e.access} {e.topic}" for e in rules[login.username])]
    if bridge:
        out += ["", "# The bridge to the central broker (bridge.d/bridge.conf): reads what it "
                "forwards,", "# nothing carrying tokens, card numbers or payments.",
                *bridge_acl_lines(root, config.site.id)]
    return "\n".join(out) + "\n"


# ---- mosquitto.conf -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TlsFiles:
    certfile: Path
    keyfile: Path
    cafile: Path | None = None  # clients' CA: only needed to verify client certificates


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how the broker listens. `port` is the plain listener (None: none);
    with `tls`, a TLS listener on `tls_port`."""

    port: int | None = 1883
    bind: str | None = None  # None: every interface
    tls: TlsFiles | None = None
    tls_port: int = 8883
    persistence_dir: Path = Path("/var/lib/mosquitto")
    run_as: str | None = None  # `user` line; None: Mosquitto's default (mosquitto)
    extra_log_types: tuple[str, ...] = ()


def broker_settings_for(
    config: SiteConfig, *, bind: str | None = None, tls: TlsFiles | None = None,
    tls_port: int | None = None, plain_port: int | None = None,
    persistence_dir: Path | None = None, run_as: str | None = None,
) -> BrokerSettings:
    """Listeners from the site's `mqtt.url`: its port is where the gateway connects, plain
    for `mqtt://`, TLS for `mqtts://` (which then needs certificates). Certificates with an
    `mqtt://` site add a TLS listener for devices (`tls_port`, default 8883) beside it."""
    site_tls = config.mqtt.tls
    if site_tls and tls is None:
        raise MqttConfigError(f"the site's broker is {config.mqtt.url} (TLS): give --certfile "
                              "and --keyfile")
    if site_tls:
        port, tls_listener = plain_port, config.mqtt.port
    else:
        port, tls_listener = config.mqtt.port, tls_port or 8883
    if tls is not None and port == tls_listener:
        raise MqttConfigError(f"the plain and the TLS listener cannot share port {port}")
    return BrokerSettings(port=port, bind=bind, tls=tls, tls_port=tls_listener,
                          persistence_dir=persistence_dir or Path("/var/lib/mosquitto"),
                          run_as=run_as)


def mosquitto_conf_text(settings: BrokerSettings, passwd: Path, acl: Path,
                        bridge_dir: Path | None = None) -> str:
    where = f" {settings.bind}" if settings.bind else ""
    out = [
        "# Written by `scgw mqtt-config` (docs/deploy-mqtt.md explains every line).",
        "# One set of logins and ACLs for every listener: no second, open door.",
        "per_listener_settings false",
    ]
    if settings.port is not None:
        out += ["", f"listener {settings.port}{where}"]
    if settings.tls is not None:
        out += ["", f"listener {settings.tls_port}{where}",
                f"certfile {settings.tls.certfile}", f"keyfile {settings.tls.keyfile}"]
        if settings.tls.cafile is not None:
            out.append(f"cafile {settings.tls.cafile}")
        out.append("tls_version tlsv1.2")
    persistence = str(settings.persistence_dir).rstrip("/") + "/"
    out += [
        "",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        "",
        *(f"{key} {value}" for key, value in TUNING),
        "",
        "persistence true",
        f"persistence_location {persistence}",
        "autosave_interval 60",
        "",
        "log_dest stderr",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        *(f"log_type {t}" for t in settings.extra_log_types),
    ]
    if settings.run_as is not None:
        out += [f"user {settings.run_as}"]
    if bridge_dir is not None:
        # Last: everything after a `connection` line belongs to that bridge.
        out += ["", "# The bridge to the central broker (docs/scale.md).",
                f"include_dir {bridge_dir}"]
    return "\n".join(out) + "\n"


# ---- writing the files ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Written:
    out_dir: Path
    credentials: Credentials
    changes: Changes

    @property
    def conf(self) -> Path:
        return self.out_dir / "mosquitto.conf"

    @property
    def passwd(self) -> Path:
        return self.out_dir / "passwd"

    @property
    def acl(self) -> Path:
        return self.out_dir / "acl"

    @property
    def credentials_file(self) -> Path:
        return self.out_dir / "credentials.json"

    @property
    def bridge_conf(self) -> Path:
        return self.out_dir / BRIDGE_DIR / BRIDGE_FILE


def read_credentials(path: Path) -> Credentials | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MqttConfigError(f"cannot read {path}: {exc.strerror}") from None
    return Credentials.from_json(text)


def write_private(path: Path, text: str, mode: int) -> None:
    """Replace `path` atomically; the new file has `mode` from its first byte on."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_mqtt_files(
    config: SiteConfig,
    out_dir: Path,
    settings: BrokerSettings,
    *,
    rotate: bool = False,
    rotate_users: Iterable[str] = (),
    gateway_user: str | None = None,
    bridge: BridgeSettings | None = None,
) -> Written:
    """Write mosquitto.conf, passwd, acl and credentials.json into `out_dir` (and with
    `bridge`, bridge.d/bridge.conf; without, an earlier one is removed)."""
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        previous = read_credentials(out_dir / "credentials.json")
    except MqttConfigError:
        if not rotate:
            raise  # devices hold those passwords: never replace them silently
        previous = None
    written = Written(out_dir, *plan_credentials(
        config, previous, rotate=rotate, rotate_users=rotate_users, gateway_user=gateway_user))
    try:
        old_passwd = parse_passwd(written.passwd.read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError):
        old_passwd = {}
    credentials = written.credentials
    # Credentials first: if a later write fails, the passwords the files are made from
    # are already saved and a rerun produces the same logins.
    write_private(written.credentials_file, credentials.to_json(), 0o600)
    write_private(written.passwd, passwd_text(credentials, old_passwd), 0o640)
    write_private(written.acl, acl_text(config, credentials, bridge=bridge is not None), 0o640)
    bridge_dir = written.bridge_conf.parent
    if bridge is not None:
        bridge_dir.mkdir(exist_ok=True, mode=0o750)
        write_private(written.bridge_conf,
                      bridge_conf_text(bridge, config.mqtt.root, config.site.id), 0o640)
    else:
        with contextlib.suppress(FileNotFoundError):
            written.bridge_conf.unlink()
    write_private(written.conf, mosquitto_conf_text(
        settings, written.passwd, written.acl, bridge_dir if bridge is not None else None),
        0o644)
    return written
