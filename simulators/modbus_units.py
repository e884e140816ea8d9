"""Simulated HVAC, fresh-air, purifier and meter units: pymodbus servers built from profiles.

The register tables come from the same YAML profiles the driver reads, and the values from
simulators.physics, so a test exercises the real codec against a real Modbus server. Faults
are switched per unit at run time: `dead` (never answers), `slow` (answers after a delay,
with the request's own transaction id, the way a slow field unit does), `garbage` (answers
with random register contents) and `exception` (answers with an exception code).

pymodbus 3.16 answers from `ServerRequestHandler.handle_request`, which reads the
transaction id from `last_pdu` after awaiting the datastore; a delayed answer would carry the
next request's id. The handler here captures each request before awaiting, so a late reply
keeps its own id and the driver's defence against late replies is what gets tested.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from device_drivers.modbus.codec import BIT_TABLES, CodecError, decode, encode, plausible
from device_drivers.modbus.profile import Profile, Register, load_profile, plan_reads
from simulators.physics import Environment, UnitState, advance, observe

log = logging.getLogger(__name__)

FaultMode = Literal["ok", "dead", "slow", "garbage", "exception"]
_TABLE_BY_FC: Mapping[int, str] = {
    1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding",
    22: "holding", 23: "holding", 4: "input",
}
_STATE_KEYS = frozenset(UnitState.__dataclass_fields__)
_SENSOR_NOISE = {"temperature_c": 0.03, "pm25_ugm3": 0.3, "co2_ppm": 3.0, "humidity_pct": 0.2}


@dataclass(frozen=True, slots=True)
class Fault:
    """How a unit misbehaves; `requests` limits it to the next N requests."""

    mode: FaultMode = "ok"
    delay_s: float = 0.0
    exception_code: int = ExcCodes.DEVICE_BUSY
    requests: int | None = None


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """One simulated unit. `port` is a TCP port, or a serial device path for RTU."""

    profile: str
    port: int | str
    unit_id: int = 1
    host: str = "127.0.0.1"
    seed: int = 0
    initial: Mapping[str, float] = field(default_factory=dict)
    baudrate: int = 9600


class SimUnit:
    """A unit's register tables with physics behind them; tests may poke it directly."""

    def __init__(
        self, spec: UnitSpec, profile: Profile, env: Environment, time_scale: float
    ) -> None:
        self.spec, self.profile, self.env, self.time_scale = spec, profile, env, time_scale
        self.fault = Fault()
        self.requests = 0
        self._rng = random.Random(spec.seed)
        initial = dict(spec.initial)
        state_init = {k: v for k, v in initial.items() if k in _STATE_KEYS}
        self.state = UnitState(**state_init)
        self.controls: dict[str, float] = {
            r.name: initial.get(r.name, _default_control(r.name, r)) for r in profile.writable
        }
        self._fixed = {k: v for k, v in initial.items() if k not in _STATE_KEYS}
        self.tables: dict[str, dict[int, int]] = {t: {} for t in ("holding", "input", "coil",
                                                                   "discrete")}
        self._owner: dict[tuple[str, int], Register] = {}
        for block in plan_reads(profile):  # gaps inside a read block read as 0
            for address in range(block.start, block.start + block.count):
                self.tables[block.input_type][address] = 0
        for register in profile.registers:
            for address in range(register.address, register.end):
                self._owner[(register.input_type, address)] = register
        self._last = time.monotonic()
        self.refresh(force=True)

    def take_fault(self) -> Fault:
        """The fault for this request, counting down a limited one."""
        self.requests += 1
        fault = self.fault
        if fault.requests is not None:
            left = fault.requests - 1
            self.fault = Fault() if left <= 0 else Fault(fault.mode, fault.delay_s,
                                                          fault.exception_code, left)
        return fault

    def refresh(self, *, force: bool = False) -> None:
        """Advance the physics to now and write what the sensors see into the tables.

        Sensors update at most every 20 ms, so a unit polled flat out (the benchmark) does
        not spend its time integrating microseconds of physics.
        """
        now = time.monotonic()
        if not force and now - self._last < 0.02:
            return
        dt, self._last = (now - self._last) * self.time_scale, now
        kind = self.profile.kind
        self.state = advance(kind, self.state, self.controls, self.env, dt)
        seen = observe(kind, self.state, self.controls, self.env)
        for register in self.profile.registers:
            if register.writable:
                value = self.controls[register.name]
            elif register.name in self._fixed:
                value = self._fixed[register.name]
            else:
                value = seen.get(register.name, 0.0) + self._noise(register.name)
            self._store(register, value)

    def _noise(self, name: str) -> float:
        sigma = _SENSOR_NOISE.get(name)
        return self._rng.gauss(0.0, sigma) if sigma else 0.0

    def _store(self, register: Register, value: float) -> None:
        table = self.tables[register.input_type]
        for address, word in zip(range(register.address, register.end),
                                 _encode_clamped(register, value), strict=True):
            table[address] = word

    def values(self) -> dict[str, float]:
        """Current engineering value of every register, decoded like the driver does."""
        return {r.name: self._decode(r, self.tables[r.input_type]) for r in self.profile.registers}

    @staticmethod
    def _decode(register: Register, table: Mapping[int, int]) -> float:
        return decode(register, [table[a] for a in range(register.address, register.end)])

    def set_value(self, name: str, value: float) -> None:
        """Pin a register to a value (writable ones become the unit's control setting)."""
        register = self.profile.register(name)
        if register.writable:
            self.controls[name] = value
        else:
            self._fixed[name] = value
        self._store(register, value)

    def read(self, table: str, address: int, count: int, *, garbage: bool = False
             ) -> list[int] | ExcCodes:
        self.refresh()
        cells = self.tables[table]
        if any(a not in cells for a in range(address, address + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        if garbage:
            limit = 1 if table in BIT_TABLES else 0xFFFF
            return [self._rng.randint(0, limit) for _ in range(count)]
        return [cells[a] for a in range(address, address + count)]

    def write(self, table: str, address: int, words: Sequence[int]) -> ExcCodes | None:
        """Apply a write the way a careful unit does: all of it or, with an exception, none."""
        cells = self.tables[table]
        touched: dict[str, Register] = {}
        for a in range(address, address + len(words)):
            register = self._owner.get((table, a))
            if register is None or not register.writable:
                return ExcCodes.ILLEGAL_ADDRESS
            touched[register.name] = register
        staged = dict(cells)
        staged.update(zip(range(address, address + len(words)), words, strict=True))
        decoded = {name: self._decode(reg, staged) for name, reg in touched.items()}
        if not all(plausible(touched[name], value) for name, value in decoded.items()):
            return ExcCodes.ILLEGAL_VALUE
        self.refresh(force=True)  # the old settings were in force until now
        cells.update(staged)
        self.controls.update(decoded)
        return None


def _default_control(name: str, register: Register) -> float:
    defaults = {"running": 1.0, "fan_speed_pct": 60.0, "setpoint_c": 26.0}
    return defaults.get(name, register.min if register.min is not None else 0.0)


def _encode_clamped(register: Register, value: float) -> tuple[int, ...]:
    """Sensors saturate: an observation outside the data type pins to the nearest end."""
    try:
        return encode(register, value)
    except CodecError:
        low = register.min if register.min is not None else 0.0
        return encode(register, low if value < low else (register.max or low))


class _UnitContext:
    """The datastore interface pymodbus PDUs call, backed by one SimUnit."""

    def __init__(self, unit: SimUnit, *, garbage: bool) -> None:
        self.unit, self.garbage = unit, garbage

    async def async_getValues(self, device_id: int, func_code: int, address: int,
                              count: int = 1) -> list[int] | list[bool] | ExcCodes:
        table = _TABLE_BY_FC[func_code]
        words = self.unit.read(table, address, count, garbage=self.garbage)
        if isinstance(words, ExcCodes) or table not in BIT_TABLES:
            return words
        return [bool(w) for w in words]

    async def async_setValues(self, device_id: int, func_code: int, address: int,
                              values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        return self.unit.write(_TABLE_BY_FC[func_code], address, [int(v) for v in values])


class _UnitsRequestHandler(ServerRequestHandler):
    """Answers each request from its own task, with the faults of the addressed unit."""

    def __init__(self, owner: _UnitsServer) -> None:
        super().__init__(owner, None, None, None)  # type: ignore[no-untyped-call]
        self.owner = owner

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        used = 0
        while used < len(data):
            try:
                length, pdu = self.framer.handleFrame(data[used:], 0, 0)
            except ModbusIOException as exc:
                reply = ExceptionResponse(exc.fcode or 0, ExcCodes.ILLEGAL_FUNCTION,
                                          exc.dev_id, exc.transaction_id)
                self.server_send(reply, addr)  # type: ignore[no-untyped-call]
                return len(data)
            used += length
            if pdu is None:
                break
            self.owner.spawn(self._answer(pdu, addr))
        return used

    async def _answer(self, pdu: ModbusPDU, addr: tuple[Any, ...] | None) -> None:
        unit = self.owner.units.get(pdu.dev_id)
        response: ModbusPDU
        if unit is None:
            if self.owner.serial:
                return  # on a bus, another unit id is somebody else's business
            response = ExceptionResponse(pdu.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
        else:
            fault = unit.take_fault()
            if fault.mode == "dead":
                return
            if fault.mode == "slow":
                await asyncio.sleep(fault.delay_s)
            if fault.mode == "exception":
                response = ExceptionResponse(pdu.function_code, fault.exception_code)
            else:
                context = _UnitContext(unit, garbage=fault.mode == "garbage")
                try:
                    response = await pdu.datastore_update(context, pdu.dev_id)  # type: ignore[arg-type]
                except (KeyError, AttributeError, TypeError):
                    response = ExceptionResponse(pdu.function_code, ExcCodes.ILLEGAL_FUNCTION)
        response.transaction_id, response.dev_id = pdu.transaction_id, pdu.dev_id
        if self.transport:
            self.server_send(response, addr)  # type: ignore[no-untyped-call]


class _UnitsServer:
    """Mixin: the units behind one listener and the answer tasks they keep running."""

    units: dict[int, SimUnit]
    serial: bool
    _tasks: set[asyncio.Task[None]]

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def callback_new_connection(self) -> _UnitsRequestHandler:
        return _UnitsRequestHandler(self)

    async def close_units(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _placeholder() -> SimDevice:
    """pymodbus insists on a context; requests never reach it (see _UnitsRequestHandler)."""
    return SimDevice(id=0, simdata=[SimData(0, datatype=DataType.REGISTERS)])


class _UnitsTcpServer(_UnitsServer, ModbusTcpServer):
    def __init__(self, units: dict[int, SimUnit], host: str, port: int) -> None:
        self.units, self.serial, self._tasks = units, False, set()
        ModbusTcpServer.__init__(self, _placeholder(), address=(host, port))


class _UnitsSerialServer(_UnitsServer, ModbusSerialServer):
    def __init__(self, units: dict[int, SimUnit], path: str, baudrate: int) -> None:
        self.units, self.serial, self._tasks = units, True, set()
        ModbusSerialServer.__init__(self, _placeholder(), port=path, baudrate=baudrate)


class SimulatedUnits:
    """Serves simulated units: one TCP listener per port, or one RTU bus per serial path."""

    def __init__(self, units: Sequence[UnitSpec], *, env: Environment | None = None,
                 time_scale: float = 1.0) -> None:
        self.env = env or Environment()
        self._units: dict[int | str, dict[int, SimUnit]] = {}
        self._specs: dict[int | str, UnitSpec] = {}
        profiles: dict[str, Profile] = {}
        for spec in units:
            profile = profiles.get(spec.profile) or load_profile(spec.profile)
            profiles[spec.profile] = profile
            on_port = self._units.setdefault(spec.port, {})
            if spec.unit_id in on_port:
                raise ValueError(f"unit id {spec.unit_id} twice on port {spec.port}")
            on_port[spec.unit_id] = SimUnit(spec, profile, self.env, time_scale)
            self._specs.setdefault(spec.port, spec)
        self._servers: dict[int | str, _UnitsTcpServer | _UnitsSerialServer] = {}

    async def __aenter__(self) -> SimulatedUnits:
        try:
            for port in self._units:
                await self.start(port)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for port in list(self._servers):
            await self.stop(port)

    async def start(self, port: int | str) -> None:
        """(Re)open the listener for `port`; the units keep their state across restarts."""
        if port in self._servers:
            return
        spec = self._specs[port]
        server: _UnitsTcpServer | _UnitsSerialServer
        if isinstance(port, int):
            server = _UnitsTcpServer(self._units[port], spec.host, port)
        else:
            server = _UnitsSerialServer(self._units[port], port, spec.baudrate)
        await server.serve_forever(background=True)
        self._servers[port] = server
        log.info("simulated Modbus units %s on %s", sorted(self._units[port]), port)

    async def stop(self, port: int | str) -> None:
        """Close the listener and its connections, as when a unit loses power."""
        server = self._servers.pop(port, None)
        if server is not None:
            await server.close_units()
            await server.shutdown()  # type: ignore[no-untyped-call]

    def unit(self, port: int | str, unit_id: int = 1) -> SimUnit:
        return self._units[port][unit_id]

    def set_fault(self, port: int | str, unit_id: int, fault: Fault) -> None:
        self.unit(port, unit_id).fault = fault

    @property
    def units(self) -> list[SimUnit]:
        return [unit for on_port in self._units.values() for unit in on_port.values()]


async def _serve(args: argparse.Namespace) -> None:
    specs = [
        UnitSpec(profile, args.base_port + i, host=args.host, seed=i)
        for i in range(args.count)
        for profile in [args.profile[i % len(args.profile)]]
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with SimulatedUnits(specs, time_scale=args.time_scale):
        ready = {"ready": True, "host": args.host, "ports": [s.port for s in specs]}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve N simulated TCP units on consecutive ports until SIGTERM (bench and demo)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--profile", action="append", required=True,
                        help="bundled profile id or YAML path; repeat to mix kinds")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--base-port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--time-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
