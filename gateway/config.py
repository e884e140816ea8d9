"""Site configuration: a YAML file validated by pydantic, overridden by the environment.

Every problem is reported at once with its key path, the YAML line it came from and what
was expected, because the person reading it is in a machine room with a broken gateway.
Secrets (broker password, JWT signing key) come only from the environment
(`SCGW__MQTT__PASSWORD`, `SCGW__API__JWT_SECRET`); a secret found in the file is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from device_drivers.vocabulary import DEVICE_ID_PATTERN, MODBUS_KINDS, DeviceKind

ENV_PREFIX = "SCGW__"
SECRET_KEYS = {("mqtt", "password"), ("api", "jwt_secret")}



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteInfo(_Strict):
    id: str = Field(pattern=DEVICE_ID_PATTERN)
    name: str = ""
    timezone: str = "UTC"


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
    token_ttl_s: int = Field(default=3600, ge=60, le=86400)


class AccessConfig(_Strict):
    unlock_duration_s: int = Field(default=5, ge=1, le=60)


class CanteenConfig(_Strict):
    offline_limit_per_card_cents: int = Field(default=5000, ge=0)
    offline_limit_per_terminal_cents: int = Field(default=200000, ge=0)


class FloorConfig(_Strict):
    number: int
    name: str = ""
    public: bool = False


class BuildingConfig(_Strict):
    id: str = Field(pattern=DEVICE_ID_PATTERN)
    name: str = ""
    floors: list[FloorConfig] = Field(min_length=1)

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


class DeviceConfig(_Strict):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    kind: DeviceKind
    name: str = ""
    building: str | None = None
    # Gates: a restricted gate (gym, machine room) opens only through an access group or a
    # visitor pass; gate_ids are the names groups and passes use (default: the device id).
    restricted: bool = False
    gate_ids: list[str] = Field(default_factory=list)
    # Modbus units (kinds hvac, fresh_air, air_purifier, meter) polled by the gateway:
    host: str | None = None
    port: int | str | None = None  # TCP port, or a serial device path for RTU
    unit_id: int = Field(default=1, ge=0, le=247)
    profile: str | None = None
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    baudrate: int = 9600
    ble: BleReaderConfig | None = None

    @property
    def is_modbus(self) -> bool:
        return self.profile is not None

    @model_validator(mode="after")
    def _modbus_fields(self) -> DeviceConfig:
        if self.ble is not None and self.kind not in ("gate", "elevator"):
            raise ValueError("`ble` is for gate and elevator readers")
        if (self.restricted or self.gate_ids) and self.kind != "gate":
            raise ValueError("`restricted` and `gate_ids` are for gates")
        if self.profile is None:
            return self
        if self.kind not in MODBUS_KINDS:
            raise ValueError(f"kind {self.kind!r} is not a Modbus kind ({sorted(MODBUS_KINDS)})")
        if self.port is None:
            raise ValueError("a Modbus device needs `port` (TCP port or serial device path)")
        if isinstance(self.port, int) and self.host is None:
            raise ValueError("a Modbus TCP device needs `host`")
        return self


class SiteConfig(_Strict):
    site: SiteInfo
    mqtt: MqttConfig = MqttConfig()
    database: DatabaseConfig = DatabaseConfig()
    api: ApiConfig = ApiConfig()
    access: AccessConfig = AccessConfig()
    canteen: CanteenConfig = CanteenConfig()
    buildings: list[BuildingConfig] = Field(default_factory=list)
    devices: list[DeviceConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_references(self) -> SiteConfig:
        problems = []
        ids = [d.device_id for d in self.devices]
        for dup in sorted({i for i in ids if ids.count(i) > 1}):
            problems.append(f"device_id {dup!r} is used more than once")
        building_ids = {b.id for b in self.buildings}
        for device in self.devices:
            if device.building is not None and device.building not in building_ids:
                problems.append(
                    f"device {device.device_id!r} names unknown building {device.building!r}"
                    f" (known: {sorted(building_ids)})"
                )
            if device.kind == "elevator" and device.building is None:
                problems.append(f"elevator {device.device_id!r} needs `building`")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def device(self, device_id: str) -> DeviceConfig | None:
        return next((d for d in self.devices if d.device_id == device_id), None)


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
        # Secrets stay strings; other values may be YAML scalars (numbers, booleans).
        value: Any = raw if path in SECRET_KEYS else yaml.safe_load(raw) if raw else raw
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
        path = tuple(error["loc"])
        dotted = ".".join(str(p) for p in path) or "(top level)"
        if tuple(str(p) for p in path) in from_env:
            where = f"env {ENV_PREFIX}{'__'.join(str(p).upper() for p in path)}"
        else:
            known = next((path[:n] for n in range(len(path), -1, -1) if path[:n] in lines), ())
            where = f"line {lines.get(known, '?')}"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and indentation)"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif "input" in error and not isinstance(error["input"], dict | list):
            message = f"{message} (got {error['input']!r})"
        problems.append(f"{where}: {dotted}: {message}")
    return problems


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> SiteConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    return parse_config(text, str(path), environ)


