"""`scgw systemd-unit`: a unit systemd accepts, hardened, and the copy in deploy/ in sync."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from gateway.app.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _unit(*args: str) -> str:
    result = CliRunner().invoke(app, ["systemd-unit", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _parse(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


def test_the_deploy_copy_is_the_generated_default() -> None:
    assert (ROOT / "deploy" / "systemd" / "scgw.service").read_text() == _unit()


def test_unit_runs_the_site_hardened_with_secrets_from_an_environment_file() -> None:
    unit = _parse(_unit("--user", "gw", "--config", "/etc/scgw/north.yaml",
                        "--data-dir", "/var/lib/scgw-north"))
    service = unit["Service"]
    assert service["Type"] == "exec" and service["Restart"] == "on-failure"
    assert service["User"] == "gw"
    assert service["ExecStart"] == "/opt/scgw/bin/scgw run --config /etc/scgw/north.yaml"
    assert service["EnvironmentFile"] == "/etc/scgw/scgw.env"
    assert service["ReadWritePaths"] == "/var/lib/scgw-north"
    assert service["StateDirectory"] == "scgw-north"
    assert service["WorkingDirectory"] == "/var/lib/scgw-north"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes",
                       "CapabilityBoundingSet": ""}.items():
        assert service[key] == value, key
    assert int(service["LimitNOFILE"]) >= 65536
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_a_data_dir_outside_var_lib_is_writable_without_state_directory() -> None:
    service = _parse(_unit("--data-dir", "/srv/scgw"))["Service"]
    assert service["ReadWritePaths"] == "/srv/scgw" and "StateDirectory" not in service


def test_relative_paths_are_refused() -> None:
    result = CliRunner().invoke(app, ["systemd-unit", "--data-dir", "data"])
    assert result.exit_code == 2
    assert "--data-dir data: systemd needs an absolute path" in result.output


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys, bad values and a missing binary are errors."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # no systemd on this machine: the parse tests above still ran
        return
    scgw = Path(sys.executable).parent / "scgw"
    unit = tmp_path / "scgw.service"
    unit.write_text(_unit("--exec", str(scgw), "--data-dir", str(tmp_path / "data")))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "scgw.service" not in done.stderr, done.stderr  # no warnings about the unit


def test_the_backup_timer_runs_scgw_db_backup_nightly(tmp_path: Path) -> None:
    service = (ROOT / "deploy" / "systemd" / "scgw-backup.service").read_text()
    timer = (ROOT / "deploy" / "systemd" / "scgw-backup.timer").read_text()
    parsed = _parse(service)["Service"]
    assert parsed["Type"] == "oneshot" and "scgw db backup --config" in parsed["ExecStart"]
    assert parsed["ReadWritePaths"] == "/var/backups/scgw"
    assert _parse(timer)["Timer"]["Persistent"] == "true"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    scgw = str(Path(sys.executable).parent / "scgw")
    (tmp_path / "scgw-backup.service").write_text(service.replace("/opt/scgw/bin/scgw", scgw))
    (tmp_path / "scgw-backup.timer").write_text(timer)
    done = subprocess.run([analyze, "verify", str(tmp_path / "scgw-backup.timer"),
                           str(tmp_path / "scgw-backup.service")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "scgw-backup" not in done.stderr, done.stderr


def _deploy_commands() -> list[tuple[list[str], list[str]]]:
    """(subcommand words, --options) of every `scgw` command in docs/deploy.md's code."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    found = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        for match in re.finditer(r"(?:^|[\s/])scgw((?: [a-z][a-z-]*){1,2})(.*)", line):
            words = match.group(1).split()
            options = re.findall(r"(?<!\S)(--[a-z][a-z-]*)", match.group(2))
            found.append((words, options))
    return found


def test_every_scgw_command_in_the_deploy_guide_exists() -> None:
    commands = _deploy_commands()
    seen = set()
    for words, options in commands:
        result = CliRunner().invoke(app, [*words, "--help"])
        assert result.exit_code == 0, (words, result.output)
        for option in options:
            assert option in result.output, (words, option)
        seen.add(" ".join(words))
    assert {"db backup", "db restore", "db upgrade", "systemd-unit"} <= {
        " ".join(s.split()[:2]) if s.startswith("db ") else s.split()[0] for s in seen}
