"""What the telemetry worker needs of the site file, as plain data.

Why not `SiteConfig` itself: the worker is a process of its own, and pydantic with the site
model is about 10 MB of the worker's memory (issue 9's budget is for both processes). The
gateway validates the site file; it hands the worker this projection of it as JSON on stdin
(secrets included: a pipe, never a command line or the environment), and the worker reads it
back with no second validation. `scgw rules replay` builds the same view, so a replay
evaluates rules against exactly the calendars and devices the live worker uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from gateway.config import SiteConfig


class WorkerConfigError(ValueError):
    """The JSON on stdin is not a worker configuration; says which key and what was found."""


@dataclass(frozen=True, slots=True)
class MqttLink:
    host: str
    port: int
    root: str
    tls: bool
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 30
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class InfluxTarget:
    url: str
    api: Literal["v1", "v2"]
    database: str
    org: str | None = None
    bucket: str | None = None
    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    device_id: str
    kind: str
    building: str | None = None
    is_modbus: bool = False


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    site_id: str
    mqtt: MqttLink
    database_url: str = field(repr=False)  # a PostgreSQL URL may hold a password
    spool_dir: str
    spool_max_bytes: int = 512 << 20
    fsync_interval_s: float = 1.0
    local_retention_days: int = 30
    recycle_growth_mb: float = 8.0
    devices: tuple[DeviceEntry, ...] = ()
    influxdb: InfluxTarget | None = None
    rule_files: tuple[str, ...] = ()
    timezone: str = "UTC"
    site_calendar: dict[str, Any] | None = None
    building_calendars: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_site(cls, config: SiteConfig) -> WorkerConfig:
        mqtt, influx = config.mqtt, config.influxdb
        return cls(
            site_id=config.site.id,
            mqtt=MqttLink(
                host=mqtt.host, port=mqtt.port, root=mqtt.root, tls=mqtt.tls, url=mqtt.url,
                username=mqtt.username,
                password=mqtt.password.get_secret_value() if mqtt.password else None,
                keepalive_s=mqtt.keepalive_s, reconnect_min_s=mqtt.reconnect_min_s,
                reconnect_max_s=mqtt.reconnect_max_s),
            database_url=config.database.url,
            spool_dir=str(config.spool_directory),
            spool_max_bytes=config.telemetry.spool_max_bytes,
            fsync_interval_s=config.telemetry.fsync_interval_s,
            local_retention_days=config.telemetry.local_retention_days,
            recycle_growth_mb=config.telemetry.worker_recycle_mb,
            devices=tuple(DeviceEntry(d.device_id, d.kind, d.building, d.is_modbus)
                          for d in config.devices),
            influxdb=None if influx is None else InfluxTarget(
                url=influx.url, api=influx.api, database=influx.database, org=influx.org,
                bucket=influx.bucket,
                token=influx.token.get_secret_value() if influx.token else None,
                username=influx.username,
                password=influx.password.get_secret_value() if influx.password else None),
            rule_files=tuple(config.rules.files),
            timezone=config.site.timezone,
            site_calendar=config.site.calendar,
            building_calendars={b.id: b.calendar for b in config.buildings
                                if b.calendar is not None},
        )

    def to_json(self) -> str:
        """For the worker's stdin only: the secrets are in it."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerConfig:
        """Raises WorkerConfigError naming the key; never echoes values (secrets)."""
        try:
            data = json.loads(text)
        except ValueError:
            raise WorkerConfigError("not JSON") from None
        if not isinstance(data, dict):
            raise WorkerConfigError(f"expected an object, found {type(data).__name__}")
        try:
            influx = data.pop("influxdb", None)
            return cls(
                mqtt=MqttLink(**_mapping(data.pop("mqtt"), "mqtt")),
                devices=tuple(DeviceEntry(**_mapping(d, "devices[]"))
                              for d in data.pop("devices", ())),
                influxdb=None if influx is None else InfluxTarget(**_mapping(influx,
                                                                             "influxdb")),
                rule_files=tuple(data.pop("rule_files", ())),
                **data)
        except KeyError as exc:
            raise WorkerConfigError(f"missing key {exc.args[0]!r}") from None
        except TypeError as exc:  # an unknown or missing keyword: the message names it
            raise WorkerConfigError(str(exc).split(".", 1)[-1]) from None


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WorkerConfigError(f"{key}: expected an object, found {type(value).__name__}")
    return value
