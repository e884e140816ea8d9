"""Site configuration: a YAML file validated by pydantic, overridden by the environment.

Every problem is reported at once with its key path, the YAML line it came from and what
was expected, because the person reading it is in a machine room with a broken gateway.
Secrets (broker password, JWT signing key, InfluxDB token and password) come only from the
environment (`SCGW__MQTT__PASSWORD`, `SCGW__API__JWT_SECRET`, `SCGW__INFLUXDB__TOKEN`,
`SCGW__INFLUXDB__PASSWORD`); a secret found in the file is an error, because site files get
copied into tickets and version control.

A `devices:` entry is one of three shapes (MQTT device, Modbus TCP unit, Modbus RTU unit),
chosen from its keys before validation, so each shape allows only its own keys (an RTU
parity on a TCP unit is an error, not silently ignored) and an error names one key of the
shape the operator meant rather than why every shape failed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from device_drivers.vocabulary import DEVICE_ID_PATTERN, MODBUS_KINDS, DeviceKind
from gateway.db_url import sqlite_file
from rules.loader import RuleFileError, load_rule_files, parse_calendar

ENV_PREFIX = "SCGW__"
SECRET_KEYS = {("mqtt", "password"), ("api", "jwt_secret"), ("influxdb", "token"),
               ("influxdb", "password"), ("api", "metrics_token")}
STRING_KEYS = SECRET_KEYS | {("mqtt", "username"), ("influxdb", "username")}
"""Environment values kept as given: a user name `0123` or `yes` must not become a number or
a boolean the way other overrides (`SCGW__API__PORT=9001`) are read as YAML scalars."""
CROSS_REFERENCE = "cross_reference"  # error type of checks across entries
DEFAULT_SITE_FILE = "site.yaml"
"""What operator commands read when not given `--config` (as `scgw run` does)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _checked_calendar(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Kept as written (it travels to the telemetry worker as JSON), checked here so a bad
    calendar fails check-config rather than the rules engine at start."""
    if data is not None:
        parse_calendar(data, "calendar")  # ValueError says which key and what was expected
    return data


class SiteInfo(_Strict):
    id: str = Field(pattern=DEVICE_ID_PATTERN)
    name: str = ""
    timezone: str = "UTC"  # IANA name; the canteen's days and the rules' calendars use it
    calendar: dict[str, Any] | None = None  # opening hours of buildings without their own

    @field_validator("calendar")
    @classmethod
    def _calendar(cls, data: dict[str, Any] | None) -> dict[str, Any] | None:
        return _checked_calendar(data)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        """A misspelt zone must fail check-config, not the first settlement at midnight."""
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {name!r} (e.g. Asia/Shanghai)") from None
        return name


class MqttConfig(_Strict):
    url: str = Field(default="mqtt://127.0.0.1:1883", pattern=r"^mqtts?://[^/:]+(:\d+)?/?$")
    root: str = Field(default="scgw", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    client_id: str = ""
    username: str | None = None
    password: SecretStr | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.2, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1].rstrip("/").split(":")[0]

    @property
    def port(self) -> int:
        rest = self.url.split("://", 1)[1].rstrip("/")
        default = 8883 if self.url.startswith("mqtts") else 1883
        return int(rest.split(":")[1]) if ":" in rest else default

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts")


class DatabaseConfig(_Strict):
    url: str = "sqlite:///scgw.db"


class ApiConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    jwt_secret: SecretStr | None = None
    jwt_audience: str = "scgw-api"
    # Also the cap: a token whose exp - iat exceeds it is refused, however it was signed.
    token_ttl_s: int = Field(default=3600, ge=60, le=86400)
    # Sign-in limits (moving window, in memory, per API process): attempts per user name and
    # per client address; beyond them 429 with Retry-After. A success clears its user name.
    login_window_s: int = Field(default=300, ge=1, le=86400)
    login_attempts_per_username: int = Field(default=10, ge=1, le=10_000)
    login_attempts_per_client: int = Field(default=50, ge=1, le=100_000)
    # Sign-ins waiting for the one password-hashing thread (argon2, 64 MiB each, low CPU
    # priority); beyond this 503 with Retry-After, so a flood never queues without bound.
    login_queue: int = Field(default=16, ge=1, le=1000)
    # Per resident: phone credentials not revoked, and visitor passes neither revoked nor
    # expired. Beyond them enrolment or issue is a 409 saying so.
    phone_credentials_per_resident: int = Field(default=10, ge=1, le=1000)
    visitor_passes_per_resident: int = Field(default=50, ge=1, le=10_000)
    # /metrics: with the bearer token (SCGW__API__METRICS_TOKEN, 16+ characters) from
    # anywhere; without it only from these client networks (default: loopback only; [] makes
    # the token the only way in).
    metrics_token: SecretStr | None = None
    metrics_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    @field_validator("metrics_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the metrics token needs at least 16 characters")
        return value

    @field_validator("metrics_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress  # kept local: only this check needs it

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"not an address or network: {network!r}") from None
        return value


class AccessConfig(_Strict):
    unlock_duration_s: int = Field(default=5, ge=1, le=60)


class CanteenConfig(_Strict):
    offline_limit_per_card_cents: int = Field(default=5000, ge=0)
    offline_limit_per_terminal_cents: int = Field(default=200000, ge=0)
    # Offline sales are believed only inside a period the gateway saw the terminal offline,
    # widened by this on both sides: the broker sends a last will 1.5 keepalives after the
    # link died, and clocks differ a little. Wider lets a forged upload reach further back.
    offline_window_slack_s: float = Field(default=120.0, ge=0, le=3600)


class AuditConfig(_Strict):
    """Where decisions wait when the store cannot take them, and how hard a commit syncs."""

    # None: `audit-spill/` in the telemetry spool directory (beside the SQLite database).
    spill_dir: Path | None = None
    # SQLite only: fsync every decision's commit (synchronous=FULL). Off, a commit survives a
    # kill -9 of the gateway and the WAL is fsynced within 0.2 s; on, it also survives a
    # power cut at once, at the cost of an fsync (milliseconds) in every decision's round trip.
    fsync_each_commit: bool = False

    @field_validator("spill_dir", mode="before")
    @classmethod
    def _not_blank(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("a directory path (or leave the key out: beside the spool)")
        return value


class TelemetryConfig(_Strict):
    """The durable spool between ingest and the sinks, and the local store's retention.

    Bounds are where a value stops making sense rather than taste: an fsync interval above a
    minute puts more readings at risk on a power cut than anyone would accept, and a
    retention past ten years is a typo for a rollup table on an edge box.
    """

    spool_dir: Path | None = None  # None: beside the database (SiteConfig.spool_directory)
    spool_max_mb: int = Field(default=512, ge=1)  # full: the oldest readings are dropped, counted
    fsync_interval_s: float = Field(default=1.0, gt=0, le=60)  # at most this is lost on kill -9
    local_retention_days: int = Field(default=30, ge=1, le=3650)  # 1-minute rollups kept
    # After a backlog has drained, a worker this much larger than before it hands over to a
    # fresh process (loss-free: gateway.telemetry.recycle); 0: never.
    worker_recycle_mb: float = Field(default=8.0, ge=0, le=4096)

    @field_validator("spool_dir", mode="before")
    @classmethod
    def _not_blank(cls, value: Any) -> Any:
        """`spool_dir: ""` would become `.`, the working directory: never what was meant."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("a directory path (or leave the key out: beside the database)")
        return value

    @property
    def spool_max_bytes(self) -> int:
        return self.spool_max_mb << 20


_V2_ONLY = "is for api v2 (influxdb-client); api v1 writes to `database` with username/password"


class InfluxConfig(_Strict):
    """Where telemetry and alerts go besides the local store (CONTRACT.md section 4).

    Each key belongs to one API, and a key of the other one is an error rather than silently
    ignored: an operator who sets `bucket` on v1 believes the data lands in that bucket. The
    checks are field validators (not one model check) so that each error names its own key,
    and `api` comes before the keys it decides so it has been validated when they are.
    """

    url: str
    api: Literal["v1", "v2"] = "v1"
    database: str = Field(default="scgw", min_length=1)
    org: str | None = Field(default=None, min_length=1, validate_default=True)
    bucket: str | None = Field(default=None, min_length=1, validate_default=True)
    token: SecretStr | None = None
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        """A URL the writers can join `/write` or `/api/v2/write` to; no credentials in it,
        since URLs end up in logs and /readyz."""
        example = "e.g. http://influx-host:8086"
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"an http(s) URL, {example} ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an http:// or https:// URL of the server, {example}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"credentials do not go in the URL: set `username` and "
                             f"{ENV_PREFIX}INFLUXDB__PASSWORD (v1), or "
                             f"{ENV_PREFIX}INFLUXDB__TOKEN (v2)")
        if parts.query or parts.fragment:
            raise ValueError(f"a server URL without `?` query or `#` fragment, {example}")
        if port == 0:
            raise ValueError(f"a port between 1 and 65535, {example}")
        return url.strip().rstrip("/")

    @field_validator("org")
    @classmethod
    def _org_for_v2(cls, org: str | None, info: ValidationInfo) -> str | None:
        api = info.data.get("api")
        if api == "v2" and org is None:
            raise ValueError("api v2 needs `org`, the InfluxDB organisation to write to")
        if api == "v1" and org is not None:
            raise ValueError(f"`org` {_V2_ONLY}")
        return org

    @field_validator("bucket")
    @classmethod
    def _bucket_for_v2(cls, bucket: str | None, info: ValidationInfo) -> str | None:
        """On v2 the bucket defaults to `database`, so switching api keeps the same name."""
        api = info.data.get("api")
        if api == "v1" and bucket is not None:
            raise ValueError(f"`bucket` {_V2_ONLY} (on InfluxDB 1.x the bucket is the database)")
        if api == "v2" and bucket is None:
            database = info.data.get("database")
            return database if isinstance(database, str) else None
        return bucket

    @field_validator("token")
    @classmethod
    def _token_for_v2(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if info.data.get("api") == "v1" and token is not None:
            raise ValueError(f"a token {_V2_ONLY} ({ENV_PREFIX}INFLUXDB__PASSWORD)")
        return token

    @field_validator("username")
    @classmethod
    def _username_for_v1(cls, username: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("api") == "v2" and username is not None:
            raise ValueError(f"`username` is for api v1; api v2 authenticates with "
                             f"{ENV_PREFIX}INFLUXDB__TOKEN")
        return username

    @field_validator("password")
    @classmethod
    def _password_with_username(
        cls, password: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        if password is None:
            return None
        if info.data.get("api") == "v2":
            raise ValueError(f"a password is for api v1; api v2 authenticates with "
                             f"{ENV_PREFIX}INFLUXDB__TOKEN")
        if info.data.get("api") == "v1" and not info.data.get("username"):
            raise ValueError(f"a password needs `username` (in the file or "
                             f"{ENV_PREFIX}INFLUXDB__USERNAME)")
        return password


class RulesConfig(_Strict):
    """Alert rule files (YAML); none listed means the bundled default rules."""

    files: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    @field_validator("files")
    @classmethod
    def _each_once(cls, files: list[str]) -> list[str]:
        """A file listed twice would define every rule twice (duplicate rule ids)."""
        seen = {f for i, f in enumerate(files) if f in files[:i]}
        if seen:
            raise ValueError(f"listed more than once: {', '.join(sorted(seen))}")
        return files


class HomeAssistantConfig(_Strict):
    """Home Assistant MQTT discovery (gateway/devices/ha_discovery.py); off by default."""

    discovery: bool = False
    prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


class FloorConfig(_Strict):
    number: int
    name: str = ""
    public: bool = False


class BuildingConfig(_Strict):
    id: str = Field(pattern=DEVICE_ID_PATTERN)
    name: str = ""
    floors: list[FloorConfig] = Field(min_length=1)
    calendar: dict[str, Any] | None = None  # opening hours (docs/rules.md); default: the site's

    @field_validator("calendar")
    @classmethod
    def _calendar(cls, data: dict[str, Any] | None) -> dict[str, Any] | None:
        return _checked_calendar(data)

    @model_validator(mode="after")
    def _unique_floors(self) -> BuildingConfig:
        numbers = [f.number for f in self.floors]
        if len(numbers) != len(set(numbers)):
            raise ValueError(f"floor numbers repeat in building {self.id!r}: {numbers}")
        return self


class BleReaderConfig(_Strict):
    """A BLE radio next to a reader: phones' tokens seen here count as presented there."""

    adapter: str | None = None  # e.g. "hci1"; None = the system default
    rssi_threshold_dbm: int = Field(default=-75, ge=-120, le=0)


class _DeviceBase(_Strict):
    """What every device has, whatever wire it is reached over."""

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    kind: DeviceKind
    name: str = ""
    building: str | None = None


class MqttDeviceConfig(_DeviceBase):
    """A device that speaks MQTT itself (CONTRACT.md section 1): gates, elevator readers,
    canteen terminals, and meters or units that publish their own telemetry.

    The Modbus attributes exist as constants so that code handed any device can ask
    `device.profile` or `device.is_modbus` without first asking what kind of member it got.
    """

    transport: ClassVar[Literal["mqtt"]] = "mqtt"
    is_modbus: ClassVar[bool] = False
    profile: ClassVar[None] = None
    host: ClassVar[None] = None
    port: ClassVar[None] = None
    unit_id: ClassVar[None] = None
    poll_interval_s: ClassVar[None] = None

    # Gates: a restricted gate (gym, machine room) opens only through an access group or a
    # visitor pass; gate_ids are the names groups and passes use (default: the device id).
    restricted: bool = False
    gate_ids: list[str] = Field(default_factory=list)
    ble: BleReaderConfig | None = None

    @field_validator("restricted", "gate_ids")
    @classmethod
    def _gate_only(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if value and kind is not None and kind != "gate":
            raise ValueError(f"`{info.field_name}` is for gates (this device is a {kind!r})")
        return value

    @field_validator("ble")
    @classmethod
    def _reader_only(
        cls, value: BleReaderConfig | None, info: ValidationInfo
    ) -> BleReaderConfig | None:
        kind = info.data.get("kind")
        if value is not None and kind is not None and kind not in ("gate", "elevator"):
            raise ValueError(f"`ble` is for gate and elevator readers (this device is a {kind!r})")
        return value


class _ModbusBase(_DeviceBase):
    """A unit the gateway polls (CONTRACT.md section 5); it has no MQTT of its own.

    Reader-only attributes are constants here for the same reason as the Modbus ones on
    MqttDeviceConfig: callers iterate over all devices.
    """

    is_modbus: ClassVar[bool] = True
    restricted: ClassVar[bool] = False
    gate_ids: ClassVar[tuple[str, ...]] = ()
    ble: ClassVar[None] = None

    profile: str = Field(min_length=1)  # bundled profile id or a path to a YAML file
    unit_id: int = Field(default=1, ge=0, le=247)
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    timeout_s: float = Field(default=1.0, gt=0, le=60)  # per request
    retries: int = Field(default=2, ge=0, le=10)  # further attempts after a failed request

    @field_validator("kind")
    @classmethod
    def _polled_kind(cls, kind: DeviceKind) -> DeviceKind:
        if kind not in MODBUS_KINDS:
            raise ValueError(
                f"{kind!r} is not polled over Modbus (one of {', '.join(sorted(MODBUS_KINDS))});"
                " an MQTT device has no `profile`"
            )
        return kind


class ModbusTcpConfig(_ModbusBase):
    """A Modbus TCP unit, or a unit behind a Modbus TCP gateway: it has a `host`."""

    transport: ClassVar[Literal["modbus_tcp"]] = "modbus_tcp"
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)

    @field_validator("port", mode="before")
    @classmethod
    def _tcp_port(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().isdigit():
            raise ValueError(
                f"a TCP port number (got {value!r}); a serial device path is for Modbus RTU,"
                " which has no `host`"
            )
        return value


class ModbusRtuConfig(_ModbusBase):
    """A Modbus RTU unit on a serial line (RS-485): `port` is the device path.

    Units sharing a line must agree on its settings (checked by SiteConfig), because the
    gateway opens each line once.
    """

    transport: ClassVar[Literal["modbus_rtu"]] = "modbus_rtu"
    host: ClassVar[None] = None
    port: str = Field(min_length=1)  # /dev/ttyUSB0, COM3, /dev/serial/by-id/...
    baudrate: int = Field(default=9600, ge=300, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8

    @property
    def line_settings(self) -> tuple[int, str, int, int]:
        return (self.baudrate, self.parity, self.stopbits, self.bytesize)


_MODBUS_KEYS = frozenset({"profile", "host", "port"})
_SERIAL_KEYS = frozenset({"baudrate", "parity", "stopbits", "bytesize"})
NO_TRANSPORT = (
    "a Modbus unit (it has `profile`) needs `host` (and `port`, default 502) for Modbus TCP, "
    "or a serial device path as `port` for Modbus RTU"
)


def _transport(value: Any) -> str | None:
    """Which member of the device union an entry is, from the keys it has.

    Decided from the keys (not by trying each member) so that an error names the one key
    that is wrong for the device the operator meant, instead of listing why every member
    failed. A `profile`, `host` or `port` means a Modbus unit, so a forgotten profile is
    reported as "profile: required key is missing" rather than "host: unknown key".
    """
    if isinstance(value, MqttDeviceConfig | ModbusTcpConfig | ModbusRtuConfig):
        return value.transport
    if not isinstance(value, Mapping):
        return "mqtt"  # reported by the MQTT member as "not a mapping"
    present = {key for key, item in value.items() if item is not None}
    if not present & (_MODBUS_KEYS | _SERIAL_KEYS):
        return "mqtt"
    if "host" in present:
        return "modbus_tcp"
    port = value.get("port")
    if isinstance(port, str) and not port.strip().isdigit():
        return "modbus_rtu"
    if port is not None:
        return "modbus_tcp"  # a port number: reported as "host: required key is missing"
    if present & _SERIAL_KEYS:
        return "modbus_rtu"  # line settings: reported as "port: required key is missing"
    return None


DEVICE_TAGS = frozenset({"mqtt", "modbus_tcp", "modbus_rtu"})
AnyDevice = MqttDeviceConfig | ModbusTcpConfig | ModbusRtuConfig
ModbusDevice = ModbusTcpConfig | ModbusRtuConfig
DeviceConfig = Annotated[
    Annotated[MqttDeviceConfig, Tag("mqtt")]
    | Annotated[ModbusTcpConfig, Tag("modbus_tcp")]
    | Annotated[ModbusRtuConfig, Tag("modbus_rtu")],
    Discriminator(
        _transport, custom_error_type="device_transport", custom_error_message=NO_TRANSPORT
    ),
]
"""One `devices:` entry. Every member has device_id, kind, name, building, is_modbus,
profile, host, port, unit_id, poll_interval_s, restricted, gate_ids and ble."""


class SiteConfig(_Strict):
    site: SiteInfo
    mqtt: MqttConfig = MqttConfig()
    database: DatabaseConfig = DatabaseConfig()
    api: ApiConfig = ApiConfig()
    access: AccessConfig = AccessConfig()
    canteen: CanteenConfig = CanteenConfig()
    audit: AuditConfig = AuditConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    influxdb: InfluxConfig | None = None  # None: the local store only
    rules: RulesConfig = RulesConfig()
    home_assistant: HomeAssistantConfig = HomeAssistantConfig()
    buildings: list[BuildingConfig] = Field(default_factory=list)
    devices: list[DeviceConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_references(self) -> SiteConfig:
        """Checks across entries, each reported at the entry it is about.

        Raised as a ValidationError with the entry's key path (not one ValueError for the
        whole file) so check-config can name the line of the offending device.
        """
        problems: list[tuple[tuple[str | int, ...], str]] = []
        first_index: dict[str, int] = {}
        building_ids = {b.id for b in self.buildings}
        known = ", ".join(sorted(building_ids)) or "none defined under `buildings`"
        for i, device in enumerate(self.devices):
            first = first_index.setdefault(device.device_id, i)
            if first != i:
                problems.append((("devices", i, "device_id"),
                                 f"device_id {device.device_id!r} is used more than once "
                                 f"(first at devices.{first})"))
            if device.building is not None and device.building not in building_ids:
                problems.append((("devices", i, "building"),
                                 f"unknown building {device.building!r} (known: {known})"))
            if device.kind == "elevator" and device.building is None:
                problems.append((("devices", i, "building"), "an elevator needs `building`"))
        problems.extend(_serial_line_conflicts(self.devices))
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError(CROSS_REFERENCE, message), loc=loc,
                                 input=None)
                for loc, message in sorted(problems, key=lambda p: p[0][1])  # by entry
            ])
        return self

    def device(self, device_id: str) -> AnyDevice | None:
        return next((d for d in self.devices if d.device_id == device_id), None)

    @property
    def spool_directory(self) -> Path:
        """Where the telemetry spool lives: `telemetry.spool_dir`, else `spool/` beside the
        SQLite database file, else `./spool` (PostgreSQL, in-memory SQLite).

        Beside the database because that directory is the one an install already made
        writable, persistent and backed up for the gateway's state; the spool belongs there.
        """
        if self.telemetry.spool_dir is not None:
            return self.telemetry.spool_dir
        database = sqlite_file(self.database.url)
        return (database.parent if database is not None else Path(".")) / "spool"

    @property
    def audit_spill_directory(self) -> Path:
        """`audit.spill_dir`, else `audit-spill/` in the spool directory (where earlier
        versions put it, so a spill left by one is still replayed after an upgrade)."""
        if self.audit.spill_dir is not None:
            return self.audit.spill_dir
        return self.spool_directory / "audit-spill"


def _serial_line_conflicts(
    devices: list[AnyDevice],
) -> list[tuple[tuple[str | int, ...], str]]:
    """Units on one serial port share one line, opened once: its settings must agree."""
    lines: dict[str, tuple[int, ModbusRtuConfig]] = {}
    problems: list[tuple[tuple[str | int, ...], str]] = []
    names = ("baudrate", "parity", "stopbits", "bytesize")
    for i, device in enumerate(devices):
        if not isinstance(device, ModbusRtuConfig):
            continue
        j, first = lines.setdefault(device.port, (i, device))
        differ = [f"{name} {a} vs {b}" for name, a, b in
                  zip(names, first.line_settings, device.line_settings, strict=True) if a != b]
        if differ:
            problems.append((("devices", i, "port"),
                             f"serial port {device.port!r} is also used by devices.{j} "
                             f"({first.device_id}) with other line settings: "
                             f"{', '.join(differ)}"))
    return problems


class ConfigError(Exception):
    """A configuration that cannot run; `problems` lists one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map every key path in the YAML document to its 1-based line number."""
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                walk(value, child)
                lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    overrides: dict[tuple[str, ...], Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        # Secrets and names stay strings; other values may be YAML scalars (numbers, booleans).
        value: Any = raw if path in STRING_KEYS else yaml.safe_load(raw) if raw else raw
        overrides[path] = value
    return overrides


def _apply(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def parse_config(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> SiteConfig:
    environ = os.environ if environ is None else environ
    try:
        data = yaml.safe_load(text)
        lines = _line_index(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(source, [f"{where}not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["line 1: expected a mapping of sections (site, mqtt, ...)"])
    problems = [
        f"line {lines.get(path, '?')}: {'.'.join(path)}: secrets must come from the "
        f"environment ({ENV_PREFIX}{'__'.join(p.upper() for p in path)}), not the file"
        for path in SECRET_KEYS
        if isinstance(data.get(path[0]), dict) and path[1] in data[path[0]]
    ]
    if problems:
        raise ConfigError(source, problems)
    overrides = _env_overrides(environ)
    for path, value in overrides.items():
        _apply(data, path, value)
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc, lines, set(overrides))) from None


def _describe(
    exc: ValidationError, lines: dict[tuple[str | int, ...], int], from_env: set[tuple[str, ...]]
) -> list[str]:
    problems = []
    for error in exc.errors():
        path = _without_tags(tuple(error["loc"]))
        dotted = ".".join(str(p) for p in path) or "(top level)"
        section_env = sorted(_env_name(p) for p in from_env if path and p[0] == path[0])
        if tuple(str(p) for p in path) in from_env:
            where = f"env {_env_name(path)}"
        elif path and path[:1] not in lines and section_env:
            # A section the file lacks, made by the environment alone (a token left in the
            # service unit after `influxdb:` was removed): "line 1" would point nowhere.
            where = f"env {', '.join(section_env)}"
        else:
            known = next((path[:n] for n in range(len(path), -1, -1) if path[:n] in lines), ())
            where = f"line {lines.get(known, '?')}"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and indentation)"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "value_error":
            message = str(error["ctx"]["error"]) if "ctx" in error else message
        elif error["type"] == "model_type":
            message = f"expected a mapping of keys (got {error['input']!r})"
        elif error["type"] == CROSS_REFERENCE:
            pass  # the message names the value itself
        elif "input" in error and not isinstance(error["input"], dict | list):
            message = f"{message} (got {error['input']!r})"
        problems.append(f"{where}: {dotted}: {message}")
    return problems


def _env_name(path: tuple[str | int, ...]) -> str:
    return f"{ENV_PREFIX}{'__'.join(str(p).upper() for p in path)}"


def _without_tags(path: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """`devices.3.modbus_rtu.parity` -> `devices.3.parity`: the union member pydantic chose
    is not a key the operator wrote, and the line index knows only the keys in the file."""
    if len(path) >= 3 and path[0] == "devices" and path[2] in DEVICE_TAGS:
        return path[:2] + path[3:]
    return path


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> SiteConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    return parse_config(text, str(path), environ)




def file_problems(config: SiteConfig, path: str | Path) -> list[str]:
    """Files the site file names that cannot be used, each with its key and line.

    Separate from validation because it looks at this machine's disk: the gateway's child
    processes re-validate the config and must not fail on it, and a config is checked on a
    laptop before it is copied to the site. `scgw check-config` runs it on the gateway.
    Relative paths are from the working directory, as the gateway opens them.
    """
    try:
        lines = _line_index(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        lines = {}
    problems = []
    for i, name in enumerate(config.rules.files):
        rule_file = Path(name)
        if not rule_file.is_file():
            reason = "is not a file" if rule_file.exists() else "no such file"
            problems.append(f"line {lines.get(('rules', 'files', i), '?')}: rules.files.{i}: "
                            f"{reason}: {name!r} (relative to {Path.cwd()})")
    if not problems and config.rules.files:
        problems.extend(_rule_problems(config.rules.files))
    spool = config.spool_directory
    if spool.exists() and not spool.is_dir():
        key: tuple[str, ...] = (("telemetry", "spool_dir") if config.telemetry.spool_dir
                                else ("database", "url"))
        what = "" if key[0] == "telemetry" else " (the spool goes beside the SQLite database)"
        problems.append(f"line {lines.get(key, '?')}: {'.'.join(key)}: the spool directory "
                        f"{str(spool)!r} exists and is not a directory{what}")
    spill = config.audit_spill_directory
    if spill.exists() and not spill.is_dir():
        key = ("audit", "spill_dir") if config.audit.spill_dir else ("telemetry", "spool_dir")
        problems.append(f"line {lines.get(key, '?')}: {'.'.join(key)}: the audit spill "
                        f"directory {str(spill)!r} exists and is not a directory")
    return problems


def _rule_problems(files: list[str]) -> list[str]:
    """Every problem of the site's rule files (each names its file, line, rule and key)."""
    texts = []
    for name in files:
        try:
            texts.append((name, Path(name).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            return [f"{name}: cannot read: {exc}"]
    try:
        load_rule_files(texts)
    except RuleFileError as exc:
        return list(exc.problems)
    return []


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """What an operator command (db upgrade, import, canteen, audit) works on, and whence."""

    database_url: str
    timezone: str | None  # None only without a site file when the command needs no zone
    config: SiteConfig | None
    source: str  # the site file read, or "command line" when only overrides were given

    @property
    def site_id(self) -> str | None:
        return self.config.site.id if self.config is not None else None


def operator_settings(
    config_path: str | Path | None,
    *,
    database_url: str | None = None,
    timezone: str | None = None,
    need_timezone: bool = False,
    environ: Mapping[str, str] | None = None,
) -> OperatorSettings:
    """The site file's settings with the command line's overrides on top.

    There is deliberately no built-in database or time zone: a settlement run against a
    default SQLite file in the current directory, or counted in UTC, looks plausible and
    is wrong. So the site file is read (`config_path`, else ./site.yaml when it exists),
    and without one every needed value must be given explicitly, or ConfigError says what
    to give. An explicitly named site file that cannot be read or validated is an error even
    when overrides are given: the operator meant that site.
    """
    database_url, timezone = database_url or None, timezone or None
    path = Path(config_path if config_path is not None else DEFAULT_SITE_FILE)
    config: SiteConfig | None = None
    if config_path is not None or path.exists():
        config = load_config(path, environ)
    else:
        missing = ["--database-url"] if database_url is None else []
        if need_timezone and timezone is None:
            missing.append("--tz")
        if missing:
            raise ConfigError(str(path), [
                f"no such site file; give --config FILE, or {' and '.join(missing)}"
            ])
    if database_url is None:
        assert config is not None
        database_url = config.database.url
    if timezone is None and config is not None:
        timezone = config.site.timezone
    source = str(path) if config is not None else "command line"
    return OperatorSettings(database_url, timezone, config, source)
