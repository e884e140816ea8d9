"""One Modbus connection (a TCP endpoint or a serial line) shared by the units behind it.

A link sends one request at a time (a bus lock), keeps the RTU inter-frame gap, and turns
everything pymodbus can do wrong into the typed errors of `errors.py`. It makes exactly one
attempt per call: retries, backoff and online/offline belong to the device (fleet.py), so
that while one unit backs off the others on the same line keep their turn.

Late replies. On TCP every request carries a fresh transaction id (pymodbus numbers them and
its framer drops a reply whose id does not match), and no request is retried under the same
id, so the reply to a timed-out request can never answer the next one. RTU frames carry no
id: after a timeout the line stays reserved for `late_window_s` (default: the timeout again)
and anything arriving in that window is dropped; every reply must also match the request's
unit, function, length and address. Only a reply later than twice the timeout with exactly
the shape of the next request could slip through (or, from a unit that was silent through a
whole window before and so gets a short one, a reply later than its timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from device_drivers.modbus.codec import BIT_TABLES
from device_drivers.modbus.errors import (
    BadResponse,
    LinkDown,
    ModbusTimeout,
    exception_for_code,
)

log = logging.getLogger(__name__)

_TCP_TIMEOUTS_BEFORE_RECONNECT = 3  # a half-open TCP connection only shows as silence


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where units are reached: TCP `host`:`port`, or a serial device path in `port`."""

    host: str | None
    port: int | str
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def serial(self) -> bool:
        return isinstance(self.port, str)

    @property
    def label(self) -> str:
        return f"{self.port}@{self.baudrate}" if self.serial else f"{self.host}:{self.port}"

    @property
    def frame_gap_s(self) -> float:
        """Modbus RTU t3.5: 3.5 characters of 11 bits, fixed 1.75 ms above 19200 baud."""
        if not self.serial:
            return 0.0
        return 38.5 / self.baudrate if self.baudrate <= 19200 else 0.00175


Client = AsyncModbusTcpClient | AsyncModbusSerialClient
Check = Callable[[ModbusPDU], str | None]
_READS: dict[str, tuple[str, int]] = {
    "coil": ("read_coils", 1),
    "discrete": ("read_discrete_inputs", 2),
    "holding": ("read_holding_registers", 3),
    "input": ("read_input_registers", 4),
}


class ModbusLink:
    """Serialised requests over one connection, opened lazily and reopened after a loss."""

    def __init__(self, endpoint: Endpoint, *, late_window_s: float | None = None) -> None:
        self.endpoint = endpoint
        self.late_window_s = late_window_s
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self._gap_s = endpoint.frame_gap_s
        self._quiet_from = 0.0
        self._silent_in_a_row = 0
        self._rx_bytes = 0
        self._dead_units: set[int] = set()  # silent through a whole late window last time
        self.requests = 0
        self.connects = 0

    def _new_client(self) -> Client:
        ep = self.endpoint
        if isinstance(ep.port, str):
            return AsyncModbusSerialClient(
                ep.port, baudrate=ep.baudrate, parity=ep.parity, stopbits=ep.stopbits,
                bytesize=ep.bytesize, retries=0, reconnect_delay=0,
                trace_packet=self._count_rx,
            )
        if ep.host is None:
            raise ValueError(f"TCP endpoint on port {ep.port} needs a host")
        return AsyncModbusTcpClient(
            ep.host, port=ep.port, retries=0, reconnect_delay=0,
        )

    def _count_rx(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx_bytes += len(data)
        return data

    async def _connect(self, timeout_s: float, unit_id: int) -> Client:
        self._drop()
        client = self._new_client()
        client.ctx.comm_params.timeout_connect = timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            raise LinkDown(f"{self.endpoint.label}: cannot connect: {exc!r}", unit_id=unit_id
                           ) from None
        if not ok:
            client.close()
            raise LinkDown(f"{self.endpoint.label}: cannot connect", unit_id=unit_id)
        self.connects += 1
        self._client = client
        self._quiet_from = time.monotonic()
        return client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def close(self) -> None:
        async with self._lock:
            self._drop()

    async def _request(self, unit_id: int, timeout_s: float, check: Check, method: str,
                       *args: object, **kwargs: object) -> ModbusPDU:
        async with self._lock:
            client = self._client
            if client is None or not client.connected:
                client = await self._connect(timeout_s, unit_id)
            if self._gap_s:
                gap = self._quiet_from + self._gap_s - time.monotonic()
                if gap > 0:
                    await asyncio.sleep(gap)
            # pymodbus waits for the reply with a deadline of its own; setting it per request
            # is far cheaper than a second timer around every request.
            client.ctx.comm_params.timeout_connect = timeout_s
            self.requests += 1
            try:
                response: ModbusPDU = await getattr(client, method)(
                    *args, device_id=unit_id, **kwargs)
            except ConnectionException as exc:
                self._drop()
                raise LinkDown(f"{self.endpoint.label}: {exc}", unit_id=unit_id) from None
            except ModbusIOException as exc:
                await self._after_silence(unit_id, timeout_s)
                if "No response" in str(exc):  # pymodbus 3.16's deadline passed
                    raise ModbusTimeout(
                        f"unit {unit_id} on {self.endpoint.label}: no answer in {timeout_s:g} s",
                        unit_id=unit_id,
                    ) from None
                raise BadResponse(f"unit {unit_id}: {exc}", unit_id=unit_id) from None
            except ModbusException as exc:
                await self._after_silence(unit_id, timeout_s)
                raise BadResponse(f"unit {unit_id}: {exc}", unit_id=unit_id) from None
            finally:
                if self._gap_s:
                    self._quiet_from = time.monotonic()
            if not response.isError():
                problem = check(response)
                if problem is not None:  # e.g. a late reply to another request on RTU
                    await self._after_silence(unit_id, timeout_s)
                    raise BadResponse(f"unit {unit_id}: {problem}", unit_id=unit_id)
            self._silent_in_a_row = 0
            if self._dead_units:
                self._dead_units.discard(unit_id)
        if response.isError():
            raise exception_for_code(response.exception_code, unit_id=unit_id)
        return response

    async def _after_silence(self, unit_id: int, timeout_s: float) -> None:
        """Make sure a reply still on its way cannot be read as the next one.

        On RTU the line stays reserved for the late window. A unit that stayed silent through
        a whole window is dead rather than slow, and its next windows are short, so a dead
        unit costs the other units on the line little more than its timeouts.
        """
        self._silent_in_a_row += 1
        client = self._client
        if client is None:
            return
        if not self.endpoint.serial:
            if self._silent_in_a_row >= _TCP_TIMEOUTS_BEFORE_RECONNECT:
                log.info("%s: %d requests unanswered, reconnecting", self.endpoint.label,
                         self._silent_in_a_row)
                self._silent_in_a_row = 0
                self._drop()
            return
        window = timeout_s if self.late_window_s is None else self.late_window_s
        if unit_id in self._dead_units:
            window = min(window, max(0.05, 4 * self.endpoint.frame_gap_s))
        received = self._rx_bytes
        await asyncio.sleep(window)
        if self._rx_bytes == received:
            self._dead_units.add(unit_id)
        else:
            self._dead_units.discard(unit_id)
        client.ctx.recv_buffer = b""

    async def read(self, unit_id: int, input_type: str, address: int, count: int,
                   timeout_s: float) -> list[int]:
        """Registers as words, or bits as 0/1, exactly `count` of them."""
        method, fc = _READS[input_type]
        bits = input_type in BIT_TABLES

        def check(response: ModbusPDU) -> str | None:
            if response.function_code != fc:
                return f"function {response.function_code} answers a read with {fc}"
            got = len(response.bits) if bits else len(response.registers)
            if got < count or (not bits and got != count):
                return f"{got} values for a read of {count}"
            return None

        response = await self._request(unit_id, timeout_s, check, method, address, count=count)
        if bits:
            return [1 if b else 0 for b in response.bits[:count]]
        return list(response.registers)

    async def write(self, unit_id: int, input_type: str, address: int, words: Sequence[int],
                    timeout_s: float) -> None:
        """Write a coil (one 0/1) or registers (function 06 for one word, 16 for more)."""
        values = [int(w) for w in words]
        fc = 5 if input_type == "coil" else 6 if len(values) == 1 else 16

        def check(response: ModbusPDU) -> str | None:
            if fc == 5:
                echoed = bool(response.bits) and bool(response.bits[0]) == bool(values[0])
            elif fc == 6:
                echoed = list(response.registers) == values
            else:
                echoed = response.count == len(values)
            if response.function_code != fc or response.address != address or not echoed:
                return f"write echo {response} does not match function {fc} at {address}"
            return None

        if fc == 5:
            await self._request(unit_id, timeout_s, check, "write_coil", address, bool(values[0]))
        elif fc == 6:
            await self._request(unit_id, timeout_s, check, "write_register", address, values[0])
        else:
            await self._request(unit_id, timeout_s, check, "write_registers", address, values)
