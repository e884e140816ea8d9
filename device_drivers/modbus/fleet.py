"""The Modbus driver: one task per unit, polling its profile and publishing Readings.

Units on one TCP endpoint or one serial line share a ModbusLink (and so its lock and, on
RTU, its inter-frame gap); everything else is independent, so a dead or slow unit only
costs the units that physically share its line. Retries happen between requests, outside
the line's lock, so while one unit backs off the others keep their turn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TypeVar

from device_drivers.modbus.client import Endpoint, ModbusLink
from device_drivers.modbus.codec import decode, decode_block
from device_drivers.modbus.errors import RequestError, UnknownDevice
from device_drivers.modbus.health import (
    DeviceHealth,
    HealthPolicy,
    next_poll_at,
    record_failure,
    record_rejected,
    record_success,
)
from device_drivers.modbus.profile import Profile, ReadBlock, load_profile, plan_reads, plan_write
from device_drivers.supervision import ComponentTasks, Supervisor
from device_drivers.vocabulary import DEVICE_ID_RE, DEVICE_KINDS, Reading

log = logging.getLogger(__name__)

T = TypeVar("T")
_GOLDEN = 0.6180339887498949  # spreads start phases evenly for any number of units


@dataclass(frozen=True, slots=True)
class ModbusDeviceSpec:
    """A Modbus unit from the site config (CONTRACT.md section 5).

    `port` is a TCP port (with `host`) or, for RTU, the serial device path (`host` None).
    """

    device_id: str
    kind: str
    profile: str  # bundled profile id or a path to a YAML file
    host: str | None
    port: int | str
    unit_id: int = 1
    poll_interval_s: float = 5.0
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    timeout_s: float = 1.0
    retries: int = 2
    offline_after: int = 3

    def __post_init__(self) -> None:
        if not DEVICE_ID_RE.match(self.device_id):
            raise ValueError(f"device_id {self.device_id!r} must match {DEVICE_ID_RE.pattern}")
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"{self.device_id}: unknown kind {self.kind!r}")
        if not 0 <= self.unit_id <= 247:
            raise ValueError(f"{self.device_id}: unit_id {self.unit_id} outside 0..247")
        if isinstance(self.port, int):
            if not self.host or not 0 < self.port < 65536:
                raise ValueError(f"{self.device_id}: Modbus TCP needs a host and a port 1..65535")
        elif not self.port:
            raise ValueError(f"{self.device_id}: RTU needs a serial device path as port")
        if self.poll_interval_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"{self.device_id}: poll_interval_s >= 0 and timeout_s > 0")
        if self.retries < 0 or self.offline_after < 1:
            raise ValueError(f"{self.device_id}: retries >= 0 and offline_after >= 1")

    @property
    def endpoint(self) -> Endpoint:
        if isinstance(self.port, str):
            return Endpoint(None, self.port, self.baudrate, self.parity, self.stopbits,
                            self.bytesize)
        return Endpoint(self.host, self.port)


@dataclass(frozen=True, slots=True)
class CycleStats:
    """Timing of one poll cycle (monotonic seconds), for benchmarks and /metrics."""

    device_id: str
    scheduled: float
    started: float
    finished: float
    ok: bool


class _Unit:
    """The shell around one unit: its link, its schedule, its health."""

    def __init__(self, spec: ModbusDeviceSpec, profile: Profile, link: ModbusLink,
                 fleet: ModbusFleet) -> None:
        self.spec, self.profile, self.link, self.fleet = spec, profile, link, fleet
        self.blocks: tuple[ReadBlock, ...] = plan_reads(profile)
        self.policy = HealthPolicy(offline_after=spec.offline_after,
                                   probe_max_s=fleet.probe_max_s)
        self.health = DeviceHealth(spec.device_id)
        # Readings of a polled unit are numbered from the wall clock in ms, so that a
        # restarted gateway keeps seq increasing for the pipeline's duplicate check.
        self.seq = int(fleet.clock() * 1000)
        self._refused: set[tuple[str, int, int]] = set()
        self._reads = tuple((b, self._read(b.input_type, b.start, b.count)) for b in self.blocks)

    async def attempt(self, op: Callable[[], Awaitable[T]], attempts: int) -> T:
        for attempt in range(attempts):
            try:
                return await op()
            except RequestError as exc:
                if not exc.retryable or attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(min(1.0, self.fleet.retry_backoff_s * 2**attempt))
        raise AssertionError("unreachable: attempts >= 1")

    def _read(
        self, input_type: str, address: int, count: int
    ) -> Callable[[], Awaitable[list[int]]]:
        spec = self.spec
        return lambda: self.link.read(spec.unit_id, input_type, address, count, spec.timeout_s)

    def _write(self, input_type: str, address: int, words: Sequence[int]
               ) -> Callable[[], Awaitable[None]]:
        spec = self.spec
        return lambda: self.link.write(spec.unit_id, input_type, address, words, spec.timeout_s)

    async def run(self, phase_s: float) -> None:
        loop = asyncio.get_running_loop()
        scheduled = loop.time() + phase_s
        while not self.fleet.stopping:
            delay = scheduled - loop.time()
            if delay > 0:  # back-to-back polling yields inside the request anyway
                await asyncio.sleep(delay)
            started = loop.time()
            try:
                ok = await self.poll_once()
            except Exception as exc:  # a bug must not stop this unit's polling, nor others'
                log.exception("%s: poll failed unexpectedly", self.spec.device_id)
                self.health = record_failure(self.health, self.fleet.clock(), repr(exc),
                                             self.policy)  # so it backs off like a dead unit
                ok = False
            finished = loop.time()
            if self.fleet.on_cycle is not None:
                stats = CycleStats(self.spec.device_id, scheduled, started, finished, ok)
                try:
                    self.fleet.on_cycle(stats)
                except Exception:
                    log.exception("%s: cycle subscriber failed", self.spec.device_id)
            scheduled = next_poll_at(self.health, scheduled=scheduled, now=finished,
                                     interval_s=self.spec.poll_interval_s, policy=self.policy)

    async def poll_once(self) -> bool:
        """One cycle over all read blocks; False when the unit did not answer."""
        attempts = 1 if self.health.state == "offline" else 1 + self.spec.retries
        metrics: dict[str, float] = {}
        rejected: list[str] = []
        failure: RequestError | None = None
        for block, read in self._reads:
            try:
                payload = await self.attempt(read, attempts)
            except RequestError as exc:
                if exc.retryable:
                    failure = exc
                    break
                self._note_refused(block, exc)  # it answered: alive, but not this block
                continue
            got, bad = decode_block(block, payload)
            metrics.update(got)
            rejected.extend(bad)
        now = self.fleet.clock()
        before = self.health.state
        if failure is not None:
            self.health = record_failure(self.health, now, str(failure), self.policy)
            if self.health.state == "offline" and before != "offline":
                log.warning("%s: offline after %d failed polls: %s", self.spec.device_id,
                            self.health.consecutive_failures, failure)
            return False
        self.health = record_success(self.health, now)
        if before == "offline":
            log.info("%s: back online", self.spec.device_id)
        if rejected:
            self.health = record_rejected(self.health, len(rejected),
                                          f"implausible values dropped: {', '.join(rejected)}")
            log.debug("%s: dropped implausible %s", self.spec.device_id, rejected)
        if metrics:
            self.publish(metrics, now)
        return True

    def _note_refused(self, block: ReadBlock, exc: RequestError) -> None:
        key = (block.input_type, block.start, getattr(exc, "code", 0))
        if key not in self._refused:
            self._refused.add(key)
            names = ", ".join(r.name for r in block.registers)
            log.warning("%s: unit refuses %s %d+%d (%s): %s", self.spec.device_id,
                        block.input_type, block.start, block.count, names, exc)

    def publish(self, metrics: dict[str, float], now: float) -> None:
        """Hand a reading to the subscriber; `metrics` becomes the reading's (no copy)."""
        self.seq += 1
        reading = Reading(self.spec.device_id, self.spec.kind, now, metrics, self.seq)
        try:
            self.fleet.on_reading(reading)
        except Exception:
            log.exception("%s: reading subscriber failed", self.spec.device_id)

    async def write(self, values: Mapping[str, float]) -> dict[str, float]:
        ops = plan_write(self.profile, values, self.spec.device_id)  # raises before any I/O
        spec, attempts = self.spec, 1 + self.spec.retries
        written: list[str] = []
        for op in ops:
            reg = op.register
            send = self._write(reg.input_type, reg.address, op.words)
            try:
                await self.attempt(send, attempts)
            except RequestError as exc:
                if written:
                    exc.add_note(f"already written to {spec.device_id}: {', '.join(written)}")
                raise
            written.append(reg.name)
        readback: dict[str, float] = {}
        for op in ops:
            reg = op.register
            words = await self.attempt(self._read(reg.input_type, reg.address, reg.width),
                                       attempts)
            readback[reg.name] = decode(reg, words)
            if abs(readback[reg.name] - op.value) > abs(reg.scale) / 2 + 1e-9:
                log.warning("%s: wrote %s=%g, unit reports %g", spec.device_id, reg.name,
                            op.value, readback[reg.name])
        now = self.fleet.clock()
        self.health = record_success(self.health, now)
        self.publish(dict(readback), now)
        return readback


class ModbusFleet:
    """Polls every configured Modbus unit and takes writes for them.

    An async context manager that owns one task per unit; `on_reading` (e.g.
    the gateway's PolledReadings.enqueue) is called from the event loop and must not block.
    """

    def __init__(
        self,
        devices: Sequence[ModbusDeviceSpec],
        on_reading: Callable[[Reading], None],
        *,
        on_cycle: Callable[[CycleStats], None] | None = None,
        clock: Callable[[], float] = time.time,
        retry_backoff_s: float = 0.05,
        probe_max_s: float = 60.0,
        late_window_s: float | None = None,
        profiles: Mapping[str, Profile] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """Load and check every profile now, so a bad map fails before anything starts."""
        self.on_reading = on_reading
        self.on_cycle = on_cycle
        self.clock = clock
        self.retry_backoff_s = retry_backoff_s
        self.probe_max_s = probe_max_s
        loaded: dict[str, Profile] = dict(profiles or {})
        links: dict[tuple[str | None, int | str], ModbusLink] = {}
        self._units: dict[str, _Unit] = {}
        for spec in devices:
            if spec.device_id in self._units:
                raise ValueError(f"Modbus device {spec.device_id!r} configured twice")
            if spec.profile not in loaded:
                loaded[spec.profile] = load_profile(spec.profile)
            profile = loaded[spec.profile]
            if profile.kind is not None and profile.kind != spec.kind:
                log.warning("%s: kind %r but profile %s is for %r", spec.device_id, spec.kind,
                            profile.profile, profile.kind)
            endpoint = spec.endpoint
            key = (endpoint.host, endpoint.port)
            link = links.get(key)
            if link is None:
                link = links[key] = ModbusLink(endpoint, late_window_s=late_window_s)
            elif link.endpoint != endpoint:
                raise ValueError(f"{spec.device_id}: serial settings differ from other units on"
                                 f" {endpoint.port} ({link.endpoint.label})")
            self._units[spec.device_id] = _Unit(spec, profile, link, self)
        self._links = list(links.values())
        self._tasks = ComponentTasks(supervisor, "modbus")
        self.stopping = False

    async def __aenter__(self) -> ModbusFleet:
        await self._tasks.start()
        for index, unit in enumerate(self._units.values()):
            phase = (index * _GOLDEN) % 1.0 * unit.spec.poll_interval_s
            self._tasks.spawn(f"modbus:{unit.spec.device_id}", functools.partial(unit.run, phase))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping = True
        await self._tasks.stop()
        for link in self._links:
            await link.close()

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(self._units)

    def profile(self, device_id: str) -> Profile:
        return self._unit(device_id).profile

    def _unit(self, device_id: str) -> _Unit:
        try:
            return self._units[device_id]
        except KeyError:
            raise UnknownDevice(device_id) from None

    async def write(self, device_id: str, values: Mapping[str, float]) -> Mapping[str, float]:
        """Validate all values against the profile, write them, read them back.

        Raises UnknownDevice or WriteRefused before anything is sent, and a RequestError
        subclass (with a note naming what was already written) if the unit fails midway.
        Returns the values the unit reports after the write; they are also published as a
        Reading so telemetry shows the change at once.
        """
        return await self._unit(device_id).write(values)

    async def poll(self, device_id: str) -> bool:
        """Poll one unit now, outside its schedule (after a command, for a status check)."""
        return await self._unit(device_id).poll_once()

    def health(self) -> Mapping[str, DeviceHealth]:
        return MappingProxyType({d: u.health for d, u in self._units.items()})
