"""Modbus RTU over a serial line: a socat pseudo-terminal pair, a pymodbus serial server with
several simulated units on one end (one RS485 bus), the driver on the other."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from device_drivers.modbus import ModbusDeviceSpec, ModbusFleet, ModbusTimeout
from device_drivers.modbus.client import Endpoint, ModbusLink
from device_drivers.modbus.codec import words_to_raw
from device_drivers.modbus.errors import IllegalAddress
from device_drivers.vocabulary import Reading
from simulators.modbus_units import Fault, SimulatedUnits, UnitSpec

TWO_BLOCKS = ("profile: two\nregisters:\n"
              "  - {name: a, input_type: holding, address: 0, data_type: uint32}\n"
              "  - {name: b, input_type: holding, address: 10, data_type: uint32}\n")


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(server end, client end) of a null-modem cable made by socat."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed (apt-get install socat)")
    server, client = tmp_path / "bus-server", tmp_path / "bus-client"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={server}", f"pty,raw,echo=0,link={client}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not (server.exists() and client.exists()):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("socat did not create the pty pair")
        time.sleep(0.01)
    yield str(server), str(client)
    proc.terminate()
    proc.wait(timeout=5)


@pytest.fixture
async def bus(pty_pair: tuple[str, str], tmp_path: Path
              ) -> AsyncIterator[tuple[SimulatedUnits, str, str]]:
    """Unit 1 a heat pump, unit 2 an SDM630 meter, unit 3 a two-block test map."""
    server, client = pty_pair
    path = tmp_path / "two.yaml"
    path.write_text(TWO_BLOCKS)
    units = [UnitSpec("heat-pump-split", server, 1), UnitSpec("eastron-sdm630", server, 2),
             UnitSpec(str(path), server, 3)]
    async with SimulatedUnits(units) as sims:
        yield sims, server, client


def rtu(device_id: str, kind: str, profile: str, path: str, unit_id: int,
        **overrides: object) -> ModbusDeviceSpec:
    fields: dict[str, object] = {"poll_interval_s": 0.2, "timeout_s": 0.3, "retries": 1}
    fields.update(overrides)
    return ModbusDeviceSpec(device_id, kind, profile, None, path, unit_id,
                            **fields)  # type: ignore[arg-type]


async def test_units_on_one_bus_are_polled_and_written(bus: tuple[SimulatedUnits, str, str]
                                                       ) -> None:
    sims, server, client = bus
    readings: list[Reading] = []
    specs = [rtu("ac", "hvac", "heat-pump-split", client, 1),
             rtu("meter", "meter", "eastron-sdm630", client, 2)]
    async with ModbusFleet(specs, readings.append) as fleet:
        await wait_until(lambda: {r.device_id for r in readings} == {"ac", "meter"}, "both")
        meter = next(r for r in readings if r.device_id == "meter")
        assert meter.metrics["voltage_l2_v"] == 231.2 and meter.metrics["frequency_hz"] == 50.0
        assert await fleet.write("ac", {"setpoint_c": 23.5, "fan_speed_pct": 80}) == {
            "setpoint_c": 23.5, "fan_speed_pct": 80.0}
        assert sims.unit(server, 1).controls["setpoint_c"] == 23.5
        assert all(h.online for h in fleet.health().values())


async def test_a_late_reply_is_not_taken_for_the_next_request(
    bus: tuple[SimulatedUnits, str, str],
) -> None:
    sims, server, client = bus
    unit = sims.unit(server, 3)
    unit.set_value("a", 111111)
    unit.set_value("b", 222222)
    link = ModbusLink(Endpoint(None, client))
    unit.fault = Fault("slow", delay_s=0.3, requests=1)
    with pytest.raises(ModbusTimeout):
        await link.read(3, "holding", 0, 2, timeout_s=0.2)
    # RTU frames carry no transaction id: a's late reply (at ~0.3 s) has the same unit,
    # function and length as b's; only the line's late window keeps it out. b is slow too,
    # so without the window a's reply would arrive while b's request is waiting.
    unit.fault = Fault("slow", delay_s=0.3, requests=1)
    assert words_to_raw(await link.read(3, "holding", 10, 2, timeout_s=0.5), "uint32") == 222222
    assert words_to_raw(await link.read(3, "holding", 0, 2, timeout_s=0.5), "uint32") == 111111
    await link.close()


async def test_without_the_late_window_the_late_reply_would_be_taken(
    bus: tuple[SimulatedUnits, str, str],
) -> None:
    """The hazard the window guards against is real on this bus (the test above can fail)."""
    sims, server, client = bus
    unit = sims.unit(server, 3)
    unit.set_value("a", 111111)
    unit.set_value("b", 222222)
    link = ModbusLink(Endpoint(None, client), late_window_s=0.0)
    unit.fault = Fault("slow", delay_s=0.3, requests=1)
    with pytest.raises(ModbusTimeout):
        await link.read(3, "holding", 0, 2, timeout_s=0.2)
    unit.fault = Fault("slow", delay_s=0.3, requests=1)
    assert words_to_raw(await link.read(3, "holding", 10, 2, timeout_s=0.5), "uint32") == 111111
    await link.close()


async def test_a_dead_unit_does_not_stop_the_bus(bus: tuple[SimulatedUnits, str, str]) -> None:
    sims, server, client = bus
    readings: list[Reading] = []
    specs = [rtu("ac", "hvac", "heat-pump-split", client, 1, offline_after=2),
             rtu("meter", "meter", "eastron-sdm630", client, 2)]
    async with ModbusFleet(specs, readings.append) as fleet:
        await wait_until(lambda: {r.device_id for r in readings} == {"ac", "meter"}, "both")
        sims.set_fault(server, 1, Fault("dead"))
        await wait_until(lambda: fleet.health()["ac"].state == "offline", "ac offline")
        count = sum(r.device_id == "meter" for r in readings)
        await wait_until(lambda: sum(r.device_id == "meter" for r in readings) >= count + 5,
                         "the meter keeps reporting")
        sims.set_fault(server, 1, Fault())
        await wait_until(lambda: fleet.health()["ac"].online, "ac back")


async def test_exception_and_silence_on_rtu(bus: tuple[SimulatedUnits, str, str]) -> None:
    _, _, client = bus
    link = ModbusLink(Endpoint(None, client))
    with pytest.raises(IllegalAddress):
        await link.read(1, "input", 100, 2, timeout_s=0.5)
    with pytest.raises(ModbusTimeout):  # no unit 9 on this bus: nobody answers
        await link.read(9, "input", 0, 2, timeout_s=0.2)
    assert len(await link.read(2, "input", 0, 76, timeout_s=0.5)) == 76
    await link.close()
