"""Plays a scenario against a broker, as the community's devices would.

One MQTT connection per device, logged in as that device (a real site has one per reader,
terminal and meter; even a large community's few thousand connections are ordinary for
Mosquitto or EMQX): readers and terminals are `simulators.readers` / this package's
terminal, meters and MQTT units publish the rule scenarios' readings, Modbus units are
served by `simulators.modbus_units` over Modbus TCP for the gateway to poll. A read-only
monitor login, when the credentials file has one, watches the alerts the gateway raises.

Requests are published in the order of the plan (each device's messages leave in
simulated-time order); answers are awaited concurrently, so a slow answer never holds up
the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from device_drivers.mqtt_protocol import device_topic, encode, telemetry_payload
from device_drivers.supervision import cancel_until_done
from device_drivers.vocabulary import Credential, Reading
from simulators.device_link import device_connection
from simulators.faults import generate
from simulators.modbus_units import Fault as UnitFault
from simulators.modbus_units import SimulatedUnits, UnitSpec
from simulators.phone import SimulatedPhone
from simulators.physics import Environment
from simulators.readers import ReaderSimulator
from simulators.simulate.devices import Logins, SimTerminal
from simulators.simulate.plan import Event, Planner, SimClock, fault_starts, outdoor, resolve_start
from simulators.simulate.site import energy_scenario, residents
from simulators.simulate.spec import Spec

log = logging.getLogger(__name__)
TopUp = Callable[[str, int, str], Awaitable[bool]]
_UNBOUNDED_S = 30 * 86400.0  # energy generated ahead for a run without an end
# Polled units are stamped with the gateway's clock. Served while the simulated clock trails
# it by more, they would move the rules' event time so far ahead of the MQTT meters that
# every meter looks silent (the deadman's 10 minutes) at each reading.
MODBUS_LAG_S = 9 * 60.0  # plus a reading interval: under the deadman's 10 minutes


@dataclass
class Stats:
    """What the run did and saw; the progress display and the summary read it."""

    start: float = 0.0
    end: float | None = None
    now: float = 0.0
    published: Counter[str] = field(default_factory=Counter)  # by message kind
    decisions: Counter[str] = field(default_factory=Counter)  # granted / denied
    denials: Counter[str] = field(default_factory=Counter)  # by reason
    payments: Counter[str] = field(default_factory=Counter)  # sale outcomes
    batch: Counter[str] = field(default_factory=Counter)  # offline upload results
    spent_cents: int = 0
    topups: int = 0
    topup_cents: int = 0
    alerts: Counter[str] = field(default_factory=Counter)  # firing, by rule id
    resolved: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    events: list[tuple[float, str, str, int, str, int, str]] = field(default_factory=list)
    devices: int = 0
    done: bool = False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Simulation:
    spec: Spec
    host: str
    port: int
    logins: Logins = field(default_factory=Logins.anonymous)
    speed: float = 60.0
    duration_s: float | None = None  # None: the scenario's (None there too: until stopped)
    start: float | None = None  # None: from the scenario
    phones: dict[str, SimulatedPhone] = field(default_factory=dict)
    topup: TopUp | None = None
    modbus_ports: dict[str, int] = field(default_factory=dict)
    modbus_host: str = "127.0.0.1"
    answer_timeout_s: float = 15.0
    stats: Stats = field(default_factory=Stats)
    _readers: dict[str, ReaderSimulator] = field(default_factory=dict)
    _terminals: dict[str, SimTerminal] = field(default_factory=dict)
    _meters: dict[str, aiomqtt.Client] = field(default_factory=dict)
    _units: SimulatedUnits | None = None
    _jobs: set[asyncio.Task[None]] = field(default_factory=set)
    _session: str = field(default_factory=lambda: secrets.token_hex(3))
    _numbers: Counter[str] = field(default_factory=Counter)
    _topping: set[str] = field(default_factory=set)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.people = residents(self.spec)
        self._anchor()
        for unit in self.spec.modbus:
            self.modbus_ports.setdefault(unit.id, unit.port or free_port(self.modbus_host))

    def _anchor(self) -> None:
        """Fix the simulated period: a relative start counts from now."""
        duration = self.duration_s if self.duration_s is not None else self.spec.duration_s
        self.t0 = self.start if self.start is not None else resolve_start(
            self.spec, time.time(), duration)
        self.t1 = None if duration is None else self.t0 + duration
        self.stats.start, self.stats.end, self.stats.now = self.t0, self.t1, self.t0

    @property
    def root(self) -> str:
        return self.spec.root

    async def run(self, stop: asyncio.Event | None = None,
                  ready: asyncio.Event | None = None) -> Stats:
        """Play until the scenario's end (or `stop`); returns the counts.

        `ready`: connect the readers and terminals (`connected` is set), then wait for it
        before the clock starts (the demo seeds the crowd meanwhile; `phones` may be
        filled in until then).
        """
        stop = stop or asyncio.Event()
        async with AsyncExitStack() as stack:
            await self._connect(stack)
            if ready is not None:
                waiters = [asyncio.create_task(e.wait()) for e in (ready, stop)]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                if stop.is_set():
                    self.stats.done = True
                    return self.stats
                self._anchor()
            await self._connect_energy(stack)
            monitor = asyncio.create_task(self._monitor(), name="simulate-monitor")
            try:
                await self._play(stop)
                await self._drain()
            finally:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
                await asyncio.gather(*(cancel_until_done(job) for job in list(self._jobs)))
        self.stats.done = True
        return self.stats

    # ---- connections -----------------------------------------------------------------------

    async def _connect(self, stack: AsyncExitStack) -> None:
        if self.spec.modbus:
            specs = [UnitSpec(u.profile, self.modbus_ports[u.id], host=self.modbus_host,
                              seed=self.spec.seed + i) for i, u in enumerate(self.spec.modbus)]
            self._units = SimulatedUnits(specs, time_scale=self.speed)
            stack.push_async_callback(self._units.close)
            if time.time() - self.t0 <= MODBUS_LAG_S:
                await self._serve_units()  # a gateway may poll them before the clock starts
            else:
                log.warning("the Modbus units join when the simulated clock reaches the "
                            "present: the gateway stamps what it polls with its own clock")
        for device, kind, _ in self.spec.readers():
            user, password = self.logins.of(device)
            self._readers[device] = await stack.enter_async_context(ReaderSimulator(
                self.host, self.port, device, kind, self.root, username=user, password=password))
        for device in self.spec.canteen.terminals:
            user, password = self.logins.of(device)
            self._terminals[device] = await stack.enter_async_context(SimTerminal(
                self.host, self.port, device, root=self.root, username=user, password=password,
                timeout_s=self.answer_timeout_s / 3, attempts=4))
        self.stats.devices = len(self._readers) + len(self._terminals)
        self.stats.published["status"] += self.stats.devices
        self.connected.set()

    async def _connect_energy(self, stack: AsyncExitStack) -> None:
        """Meters and units: the energy scenario starts where the clock does."""
        self.scenario = energy_scenario(self.spec, self.t0,
                                        (self.t1 or self.t0 + _UNBOUNDED_S) - self.t0,
                                        fault_starts(self.spec, self.t0))
        if self.scenario is not None:
            for device in self.scenario.device_kinds():
                user, password = self.logins.of(device)
                self._meters[device] = await stack.enter_async_context(device_connection(
                    self.host, self.port, self.root, device, (), user, password))
        self.stats.devices += len(self._meters)
        self.stats.published["status"] += len(self._meters)
        if self._units is not None and time.time() - self.t0 <= MODBUS_LAG_S:
            await self._serve_units()

    async def _serve_units(self) -> None:
        if self._units is not None:
            for port in sorted(set(self.modbus_ports.values())):
                await self._units.start(port)

    @property
    def readers(self) -> dict[str, ReaderSimulator]:
        """The connected readers (valid while `run` runs, after `connected`)."""
        return self._readers

    @property
    def terminals(self) -> dict[str, SimTerminal]:
        return self._terminals

    async def _monitor(self) -> None:
        """Count the alerts the gateway publishes (needs the monitor login)."""
        if self.logins.monitor is None and self.logins.devices:
            return
        user, password = self.logins.monitor or (None, None)
        try:
            async with aiomqtt.Client(self.host, self.port, username=user, password=password,
                                      identifier=f"sim-monitor-{self._session}") as client:
                await client.subscribe(f"{self.root}/alerts/#", qos=1)
                async for message in client.messages:
                    with contextlib.suppress(ValueError, TypeError):
                        data = json.loads(message.payload)
                        if data.get("state") == "firing":
                            self.stats.alerts[str(data.get("rule_id"))] += 1
                        elif data.get("state") == "resolved":
                            self.stats.resolved += 1
        except aiomqtt.MqttError as exc:
            log.warning("the monitor cannot watch alerts: %s", exc)

    # ---- the timeline ----------------------------------------------------------------------

    def _timeline(self) -> Iterator[tuple[float, int, Event | Reading]]:
        planner = Planner(self.spec, self.people, bool(self.phones))
        events = ((e.ts, 0, e) for e in planner.events(self.t0, self.t1))
        streams: list[Iterator[tuple[float, int, Event | Reading]]] = [events]
        if self.scenario is not None:
            streams.append((r.ts, 1, r) for r in generate(self.scenario))
        for ts, order, item in heapq.merge(*streams, key=lambda x: (x[0], x[1])):
            if self.t1 is not None and ts >= self.t1:
                return
            yield ts, order, item

    async def _play(self, stop: asyncio.Event) -> None:
        clock = SimClock(self.t0, self.speed)
        live = False
        for ts, _, item in self._timeline():
            while (delay := clock.delay(ts)) > 0.002:
                if stop.is_set():
                    return
                await asyncio.sleep(min(delay, 0.25))
                self.stats.now = clock.now()
            if not live and clock.caught_up():
                live = True  # simulated time is now: the Modbus physics follow the wall
                for unit in self._units.units if self._units is not None else []:
                    unit.time_scale = 1.0
                await self._serve_units()
            if stop.is_set():
                return
            self.stats.now = max(self.stats.now, ts)
            if isinstance(item, Reading):
                await self._reading(item)
            else:
                self.stats.events.append(item.describe())
                self._dispatch(item)
        while self.t1 is not None and (delay := clock.delay(self.t1)) > 0 and not stop.is_set():
            await asyncio.sleep(min(delay, 0.25))
            self.stats.now = clock.now()
        self.stats.now = self.t1 if self.t1 is not None else clock.now()

    async def _drain(self) -> None:
        """Let the answers in flight arrive, and bring dropped terminals back."""
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=self.answer_timeout_s + 5)
        for terminal in self._terminals.values():
            if not terminal.connected or terminal.queued:
                self._spawn(self._terminal_up(terminal))
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=self.answer_timeout_s + 5)

    async def _reading(self, reading: Reading) -> None:
        client = self._meters.get(reading.device_id)
        if client is None:
            return
        try:
            await client.publish(device_topic(self.root, reading.device_id, "telemetry"),
                                 telemetry_payload(reading), qos=1)
            self.stats.published["telemetry"] += 1
        except aiomqtt.MqttError as exc:
            self.stats.errors["telemetry not sent"] += 1
            log.warning("%s: telemetry not sent: %s", reading.device_id, exc)

    def _dispatch(self, event: Event) -> None:
        if event.kind == "access":
            self._spawn(self._access(event))
        elif event.kind == "meal":
            self._spawn(self._meal(event))
        elif event.kind == "door":
            self._spawn(self._door(event))
        elif event.kind == "terminal_down":
            self._spawn(self._terminals[event.device].drop())
            log.info("fault: %s drops off the network", event.device)
        elif event.kind == "terminal_up":
            self._spawn(self._terminal_up(self._terminals[event.device]))
        elif event.kind in ("modbus_down", "modbus_up") and self._units is not None:
            down = event.kind == "modbus_down"
            self._units.set_fault(self.modbus_ports[event.device], 1,
                                  UnitFault("dead") if down else UnitFault())
            log.info("fault: Modbus unit %s %s the bus", event.device,
                     "drops off" if down else "is back on")
        elif event.kind == "weather" and self._units is not None:
            temp, occupancy = outdoor(self.spec, event.ts)
            for unit in self._units.units:
                unit.env = Environment(outdoor_c=temp, occupants=0.5 + 6.0 * occupancy)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._guard(work))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _guard(self, work: Awaitable[Any]) -> None:
        try:
            await work
        except (aiomqtt.MqttError, TimeoutError) as exc:
            self.stats.errors[type(exc).__name__] += 1
            log.warning("simulated device action failed: %s", exc)
        except Exception as exc:  # one device's mishap must not end the community's day
            self.stats.errors[type(exc).__name__] += 1
            log.warning("simulated device action failed", exc_info=exc)

    def _credential(self, event: Event, card_kind: str) -> Credential:
        resident = self.people[event.resident]
        phone = self.phones.get(resident.resident_id)
        if event.credential == "qr" and phone is not None:
            return Credential("qr", phone.qr())
        return Credential("card", resident.cards[card_kind])

    async def _access(self, event: Event) -> None:
        reader = self._readers[event.device]
        cred = self._credential(event, reader.kind)
        self._numbers["request"] += 1
        request_id = f"r-{self._session}-{self._numbers['request']}"
        payload = encode({"request_id": request_id, "ts": event.ts,
                          "credential": {"type": cred.type, "value": cred.value}})
        self.stats.published["access/request"] += 1
        try:
            answer = await reader.send_raw(payload, request_id, self.answer_timeout_s)
        except TimeoutError:  # a real reader shows "try again"; the community goes on
            self.stats.decisions["unanswered"] += 1
            log.warning("%s: no decision within %.1f s", event.device, self.answer_timeout_s)
            return
        if answer.get("granted"):
            self.stats.decisions["granted"] += 1
        else:
            self.stats.decisions["denied"] += 1
            self.stats.denials[str(answer.get("reason"))] += 1

    async def _door(self, event: Event) -> None:
        log.info("fault: %s reports %s", event.device, event.detail)
        await self._readers[event.device].report_event(event.detail, ts=event.ts)
        self.stats.published["event"] += 1

    async def _meal(self, event: Event) -> None:
        terminal = self._terminals[event.device]
        resident = self.people[event.resident]
        cred = self._credential(event, "canteen")
        if terminal.online:
            self.stats.published["payment/request"] += 1
        sale = await terminal.sell_at(event.amount_cents, cred, event.ts)
        self.stats.payments[sale.outcome] += 1
        answer = sale.result or {}
        if sale.outcome == "approved":
            self.stats.spent_cents += sale.amount_cents
        balance = answer.get("balance_cents")
        low = isinstance(balance, int) and balance < self.spec.canteen.topup_below_cents
        if low or answer.get("reason") == "insufficient_funds":
            await self.top_up(resident.resident_id)

    async def top_up(self, resident_id: str) -> None:
        """Staff top the purse up at the service desk (REST, CONTRACT.md section 3)."""
        if self.topup is None or resident_id in self._topping:
            return
        self._topping.add(resident_id)
        try:
            self._numbers["topup"] += 1
            key = f"sim-{self._session}-{resident_id}-{self._numbers['topup']}"[:128]
            amount = self.spec.canteen.topup_cents
            if await self.topup(resident_id, amount, key):
                self.stats.topups += 1
                self.stats.topup_cents += amount
            else:
                self.stats.errors["top-up refused"] += 1
        finally:
            self._topping.discard(resident_id)

    async def _terminal_up(self, terminal: SimTerminal) -> None:
        queued = terminal.queued
        results = await terminal.reconnect()
        if queued:
            self.stats.published["payment/batch"] += 1
            log.info("%s is back: uploaded %d offline sales", terminal.device_id, queued)
        for result in results:
            self.stats.batch["approved" if result.get("approved")
                             else str(result.get("reason"))] += 1
