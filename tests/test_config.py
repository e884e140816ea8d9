"""Site configuration: the example is valid; problems name the key, the line and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.app.cli import app
from gateway.config import (
    ConfigError,
    ModbusRtuConfig,
    ModbusTcpConfig,
    MqttDeviceConfig,
    load_config,
    parse_config,
)
from gateway.devices.modbus import device_specs

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
