"""The Modbus driver against real pymodbus servers (simulated units) on loopback TCP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from device_drivers.modbus import (
    ModbusDeviceSpec,
    ModbusFleet,
    ModbusTimeout,
    ProfileError,
    UnknownDevice,
    WriteRefused,
)
from device_drivers.modbus.client import Endpoint, ModbusLink
from device_drivers.modbus.codec import words_to_raw
from device_drivers.modbus.errors import DeviceBusy, DeviceFailure, IllegalAddress, IllegalValue
from device_drivers.modbus.profile import load_profile
from device_drivers.vocabulary import Reading
from simulators.demo.broker import free_port
from simulators.modbus_units import Fault, SimulatedUnits, UnitSpec

LOCAL = "127.0.0.1"
KINDS = {"heat-pump-split": "hvac", "fresh-air-erv": "fresh_air", "air-purifier": "air_purifier",
         "eastron-sdm630": "meter"}


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Readings(list[Reading]):
    def of(self, device_id: str) -> list[Reading]:
        return [r for r in self if r.device_id == device_id]


def spec(device_id: str, profile: str, port: int, **overrides: object) -> ModbusDeviceSpec:
    fields: dict[str, object] = {"poll_interval_s": 0.1, "timeout_s": 0.3, "retries": 1}
    fields.update(overrides)
    return ModbusDeviceSpec(device_id, KINDS.get(profile, "hvac"), profile, LOCAL, port,
                            **fields)  # type: ignore[arg-type]


@pytest.fixture
async def hvac_units() -> AsyncIterator[tuple[SimulatedUnits, list[int]]]:
    ports = [free_port() for _ in range(3)]
    async with SimulatedUnits([UnitSpec("heat-pump-split", p, seed=i)
                               for i, p in enumerate(ports)]) as sims:
        yield sims, ports


async def test_polls_every_bundled_profile_with_standard_metrics() -> None:
    ports = {profile: free_port() for profile in KINDS}
    readings = Readings()
    async with SimulatedUnits([UnitSpec(p, port) for p, port in ports.items()]) as sims:
        specs = [spec(p, p, port) for p, port in ports.items()]
        async with ModbusFleet(specs, readings.append) as fleet:
            await wait_until(lambda: all(readings.of(p) for p in ports), "a reading from each")
            for profile, port in ports.items():
                reading = readings.of(profile)[-1]
                assert reading.kind == KINDS[profile]
                assert set(reading.metrics) == {r.name for r in load_profile(profile).registers}
                assert reading.seq is not None
                truth = sims.unit(port).values()
                for name in ("running", "setpoint_c", "fan_speed_pct", "voltage_l1_v"):
                    if name in truth:
                        assert reading.metrics[name] == truth[name]
            assert all(h.online for h in fleet.health().values())
    meter = readings.of("eastron-sdm630")[-1].metrics
    assert meter["voltage_l1_v"] == 229.8 and meter["frequency_hz"] == 50.0
    seqs = [r.seq or 0 for r in readings.of("heat-pump-split")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


ALL_TYPES = """\
profile: all-types
max_gap: 4
registers:
  - {name: i16_none, input_type: holding, address: 0, data_type: int16, scale: 0.1}
  - {name: i16_byte, input_type: holding, address: 1, data_type: int16, swap: byte}
  - {name: u16_none, input_type: holding, address: 2, data_type: uint16}
  - {name: u16_byte, input_type: holding, address: 3, data_type: uint16, swap: byte}
  - {name: i32_none, input_type: holding, address: 4, data_type: int32}
  - {name: i32_word, input_type: holding, address: 6, data_type: int32, swap: word}
  - {name: i32_byte, input_type: holding, address: 8, data_type: int32, swap: byte}
  - {name: i32_word_byte, input_type: holding, address: 10, data_type: int32, swap: word_byte}
  - {name: u32_none, input_type: input, address: 0, data_type: uint32}
  - {name: u32_word, input_type: input, address: 2, data_type: uint32, swap: word}
  - {name: u32_byte, input_type: input, address: 4, data_type: uint32, swap: byte}
  - {name: u32_word_byte, input_type: input, address: 6, data_type: uint32, swap: word_byte}
  - {name: f32_none, input_type: input, address: 8, data_type: float32}
  - {name: f32_word, input_type: input, address: 10, data_type: float32, swap: word}
  - {name: f32_byte, input_type: input, address: 12, data_type: float32, swap: byte}
  - {name: f32_word_byte, input_type: input, address: 14, data_type: float32, swap: word_byte}
  - {name: scaled, input_type: input, address: 20, data_type: uint16, scale: 0.5, offset: -40}
  - {name: flag, input_type: holding, address: 20, data_type: bool}
  - {name: coil0, input_type: coil, address: 3, data_type: bool}
  - {name: input0, input_type: discrete, address: 7, data_type: bool}
"""
VALUES = {
    "i16_none": -12.3, "i16_byte": -300, "u16_none": 65535, "u16_byte": 0x1234,
    "i32_none": -100000, "i32_word": -100000, "i32_byte": -100000, "i32_word_byte": -100000,
    "u32_none": 0x12345678, "u32_word": 0x12345678, "u32_byte": 0x12345678,
    "u32_word_byte": 0x12345678, "f32_none": 230.0, "f32_word": -1.5, "f32_byte": 1234.5,
    "f32_word_byte": 0.25, "scaled": 21.5, "flag": 1, "coil0": 1, "input0": 1,
}


async def test_every_data_type_and_word_order_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "all-types.yaml"
    path.write_text(ALL_TYPES)
    port = free_port()
    readings = Readings()
    async with SimulatedUnits([UnitSpec(str(path), port)]) as sims:
        unit = sims.unit(port)
        for name, value in VALUES.items():
            unit.set_value(name, value)
        # what went on the wire is the byte order the profile claims
        assert [unit.tables["input"][a] for a in (10, 11)] == [0x0000, 0xBFC0]  # -1.5, word
        assert [unit.tables["holding"][a] for a in (10, 11)] == [0x6079, 0xFEFF]  # word_byte
        async with ModbusFleet([spec("all", str(path), port)], readings.append):
            await wait_until(lambda: bool(readings), "a reading")
    assert readings[-1].metrics == {name: float(v) for name, v in VALUES.items()}
    assert words_to_raw([0x6079, 0xFEFF], "int32", "word_byte") == -100000


async def test_dead_unit_among_live_ones(hvac_units: tuple[SimulatedUnits, list[int]]) -> None:
    sims, ports = hvac_units
    readings = Readings()
    specs = [spec(f"ac-{i}", "heat-pump-split", p, offline_after=2) for i, p in enumerate(ports)]
    async with ModbusFleet(specs, readings.append) as fleet:
        await wait_until(lambda: all(readings.of(f"ac-{i}") for i in range(3)), "first readings")
        sims.set_fault(ports[1], 1, Fault("dead"))
        await wait_until(lambda: fleet.health()["ac-1"].state == "offline", "ac-1 offline")
        assert "no answer" in (fleet.health()["ac-1"].last_error or "")
        counts = {d: len(readings.of(d)) for d in ("ac-0", "ac-2")}
        await wait_until(lambda: all(len(readings.of(d)) >= n + 5 for d, n in counts.items()),
                         "live units keep reporting while ac-1 is dead")
        assert fleet.health()["ac-0"].online and fleet.health()["ac-2"].online
        dead_since = len(readings.of("ac-1"))
        sims.set_fault(ports[1], 1, Fault())
        await wait_until(lambda: fleet.health()["ac-1"].online, "ac-1 probed back online")
        await wait_until(lambda: len(readings.of("ac-1")) > dead_since, "ac-1 reports again")


async def test_timeouts_are_typed_and_retried(hvac_units: tuple[SimulatedUnits, list[int]]) -> None:
    sims, ports = hvac_units
    link = ModbusLink(Endpoint(LOCAL, ports[0]))
    sims.set_fault(ports[0], 1, Fault("slow", delay_s=0.5))
    with pytest.raises(ModbusTimeout):
        await link.read(1, "holding", 0, 4, timeout_s=0.2)
    await link.close()

    readings = Readings()
    async with ModbusFleet([spec("ac", "heat-pump-split", ports[1], retries=2,
                                 poll_interval_s=3600)], readings.append) as fleet:
        await wait_until(lambda: bool(readings), "first reading")
        unit = sims.unit(ports[1])
        unit.fault = Fault("dead")
        before = unit.requests
        assert await fleet.poll("ac") is False
        assert unit.requests - before == 3  # first block: one try and two retries, then stop
        assert fleet.health()["ac"].consecutive_failures == 1


async def test_late_reply_is_never_taken_for_the_next_request(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text("profile: two\nregisters:\n"
                    "  - {name: a, input_type: holding, address: 0, data_type: uint32}\n"
                    "  - {name: b, input_type: holding, address: 10, data_type: uint32}\n")
    port = free_port()
    async with SimulatedUnits([UnitSpec(str(path), port)]) as sims:
        sims.unit(port).set_value("a", 111111)
        sims.unit(port).set_value("b", 222222)
        link = ModbusLink(Endpoint(LOCAL, port))
        sims.set_fault(port, 1, Fault("slow", delay_s=0.4, requests=1))
        with pytest.raises(ModbusTimeout):
            await link.read(1, "holding", 0, 2, timeout_s=0.2)
        # a's reply arrives at ~0.4 s while b's request (answered at ~0.5 s) is waiting
        sims.set_fault(port, 1, Fault("slow", delay_s=0.3, requests=1))
        assert words_to_raw(await link.read(1, "holding", 10, 2, timeout_s=1.0), "uint32") == 222222
        assert words_to_raw(await link.read(1, "holding", 0, 2, timeout_s=1.0), "uint32") == 111111
        await link.close()


async def test_exception_codes(tmp_path: Path, hvac_units: tuple[SimulatedUnits, list[int]]
                               ) -> None:
    sims, ports = hvac_units
    extra = load_profile("heat-pump-split").model_dump(mode="json")
    extra["registers"] = [*extra["registers"],
                          {"name": "extra", "input_type": "holding", "address": 50}]
    path = tmp_path / "hp-extra.yaml"
    path.write_text(json.dumps(extra))  # JSON is YAML
    readings = Readings()
    specs = [spec("ac", str(path), ports[0], retries=2, poll_interval_s=3600)]
    async with ModbusFleet(specs, readings.append) as fleet:
        await wait_until(lambda: bool(readings), "first reading")
        unit = sims.unit(ports[0])
        assert "extra" not in readings[-1].metrics and "setpoint_c" in readings[-1].metrics
        before = unit.requests
        assert await fleet.poll("ac") is True  # 02 on one block: the unit is alive
        assert unit.requests - before == 3  # three blocks, the refused one not retried
        assert fleet.health()["ac"].online

        unit.fault = Fault("exception", exception_code=3, requests=1)
        before = unit.requests
        with pytest.raises(IllegalValue):
            await fleet.write("ac", {"fan_speed_pct": 40})
        assert unit.requests - before == 1

        unit.fault = Fault("exception", exception_code=6, requests=1)
        before = unit.requests
        assert await fleet.write("ac", {"fan_speed_pct": 40}) == {"fan_speed_pct": 40.0}
        assert unit.requests - before == 3  # busy, retried write, read-back

    link = ModbusLink(Endpoint(LOCAL, ports[1]))
    with pytest.raises(IllegalAddress):
        await link.read(1, "holding", 40, 2, timeout_s=1.0)
    sims.set_fault(ports[1], 1, Fault("exception", exception_code=4, requests=1))
    with pytest.raises(DeviceFailure):
        await link.read(1, "holding", 0, 2, timeout_s=1.0)
    sims.set_fault(ports[1], 1, Fault("exception", exception_code=6, requests=1))
    with pytest.raises(DeviceBusy) as busy:
        await link.read(1, "holding", 0, 2, timeout_s=1.0)
    assert busy.value.retryable
    await link.close()


async def test_writes_are_validated_then_read_back(hvac_units: tuple[SimulatedUnits, list[int]]
                                                   ) -> None:
    sims, ports = hvac_units
    unit = sims.unit(ports[0])
    readings = Readings()
    async with ModbusFleet([spec("ac", "heat-pump-split", ports[0])], readings.append) as fleet:
        await wait_until(lambda: bool(readings), "first reading")
        before, controls = unit.requests, dict(unit.controls)
        with pytest.raises(WriteRefused) as refused:
            await fleet.write("ac", {"setpoint_c": 35, "fan_speed_pct": 50, "power_w": 1})
        assert refused.value.problems == (
            "setpoint_c: 35 is above the maximum 30", "power_w is read-only")
        with pytest.raises(UnknownDevice):
            await fleet.write("nope", {"setpoint_c": 22})
        await asyncio.sleep(0.15)  # background polls continue; the writes sent nothing
        assert unit.controls == controls
        assert all(r.metrics["fan_speed_pct"] != 50 for r in readings)
        assert unit.requests > before

        result = await fleet.write("ac", {"setpoint_c": 22.5, "running": 0, "mode": 1})
        assert result == {"setpoint_c": 22.5, "running": 0.0, "mode": 1.0}
        assert unit.controls["setpoint_c"] == 22.5 and unit.controls["running"] == 0
        assert any(r.metrics == result for r in readings)  # the read-back is reported


async def test_coil_write_and_read_back() -> None:
    port = free_port()
    async with SimulatedUnits([UnitSpec("fresh-air-erv", port)]) as sims:
        async with ModbusFleet([spec("erv", "fresh-air-erv", port)], lambda r: None) as fleet:
            assert await fleet.write("erv", {"running": 0, "fan_speed_pct": 30}) == {
                "running": 0.0, "fan_speed_pct": 30.0}
            assert sims.unit(port).tables["coil"][0] == 0


async def test_reconnects_after_the_server_restarts() -> None:
    port = free_port()
    readings = Readings()
    async with SimulatedUnits([UnitSpec("air-purifier", port)]) as sims:
        specs = [spec("pur", "air-purifier", port, offline_after=2)]
        async with ModbusFleet(specs, readings.append) as fleet:
            await wait_until(lambda: bool(readings), "first reading")
            await sims.stop(port)
            await wait_until(lambda: fleet.health()["pur"].state == "offline", "offline")
            seen = len(readings)
            await sims.start(port)
            await wait_until(lambda: len(readings) > seen, "a reading after the restart")
            assert fleet.health()["pur"].online


async def test_garbage_values_are_dropped(hvac_units: tuple[SimulatedUnits, list[int]]) -> None:
    sims, ports = hvac_units
    readings = Readings()
    profile = load_profile("heat-pump-split")
    async with ModbusFleet([spec("ac", "heat-pump-split", ports[0])], readings.append) as fleet:
        await wait_until(lambda: bool(readings), "first reading")
        sims.set_fault(ports[0], 1, Fault("garbage"))
        await wait_until(lambda: fleet.health()["ac"].rejected_values >= 10, "rejections")
    for reading in readings:
        for name, value in reading.metrics.items():
            register = profile.register(name)
            assert register.min is None or value >= register.min
            assert register.max is None or value <= register.max


async def test_bad_configuration_fails_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: bad\nregisters:\n  - {name: a, input_type: input, address: -1}\n")
    with pytest.raises(ProfileError, match=re.escape("bad.yaml:3, register #0 'a', key 'address'")):
        ModbusFleet([spec("x", str(bad), 1502)], lambda r: None)
    with pytest.raises(ValueError, match="twice"):
        ModbusFleet([spec("x", "air-purifier", 1502)] * 2, lambda r: None)
    with pytest.raises(ValueError, match="serial settings differ"):
        ModbusFleet([
            ModbusDeviceSpec("a", "hvac", "heat-pump-split", None, "/dev/ttyUSB0", 1),
            ModbusDeviceSpec("b", "hvac", "heat-pump-split", None, "/dev/ttyUSB0", 2,
                             baudrate=19200),
        ], lambda r: None)
    with pytest.raises(ValueError, match="host"):
        ModbusDeviceSpec("a", "hvac", "heat-pump-split", None, 502)
    with pytest.raises(ValueError, match="unknown kind"):
        ModbusDeviceSpec("a", "toaster", "heat-pump-split", LOCAL, 502)
    with pytest.raises(ValueError, match="device_id"):
        ModbusDeviceSpec("Bad Id", "hvac", "heat-pump-split", LOCAL, 502)


async def test_a_failing_subscriber_does_not_stop_polling() -> None:
    port = free_port()
    calls: list[Reading] = []

    def flaky(reading: Reading) -> None:
        calls.append(reading)
        raise RuntimeError("subscriber bug")

    async with SimulatedUnits([UnitSpec("air-purifier", port)]):
        async with ModbusFleet([spec("pur", "air-purifier", port)], flaky):
            await wait_until(lambda: len(calls) >= 3, "polling continues")
