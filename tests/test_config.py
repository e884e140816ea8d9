"""Site configuration: the example is valid; problems name the key, the line and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.app.cli import app
from gateway.config import ConfigError, load_config, parse_config

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
    text_all = " ".join(info.value.problems)
    assert "device_id 'e1' is used more than once" in text_all
    assert "unknown building 'b9'" in text_all


def test_modbus_device_needs_a_port() -> None:
    text = "site: {id: s}\ndevices:\n  - {device_id: m1, kind: meter, profile: eastron-sdm630}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert info.value.problems == [
        "line 3: devices.0: Value error, a Modbus device needs `port` (TCP port or serial "
        "device path)"
    ]


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
