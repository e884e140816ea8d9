"""Site configuration: the example is valid; problems name the key, the line and the fix."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.app.cli import app
from gateway.config import (
    ConfigError,
    ModbusRtuConfig,
    ModbusTcpConfig,
    MqttDeviceConfig,
    SiteConfig,
    load_config,
    parse_config,
)
from gateway.devices.modbus import device_specs
from simulators.demo import broker
from tests.servers import require

EXAMPLE = Path(__file__).parents[1] / "examples" / "site.yaml"


def test_example_site_is_valid() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.site.id == "maple-court"
    assert {d.kind for d in config.devices} >= {"gate", "elevator", "canteen", "meter"}
    assert config.mqtt.host == "127.0.0.1" and config.mqtt.port == 1883


def test_environment_overrides_file_values() -> None:
    env = {"SCGW__MQTT__URL": "mqtt://10.1.2.3:2883", "SCGW__API__PORT": "9001"}
    config = load_config(EXAMPLE, environ=env)
    assert (config.mqtt.host, config.mqtt.port, config.api.port) == ("10.1.2.3", 2883, 9001)


def test_secrets_come_only_from_the_environment() -> None:
    text = "site: {id: s}\napi:\n  jwt_secret: hunter2hunter2hunter2hunter2hunter2\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml", environ={})
    assert info.value.problems == [
        "line 3: api.jwt_secret: secrets must come from the environment "
        "(SCGW__API__JWT_SECRET), not the file"
    ]
    secret = "x" * 40
    config = parse_config("site: {id: s}\n", environ={"SCGW__API__JWT_SECRET": secret})
    assert config.api.jwt_secret is not None
    assert config.api.jwt_secret.get_secret_value() == secret
    assert secret not in repr(config)


def test_every_problem_is_reported_with_line_and_key() -> None:
    text = (
        "site:\n  id: Demo Site\n"  # line 2: bad id
        "mqtt:\n  url: http://broker\n"  # line 4: bad scheme
        "devices:\n"
        "  - {device_id: g1, kind: gatex}\n"  # line 6: bad kind
        "  - device_id: e1\n    kind: elevator\n    colour: red\n"  # line 9: unknown key
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml", environ={})
    problems = info.value.problems
    assert len(problems) == 4
    assert problems[0].startswith("line 2: site.id: String should match pattern")
    assert problems[1].startswith("line 4: mqtt.url:")
    assert problems[2].startswith("line 6: devices.0.kind: Input should be 'gate'")
    assert problems[3] == (
        "line 9: devices.1.colour: unknown key (check its spelling and indentation)"
    )


def test_bad_environment_value_is_attributed_to_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\n", environ={"SCGW__MQTT__KEEPALIVE_S": "1"})
    assert info.value.problems[0].startswith("env SCGW__MQTT__KEEPALIVE_S: mqtt.keepalive_s:")


def test_cross_references_are_checked() -> None:
    text = (
        "site: {id: s}\nbuildings: [{id: b1, floors: [{number: 1}]}]\n"
        "devices:\n  - {device_id: e1, kind: elevator, building: b9}\n"
        "  - {device_id: e1, kind: gate}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert info.value.problems == [
        "line 4: devices.0.building: unknown building 'b9' (known: b1)",
        "line 5: devices.1.device_id: device_id 'e1' is used more than once (first at "
        "devices.0)",
    ]


def test_modbus_device_needs_a_transport() -> None:
    text = "site: {id: s}\ndevices:\n  - {device_id: m1, kind: meter, profile: eastron-sdm630}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert info.value.problems == [
        "line 3: devices.0: a Modbus unit (it has `profile`) needs `host` (and `port`, default "
        "502) for Modbus TCP, or a serial device path as `port` for Modbus RTU"
    ]


def test_each_transport_is_its_own_member_with_its_own_keys() -> None:
    config = load_config(EXAMPLE, environ={})
    gate, erv, meter = (config.device(i) for i in ("lobby-b1", "erv-b1", "meter-main"))
    assert isinstance(gate, MqttDeviceConfig) and not gate.is_modbus
    assert gate.profile is None and gate.host is None and gate.ble is not None
    assert isinstance(erv, ModbusTcpConfig) and erv.is_modbus
    assert (erv.host, erv.port, erv.unit_id, erv.profile) == ("192.0.2.10", 502, 1, "fresh-air-erv")
    assert isinstance(meter, ModbusRtuConfig) and meter.host is None
    assert (meter.port, meter.baudrate, meter.parity, meter.stopbits, meter.bytesize) == (
        "/dev/ttyUSB0", 9600, "N", 1, 8)
    assert (meter.timeout_s, meter.retries) == (0.5, 3)
    assert not meter.restricted and not meter.gate_ids and meter.ble is None


def test_a_meter_without_a_profile_speaks_mqtt_itself() -> None:
    config = parse_config(
        "site: {id: s}\ndevices:\n  - {device_id: m1, kind: meter, name: Sub-meter}\n",
        environ={},
    )
    assert isinstance(config.devices[0], MqttDeviceConfig)
    assert not config.devices[0].is_modbus


def test_transport_errors_name_one_key_not_every_union_member() -> None:
    text = (
        "site: {id: s}\n"
        "devices:\n"
        "  - {device_id: g1, kind: gate}\n"  # 3
        "  - {device_id: m1, kind: meter, host: h, port: /dev/ttyUSB0, profile: p}\n"  # 4
        "  - device_id: m2\n"  # 5
        "    kind: meter\n"
        "    port: /dev/ttyUSB1\n"
        "    profile: p\n"
        "    parity: X\n"  # 9
        "    stopbits: 3\n"  # 10
        "    bytesize: 6\n"  # 11
        "  - {device_id: m3, kind: meter, host: h}\n"  # 12
        "  - {device_id: m4, kind: gate, host: h, profile: p}\n"  # 13
        "  - {device_id: m5, kind: meter, port: 502, profile: p}\n"  # 14
        "  - {device_id: m6, kind: meter, baudrate: 19200, profile: p}\n"  # 15
        "  - {device_id: c1, kind: canteen, ble: {}}\n"  # 16
        "  - {device_id: g2, kind: gate, poll_interval_s: 3}\n"  # 17
        "  - {device_id: m7, kind: meter, host: h, profile: p, timeout_s: 0}\n"  # 18
        "  - not a device\n"  # 19
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml", environ={})
    problems = info.value.problems
    assert problems == [
        "line 4: devices.1.port: a TCP port number (got '/dev/ttyUSB0'); a serial device path is"
        " for Modbus RTU, which has no `host`",
        "line 9: devices.2.parity: Input should be 'N', 'E' or 'O' (got 'X')",
        "line 10: devices.2.stopbits: Input should be 1 or 2 (got 3)",
        "line 11: devices.2.bytesize: Input should be 7 or 8 (got 6)",
        "line 12: devices.3.profile: required key is missing",
        "line 13: devices.4.kind: 'gate' is not polled over Modbus (one of air_purifier, "
        "fresh_air, hvac, meter); an MQTT device has no `profile`",
        "line 14: devices.5.host: required key is missing",
        "line 15: devices.6.port: required key is missing",
        "line 16: devices.7.ble: `ble` is for gate and elevator readers (this device is a "
        "'canteen')",
        "line 17: devices.8.poll_interval_s: unknown key (check its spelling and indentation)",
        "line 18: devices.9.timeout_s: Input should be greater than 0 (got 0)",
        "line 19: devices.10: expected a mapping of keys (got 'not a device')",
    ]


def test_units_on_one_serial_line_agree_on_its_settings() -> None:
    text = (
        "site: {id: s}\ndevices:\n"
        "  - {device_id: m1, kind: meter, port: /dev/ttyUSB1, profile: p, baudrate: 19200}\n"
        "  - {device_id: m2, kind: meter, port: /dev/ttyUSB1, profile: p, unit_id: 2}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert info.value.problems == [
        "line 4: devices.1.port: serial port '/dev/ttyUSB1' is also used by devices.0 (m1) "
        "with other line settings: baudrate 19200 vs 9600"
    ]


def test_every_rtu_setting_reaches_the_driver() -> None:
    """check-config accepting a parity the poller then ignores would poll with the wrong one."""
    config = parse_config(
        "site: {id: s}\ndevices:\n"
        "  - {device_id: g1, kind: gate}\n"
        "  - {device_id: m1, kind: meter, port: /dev/ttyUSB1, profile: p, unit_id: 7,"
        " baudrate: 19200, parity: O, stopbits: 2, bytesize: 7, timeout_s: 0.3, retries: 0,"
        " poll_interval_s: 2}\n"
        "  - {device_id: a1, kind: hvac, host: 10.0.0.9, profile: q, timeout_s: 2.5,"
        " retries: 4}\n",
        environ={},
    )
    rtu, tcp = device_specs(config)
    assert (rtu.device_id, rtu.host, rtu.port, rtu.unit_id, rtu.poll_interval_s) == (
        "m1", None, "/dev/ttyUSB1", 7, 2.0)
    assert (rtu.baudrate, rtu.parity, rtu.stopbits, rtu.bytesize) == (19200, "O", 2, 7)
    assert (rtu.timeout_s, rtu.retries) == (0.3, 0)
    assert rtu.endpoint.parity == "O" and rtu.endpoint.stopbits == 2
    assert (tcp.host, tcp.port, tcp.timeout_s, tcp.retries) == ("10.0.0.9", 502, 2.5, 4)


def test_unknown_time_zone_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s, timezone: Asia/Shangai}\n", environ={})
    assert info.value.problems[0].startswith("line 1: site.timezone: unknown IANA time zone")


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("site:\n  id: [unclosed\n", environ={})
    assert info.value.problems[0].startswith("line 3: not valid YAML")


def test_check_config_cli_exits_non_zero_and_lists_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: {id: s}\nmqtt: {root: 'a b'}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["check-config", str(bad)])
    assert result.exit_code == 1
    assert "line 2: mqtt.root" in result.output
    ok = runner.invoke(app, ["check-config", str(EXAMPLE)], env={"SCGW__MQTT__PASSWORD": ""})
    assert ok.exit_code == 0, ok.output


def test_check_config_loads_every_modbus_profile(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "site: {id: s}\ndevices:\n"
        "  - {device_id: m1, kind: meter, host: 127.0.0.1, port: 502, profile: eastron-sdm630}\n"
        "  - {device_id: m2, kind: meter, host: 127.0.0.1, port: 502, profile: no-such-meter}\n"
    )
    result = CliRunner().invoke(app, ["check-config", str(site)])
    assert result.exit_code == 1
    assert "device m2: profile 'no-such-meter'" in result.output
    assert "m1" not in result.output


# --- telemetry, influxdb and rules (CONTRACT.md section 4) -------------------------------

FULL_TELEMETRY = """\
site: {id: s}
database: {url: 'sqlite:////var/lib/scgw/scgw.db'}
telemetry:
  spool_dir: /data/spool
  spool_max_mb: 64
  fsync_interval_s: 0.5
  local_retention_days: 90
influxdb:
  url: http://influx-host:8086/
  api: v1
  database: community
  username: scgw
rules:
  files: [rules/energy.yaml, rules/doors.yaml]
"""


def test_telemetry_influxdb_and_rules_keys_parse() -> None:
    config = parse_config(FULL_TELEMETRY, environ={"SCGW__INFLUXDB__PASSWORD": "pw-1234"})
    telemetry = config.telemetry
    assert (telemetry.spool_dir, telemetry.spool_max_mb, telemetry.fsync_interval_s,
            telemetry.local_retention_days) == (Path("/data/spool"), 64, 0.5, 90)
    assert telemetry.spool_max_bytes == 64 << 20
    assert config.spool_directory == Path("/data/spool")
    influx = config.influxdb
    assert influx is not None
    assert (influx.url, influx.api, influx.database, influx.username) == (
        "http://influx-host:8086", "v1", "community", "scgw")
    assert (influx.org, influx.bucket, influx.token) == (None, None, None)
    assert influx.password is not None and influx.password.get_secret_value() == "pw-1234"
    assert "pw-1234" not in repr(config) and "pw-1234" not in str(config)
    assert config.rules.files == ["rules/energy.yaml", "rules/doors.yaml"]


def test_defaults_when_the_sections_are_absent() -> None:
    config = parse_config("site: {id: s}\n", environ={})
    assert config.influxdb is None  # local store only
    assert (config.telemetry.spool_dir, config.telemetry.spool_max_mb,
            config.telemetry.fsync_interval_s, config.telemetry.local_retention_days) == (
        None, 512, 1.0, 30)
    assert config.rules.files == []


def test_v2_needs_org_and_its_bucket_defaults_to_the_database() -> None:
    text = "site: {id: s}\ninfluxdb:\n  url: https://eu.example.com\n  api: v2\n  org: maple\n"
    config = parse_config(text, environ={"SCGW__INFLUXDB__TOKEN": "tok-abc=="})
    influx = config.influxdb
    assert influx is not None
    assert (influx.api, influx.org, influx.bucket, influx.database) == (
        "v2", "maple", "scgw", "scgw")
    assert influx.token is not None and influx.token.get_secret_value() == "tok-abc=="
    assert "tok-abc" not in repr(config)
    named = parse_config(text + "  bucket: energy\n  database: ignored-on-v2\n", environ={})
    assert named.influxdb is not None and named.influxdb.bucket == "energy"
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\ninfluxdb:\n  url: http://h:8086\n  api: v2\n", environ={})
    assert info.value.problems == [
        "line 2: influxdb.org: api v2 needs `org`, the InfluxDB organisation to write to"]


@pytest.mark.parametrize(("key_lines", "expected"), [
    ("  spool_dir: ''\n", "line 3: telemetry.spool_dir: a directory path (or leave the key out:"
     " beside the database)"),
    ("  spool_max_mb: 0\n", "line 3: telemetry.spool_max_mb: Input should be greater than or"
     " equal to 1 (got 0)"),
    ("  spool_max_mb: lots\n", "line 3: telemetry.spool_max_mb: Input should be a valid integer,"
     " unable to parse string as an integer (got 'lots')"),
    ("  fsync_interval_s: 0\n", "line 3: telemetry.fsync_interval_s: Input should be greater"
     " than 0 (got 0)"),
    ("  fsync_interval_s: 61\n", "line 3: telemetry.fsync_interval_s: Input should be less than"
     " or equal to 60 (got 61)"),
    ("  local_retention_days: 0\n", "line 3: telemetry.local_retention_days: Input should be"
     " greater than or equal to 1 (got 0)"),
    ("  local_retention_days: 3651\n", "line 3: telemetry.local_retention_days: Input should be"
     " less than or equal to 3650 (got 3651)"),
    ("  spool_size: 5\n", "line 3: telemetry.spool_size: unknown key (check its spelling and"
     " indentation)"),
])
def test_bad_telemetry_values_name_key_and_line(key_lines: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\ntelemetry:\n" + key_lines, environ={})
    assert info.value.problems == [expected]


@pytest.mark.parametrize(("key_lines", "expected"), [
    ("  url: ftp://h:8086\n", "line 3: influxdb.url: an http:// or https:// URL of the server,"
     " e.g. http://influx-host:8086"),
    ("  url: influx-host:8086\n", "line 3: influxdb.url: an http:// or https:// URL of the"
     " server, e.g. http://influx-host:8086"),
    ("  url: http://h:99999\n", "line 3: influxdb.url: an http(s) URL, e.g."
     " http://influx-host:8086 (Port out of range 0-65535)"),
    ("  url: http://scgw:pw@h:8086\n", "line 3: influxdb.url: credentials do not go in the URL:"
     " set `username` and SCGW__INFLUXDB__PASSWORD (v1), or SCGW__INFLUXDB__TOKEN (v2)"),
    ("  url: http://h:8086/?db=scgw\n", "line 3: influxdb.url: a server URL without `?` query"
     " or `#` fragment, e.g. http://influx-host:8086"),
    ("  url: http://h\n  api: v3\n", "line 4: influxdb.api: Input should be 'v1' or 'v2'"
     " (got 'v3')"),
    ("  url: http://h\n  database: ''\n", "line 4: influxdb.database: String should have at"
     " least 1 character (got '')"),
    ("  url: http://h\n  org: maple\n", "line 4: influxdb.org: `org` is for api v2"
     " (influxdb-client); api v1 writes to `database` with username/password"),
    ("  url: http://h\n  bucket: scgw\n", "line 4: influxdb.bucket: `bucket` is for api v2"
     " (influxdb-client); api v1 writes to `database` with username/password (on InfluxDB 1.x"
     " the bucket is the database)"),
    ("  url: http://h\n  api: v2\n  org: o\n  username: u\n", "line 6: influxdb.username:"
     " `username` is for api v1; api v2 authenticates with SCGW__INFLUXDB__TOKEN"),
    ("  api: v1\n", "line 2: influxdb.url: required key is missing"),
])
def test_bad_influxdb_values_name_key_and_line(key_lines: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\ninfluxdb:\n" + key_lines, environ={})
    assert info.value.problems == [expected]


def test_bad_rule_files_name_key_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\nrules:\n  files:\n    - a.yaml\n    - ''\n", environ={})
    assert info.value.problems == [
        "line 5: rules.files.1: String should have at least 1 character (got '')"]
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\nrules:\n  files: [a.yaml, b.yaml, a.yaml]\n", environ={})
    assert info.value.problems == ["line 3: rules.files: listed more than once: a.yaml"]


@pytest.mark.parametrize("key", ["token", "password"])
def test_influxdb_secrets_in_the_file_are_refused(key: str) -> None:
    text = f"site: {{id: s}}\ninfluxdb:\n  url: http://h:8086\n  {key}: s3cret-value\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml", environ={})
    assert info.value.problems == [
        f"line 4: influxdb.{key}: secrets must come from the environment "
        f"(SCGW__INFLUXDB__{key.upper()}), not the file"]
    assert "s3cret-value" not in str(info.value)


def test_influxdb_keys_from_the_environment() -> None:
    env = {"SCGW__INFLUXDB__URL": "http://10.0.0.7:8086", "SCGW__INFLUXDB__USERNAME": "0123",
           "SCGW__INFLUXDB__PASSWORD": "007", "SCGW__TELEMETRY__SPOOL_MAX_MB": "2048",
           "SCGW__TELEMETRY__SPOOL_DIR": "/srv/spool", "SCGW__RULES__FILES": "[x.yaml]"}
    config = parse_config(FULL_TELEMETRY, environ=env)
    influx = config.influxdb
    assert influx is not None
    # A user name and a password stay strings: `0123` is not the number 123.
    assert (influx.url, influx.username) == ("http://10.0.0.7:8086", "0123")
    assert influx.password is not None and influx.password.get_secret_value() == "007"
    assert (config.telemetry.spool_max_mb, config.spool_directory) == (2048, Path("/srv/spool"))
    assert config.rules.files == ["x.yaml"]
    # The environment alone can configure InfluxDB.
    only_env = parse_config("site: {id: s}\n", environ={
        "SCGW__INFLUXDB__URL": "http://h:8086", "SCGW__INFLUXDB__API": "v2",
        "SCGW__INFLUXDB__ORG": "o", "SCGW__INFLUXDB__TOKEN": "t"})
    assert only_env.influxdb is not None and only_env.influxdb.bucket == "scgw"


def test_bad_influxdb_environment_is_attributed_to_the_variables() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(FULL_TELEMETRY, environ={"SCGW__INFLUXDB__TOKEN": "t"})
    assert info.value.problems == [
        "env SCGW__INFLUXDB__TOKEN: influxdb.token: a token is for api v2 (influxdb-client); "
        "api v1 writes to `database` with username/password (SCGW__INFLUXDB__PASSWORD)"]
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\ninfluxdb: {url: 'http://h'}\n",
                     environ={"SCGW__INFLUXDB__PASSWORD": "p"})
    assert info.value.problems == [
        "env SCGW__INFLUXDB__PASSWORD: influxdb.password: a password needs `username` (in the "
        "file or SCGW__INFLUXDB__USERNAME)"]
    # A token left in the service unit after `influxdb:` left the file: the variable is named.
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\n", environ={"SCGW__INFLUXDB__TOKEN": "t",
                                                 "SCGW__INFLUXDB__API": "v2"})
    assert info.value.problems[0] == (
        "env SCGW__INFLUXDB__API, SCGW__INFLUXDB__TOKEN: influxdb.url: required key is missing")
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\n", environ={"SCGW__TELEMETRY__FSYNC_INTERVAL_S": "0"})
    assert info.value.problems[0].startswith(
        "env SCGW__TELEMETRY__FSYNC_INTERVAL_S: telemetry.fsync_interval_s: Input should be")


@pytest.mark.parametrize(("database_url", "spool"), [
    ("sqlite:////var/lib/scgw/scgw.db", "/var/lib/scgw/spool"),
    ("sqlite:///scgw.db", "spool"),
    ("sqlite:///data/scgw.db?timeout=5", "data/spool"),
    ("sqlite+pysqlite:////srv/g.db", "/srv/spool"),
    ("sqlite://", "spool"),
    ("sqlite:///:memory:", "spool"),
    ("postgresql+psycopg://scgw@db-host/scgw", "spool"),
])
def test_the_spool_defaults_to_beside_the_database(database_url: str, spool: str) -> None:
    config = parse_config(f"site: {{id: s}}\ndatabase: {{url: '{database_url}'}}\n", environ={})
    assert config.spool_directory == Path(spool)


def test_config_survives_the_trip_to_the_telemetry_worker() -> None:
    """The worker child re-validates the config from JSON with secrets revealed: the
    defaults the validators fill in (v2 bucket) must validate again unchanged."""
    import json

    from pydantic import BaseModel, SecretStr

    def plain(value: object) -> object:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, BaseModel):
            return {name: plain(getattr(value, name)) for name in type(value).model_fields}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    for text, env in [
        (FULL_TELEMETRY, {"SCGW__INFLUXDB__PASSWORD": "pw"}),
        ("site: {id: s}\ninfluxdb: {url: 'http://h', api: v2, org: o}\n",
         {"SCGW__INFLUXDB__TOKEN": "t"}),
    ]:
        config = parse_config(text, environ=env)
        again = SiteConfig.model_validate(json.loads(json.dumps(plain(config))))
        assert again == config


def test_check_config_checks_rule_files_and_summarises_telemetry(tmp_path: Path) -> None:
    rules = tmp_path / "energy.yaml"
    rules.write_text("rules: []\n")
    site = tmp_path / "site.yaml"
    site.write_text(
        "site: {id: s}\n"
        f"database: {{url: 'sqlite:///{tmp_path}/scgw.db'}}\n"
        "influxdb:\n  url: http://influx-host:8086\n  username: scgw\n"
        f"rules:\n  files:\n    - {rules}\n    - {tmp_path}/missing.yaml\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["check-config", str(site)], env={"SCGW__INFLUXDB__PASSWORD": "pw"})
    assert result.exit_code == 1
    assert f"line 9: rules.files.1: no such file: '{tmp_path}/missing.yaml'" in result.output
    site.write_text(site.read_text().replace(f"    - {tmp_path}/missing.yaml\n", ""))
    (tmp_path / "spool").write_text("not a directory")
    result = runner.invoke(app, ["check-config", str(site)], env={"SCGW__INFLUXDB__PASSWORD": "pw"})
    assert result.exit_code == 1
    assert (f"line 2: database.url: the spool directory '{tmp_path}/spool' exists and is not a "
            "directory") in result.output
    (tmp_path / "spool").unlink()
    result = runner.invoke(app, ["check-config", str(site)],
                           env={"SCGW__INFLUXDB__PASSWORD": "pw-secret"})
    assert result.exit_code == 0, result.output
    assert (f"spool {tmp_path}/spool (max 512 MB, fsync every 1 s), local store 30 d; "
            "InfluxDB v1 http://influx-host:8086 database scgw (user scgw)") in result.output
    assert "pw-secret" not in result.output


# --- the Mosquitto configuration the project ships (docs/deploy-mqtt.md) -----------------

DEPLOY_MOSQUITTO = Path(__file__).parents[1] / "deploy" / "mosquitto" / "mosquitto.conf"


def _conf_settings(text: str) -> dict[str, str]:
    settings = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            settings[key] = value
    return settings


def test_shipped_mosquitto_conf_keeps_a_gateway_restart_of_readings() -> None:
    settings = _conf_settings(DEPLOY_MOSQUITTO.read_text())
    assert settings["allow_anonymous"] == "false"
    assert settings["set_tcp_nodelay"] == "true"
    assert settings["persistence"] == "true" and settings["persistence_location"].endswith("/")
    assert int(settings["max_queued_messages"]) >= 100_000  # Mosquitto's default is 1000
    assert 0 < int(settings["max_queued_bytes"]) <= 1 << 30  # bounded
    assert settings["queue_qos0_messages"] == "true"
    assert int(settings["max_inflight_messages"]) > 20
    assert {"password_file", "acl_file", "listener"} <= settings.keys()
    test_broker = _conf_settings(broker.MOSQUITTO_CONF.format(port=1, host="h"))
    for key in ("set_tcp_nodelay", "max_queued_messages", "max_queued_bytes",
                "queue_qos0_messages", "max_inflight_messages"):
        assert test_broker[key] == settings[key], key  # the tests measure what sites run


def _run_quietly(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=30)


def test_shipped_mosquitto_conf_is_accepted_by_mosquitto(tmp_path: Path) -> None:
    """Mosquitto refuses a whole file for one unknown or misspelt option: start it for real,
    with the placeholders pointed at files made here, and log in through the ACL."""
    binary = broker.mosquitto_binary()
    require(binary is not None and shutil.which("mosquitto_passwd") is not None
            and shutil.which("mosquitto_sub") is not None, "mosquitto, mosquitto-clients")
    assert binary is not None
    port = broker.free_port()
    (tmp_path / "data").mkdir()
    _run_quietly("mosquitto_passwd", "-c", "-b", str(tmp_path / "passwd"), "gw", "gw-pass")
    (tmp_path / "acl").write_text("user gw\ntopic readwrite scgw/#\n")
    text = DEPLOY_MOSQUITTO.read_text()
    for old, new in (("listener 1883\n", f"listener {port} 127.0.0.1\n"),
                     ("/etc/mosquitto/scgw/", f"{tmp_path}/"),
                     ("/var/lib/mosquitto/", f"{tmp_path}/data/")):
        assert old in text
        text = text.replace(old, new)
    text += f"user {pwd.getpwuid(os.getuid()).pw_name}\n"  # as root: keep the temp dir's owner
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    log = (tmp_path / "log").open("wb")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    try:
        broker.wait_for_port("127.0.0.1", port)
        common = ["-h", "127.0.0.1", "-p", str(port), "-t", "scgw/x", "-W", "5"]
        subprocess.run(["mosquitto_pub", *common[:6], "-m", "hello", "-r", "-u", "gw", "-P",
                        "gw-pass"], check=True, timeout=30)
        got = subprocess.run(["mosquitto_sub", *common, "-C", "1", "-u", "gw", "-P", "gw-pass"],
                             capture_output=True, timeout=30)
        assert got.stdout == b"hello\n", (got, (tmp_path / "log").read_text())
        anonymous = subprocess.run(["mosquitto_sub", *common, "-C", "1"], capture_output=True,
                                   timeout=30)
        assert anonymous.returncode != 0  # allow_anonymous false
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    assert process.returncode == 0, (tmp_path / "log").read_text()
    assert (tmp_path / "data" / "mosquitto.db").exists()  # persistence saved on shutdown


def test_test_broker_queues_readings_across_a_gateway_and_broker_restart(
    own_mosquitto: broker.Mosquitto,
) -> None:
    """What the persistent telemetry session relies on: 20,000 readings (20x Mosquitto's
    default queue) published while the subscriber is away all arrive, even after the broker
    itself restarted in between."""
    require(shutil.which("mosquitto_sub") is not None, "mosquitto-clients")
    where = ["-h", own_mosquitto.host, "-p", str(own_mosquitto.port), "-V", "mqttv5"]
    session = [*where, "-i", "gw-telemetry", "-c", "-x", "3600", "-q", "1", "-t", "q/#"]
    _run_quietly("mosquitto_sub", *session, "-E")  # establish the session, then go away
    lines = "".join(f'{{"seq": {n}}}\n' for n in range(20_000))
    subprocess.run(["mosquitto_pub", *where, "-q", "1", "-t", "q/devices/m1/telemetry", "-l"],
                   input=lines.encode(), check=True, timeout=60)
    own_mosquitto.stop()
    own_mosquitto.start()
    got = subprocess.run(["mosquitto_sub", *session, "-C", "20000", "-W", "30"],
                         capture_output=True, timeout=60)
    received = got.stdout.decode().splitlines()
    assert len(received) == 20_000, got.stderr
    assert received == lines.splitlines()  # all of them, in order


# --- issue 11: offline-window slack and the audit log's spill and sync ----------------------


def test_trust_keys_default_and_parse(tmp_path: Path) -> None:
    config = parse_config(f"site: {{id: s}}\ndatabase: {{url: 'sqlite:///{tmp_path}/g.db'}}\n",
                          environ={})
    assert config.canteen.offline_window_slack_s == 120.0
    assert config.audit.fsync_each_commit is False
    assert config.audit_spill_directory == tmp_path / "spool" / "audit-spill"
    set_ = parse_config("site: {id: s}\ncanteen:\n  offline_window_slack_s: 30\naudit:\n"
                        f"  spill_dir: {tmp_path}/spill\n  fsync_each_commit: true\n",
                        environ={"SCGW__CANTEEN__OFFLINE_WINDOW_SLACK_S": "45"})
    assert set_.canteen.offline_window_slack_s == 45.0  # the environment wins
    assert set_.audit_spill_directory == tmp_path / "spill"
    assert set_.audit.fsync_each_commit is True


@pytest.mark.parametrize(("text", "expected"), [
    ("canteen:\n  offline_window_slack_s: -1\n", "line 3: canteen.offline_window_slack_s: Input"
     " should be greater than or equal to 0 (got -1)"),
    ("canteen:\n  offline_window_slack_s: 7200\n", "line 3: canteen.offline_window_slack_s:"
     " Input should be less than or equal to 3600 (got 7200)"),
    ("audit:\n  spill_dir: ''\n", "line 3: audit.spill_dir: a directory path (or leave the key"
     " out: beside the spool)"),
    ("audit:\n  fsync_each_commit: often\n", "line 3: audit.fsync_each_commit: Input should be"
     " a valid boolean, unable to interpret input (got 'often')"),
    ("audit:\n  spill: /tmp\n", "line 3: audit.spill: unknown key (check its spelling and"
     " indentation)"),
])
def test_bad_trust_values_name_key_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("site: {id: s}\n" + text, environ={})
    assert info.value.problems == [expected]


def test_check_config_refuses_an_audit_spill_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    site = tmp_path / "site.yaml"
    site.write_text(f"site: {{id: s}}\ndatabase: {{url: 'sqlite:///{tmp_path}/g.db'}}\n"
                    f"audit:\n  spill_dir: {tmp_path}/taken\n")
    result = CliRunner().invoke(app, ["check-config", str(site)])
    assert result.exit_code == 1
    assert (f"line 4: audit.spill_dir: the audit spill directory '{tmp_path}/taken' exists and"
            " is not a directory") in result.output


def test_trust_keys_reach_the_components(tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    from gateway.access.audit import AuditLog
    from gateway.canteen.offline_windows import OfflineWindows

    config = parse_config("site: {id: s}\ncanteen:\n  offline_window_slack_s: 30\naudit:\n"
                          f"  spill_dir: {tmp_path}/spill\n  fsync_each_commit: true\n",
                          environ={})
    engine = create_engine(f"sqlite:///{tmp_path}/g.db")
    try:
        audit = AuditLog.from_config(engine, config)
        assert audit.fsync_each_commit is True
        assert audit._spill is not None and audit._spill.path.parent == tmp_path / "spill"
        assert OfflineWindows.from_config(engine, config).slack_s == 30.0
    finally:
        engine.dispose()
