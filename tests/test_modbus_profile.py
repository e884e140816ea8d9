"""Profiles: bundled maps load, the SDM630 map matches Eastron's table, errors point at the
line/register/key, and the committed docs equal the generated ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_drivers.modbus import docs
from device_drivers.modbus.errors import ProfileError
from device_drivers.modbus.profile import (
    bundled_profiles,
    load_profile,
    parse_profile,
    plan_reads,
)
from device_drivers.vocabulary import DEVICE_KINDS

STANDARD_METRICS = {
    "power_w", "energy_wh", "voltage_v", "current_a", "temperature_c", "setpoint_c",
    "humidity_pct", "pm25_ugm3", "co2_ppm", "fan_speed_pct", "filter_dp_pa", "running",
}


def test_bundled_profiles_cover_every_air_and_meter_kind() -> None:
    profiles = {pid: load_profile(pid) for pid in bundled_profiles()}
    assert {p.kind for p in profiles.values()} == {"hvac", "fresh_air", "air_purifier", "meter"}
    for pid, profile in profiles.items():
        assert profile.profile == pid  # the file name is the id users put in site configs
        assert profile.kind in DEVICE_KINDS
        assert profile.source
        assert "power_w" in {r.name for r in profile.registers}
        assert "energy_wh" in {r.name for r in profile.registers}


@pytest.mark.parametrize(
    ("profile_id", "metrics"),
    [
        ("heat-pump-split", {"running", "setpoint_c", "temperature_c", "fan_speed_pct"}),
        ("fresh-air-erv", {"running", "fan_speed_pct", "co2_ppm", "filter_dp_pa", "pm25_ugm3"}),
        ("air-purifier", {"running", "fan_speed_pct", "pm25_ugm3", "filter_dp_pa"}),
        ("eastron-sdm630", {"voltage_v", "current_a"}),
    ],
)
def test_profiles_use_standard_metric_names(profile_id: str, metrics: set[str]) -> None:
    names = {r.name for r in load_profile(profile_id).registers}
    assert metrics <= names
    assert metrics <= STANDARD_METRICS


# Eastron SDM630-Modbus MID V2 manual, input registers (function 04): register number ->
# parameter. The protocol address is the register number minus 30001.
SDM630_MANUAL = {
    "voltage_l1_v": 30001, "voltage_l2_v": 30003, "voltage_l3_v": 30005,
    "current_l1_a": 30007, "current_l2_a": 30009, "current_l3_a": 30011,
    "power_l1_w": 30013, "power_l2_w": 30015, "power_l3_w": 30017,
    "voltage_v": 30043, "current_a": 30049, "power_w": 30053, "frequency_hz": 30071,
    "energy_wh": 30073, "export_energy_wh": 30075,
}


def test_sdm630_map_matches_the_manual() -> None:
    profile = load_profile("eastron-sdm630")
    assert {r.name: r.address + 30001 for r in profile.registers} == SDM630_MANUAL
    for register in profile.registers:
        assert (register.input_type, register.data_type, register.swap) == (
            "input", "float32", "none")
    assert profile.register("energy_wh").scale == 1000  # kWh on the wire
    (block,) = plan_reads(profile)  # one request, inside the meter's 80-register limit
    assert block.count <= 80


BAD = [
    ("registers:\n  - {name: a, input_type: input, address: 0}\n", None, "profile", 1),
    ("profile: x\nregisters:\n  - name: a\n    input_type: input\n    address: 0\n"
     "    writable: true\n", "#0 'a'", "writable", 6),
    ("profile: x\nregisters:\n  - name: a\n    input_type: holding\n    address: 0\n"
     "    sacle: 0.1\n", "#0 'a'", "sacle", 6),
    ("profile: x\nregisters:\n  - {name: a, input_type: input, address: 0, data_type: float32}\n"
     "  - {name: b, input_type: input, address: 1}\n", "#1 'b'", "address", 4),
    ("profile: x\nregisters:\n  - {name: a, input_type: input, address: 0}\n"
     "  - {name: a, input_type: input, address: 4}\n", "#1 'a'", "name", 4),
    ("profile: x\nregisters:\n  - {name: a, input_type: coil, address: 0}\n", "#0 'a'",
     "data_type", 3),
    ("profile: x\nregisters:\n  - {name: a, input_type: input, address: 0, swap: word}\n",
     "#0 'a'", "swap", 3),
    ("profile: x\nregisters:\n  - {name: a, input_type: holding, address: 0, min: 5, max: 1}\n",
     "#0 'a'", "min", 3),
    ("profile: x\nregisters:\n  - {name: a, input_type: holding, address: 70000}\n", "#0 'a'",
     "address", 3),
    ("profile: x\nkind: toaster\nregisters:\n  - {name: a, input_type: input, address: 0}\n",
     None, "kind", 2),
]


@pytest.mark.parametrize(("text", "register", "key", "line"), BAD)
def test_profile_errors_name_file_line_register_and_key(
    tmp_path: Path, text: str, register: str | None, key: str, line: int
) -> None:
    path = tmp_path / "site-unit.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        load_profile(str(path))
    error = caught.value
    assert (error.file, error.register, error.key, error.line) == (str(path), register, key, line)
    assert str(path) in str(error) and key in str(error)


def test_broken_yaml_and_unknown_profile() -> None:
    with pytest.raises(ProfileError, match=r"u.yaml:3: not valid YAML"):
        parse_profile("profile: x\nregisters: [\n", file="u.yaml")
    with pytest.raises(ProfileError, match="not a bundled profile"):
        load_profile("no-such-profile")


def test_committed_profile_docs_equal_generated() -> None:
    assert docs.stale() == [], "run: .venv/bin/python -m device_drivers.modbus.docs"


def test_docs_table_lists_every_register(tmp_path: Path) -> None:
    assert docs.main(["--out", str(tmp_path)]) == 0
    page = (tmp_path / "heat-pump-split.md").read_text()
    for register in load_profile("heat-pump-split").registers:
        assert f"| `{register.name}` | {register.input_type} | {register.address} |" in page
    assert docs.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "air-purifier.md").write_text("edited by hand\n")
    assert docs.main(["--out", str(tmp_path), "--check"]) == 1
