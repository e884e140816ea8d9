"""The gateway process: the composition root that wires drivers, services and the API.

Every long-lived task runs under one Supervisor (device_drivers.supervision): a component
that crashes is restarted with backoff, or, if it cannot stay up (or is the API server),
takes the process down with a non-zero exit instead of leaving it looking healthy.

Start-up order follows dependencies (store -> access index -> audit -> MQTT -> Modbus ->
API); shutdown runs in reverse through one AsyncExitStack, so pending audit entries and
in-flight payments are flushed before the database is let go. SIGTERM/SIGINT set the stop
event; everything is down within a few seconds.

Telemetry is ingested by a separate process (gateway.telemetry.worker, started and
supervised here), so a telemetry flood never shares this event loop with access decisions;
this process publishes polled Modbus readings as the units' MQTT telemetry and reads the
worker's health report for /readyz and /metrics.

Live events for the API's Server-Sent Events (gateway.events) are fed from what this process
already handles (gateway.devices.live): decisions, payments, remote opens, the alerts its
control session subscribes to, and once a second device presence and the latest readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any, cast

import aiomqtt
import uvicorn
from bleak.backends.scanner import BaseBleakScanner
from fastapi import APIRouter
from sqlalchemy import Engine

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import all_extra_routers
from api.services import ApiServices
from device_drivers.ble import BleScanner, BleScannerConfig
from device_drivers.mqtt import MessageHandler, MqttLink
from device_drivers.mqtt_protocol import (
    alert_subscription,
    control_subscriptions,
    device_topic,
    gateway_status_topic,
)
from device_drivers.supervision import ComponentFailed, SupervisedTask, Supervisor
from gateway.access.audit import AuditLog
from gateway.access.presence import GatewayPresence, new_instance_id
from gateway.access.service import AccessService
from gateway.app.telemetry_process import TelemetryProcess
from gateway.canteen.offline_windows import OfflineWindows
from gateway.canteen.terminals import CanteenService
from gateway.config import ConfigError, SiteConfig
from gateway.devices.ha_discovery import (
    control_subscription,
    control_topic,
    parse_control,
    publish_discovery,
)
from gateway.devices.live import AuditTap, DevicePresence, LiveFeed, PaymentTap, alert_event
from gateway.devices.modbus import ModbusCommands, modbus_fleet
from gateway.devices.polled_readings import PolledReadings
from gateway.devices.router import DeviceRouter
from gateway.events import EventHub
from gateway.metrics import Registry
from gateway.store import db
from gateway.telemetry import health_topic
from gateway.telemetry.alerts import AlertStore
from gateway.telemetry.health import TelemetryHealth
from gateway.telemetry.latest_store import LatestCache
from gateway.telemetry.series import SeriesQuery

log = logging.getLogger(__name__)


class _ApiServer(uvicorn.Server):
    """Uvicorn without its own signal handling: the runtime owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    def __init__(
        self,
        config: SiteConfig,
        extra_routers: Sequence[APIRouter] = (),
        ble_backend: type[BaseBleakScanner] | None = None,
        *,
        freeze_after_start: bool = False,
    ) -> None:
        self._ble_backend = ble_backend
        self._freeze_after_start = freeze_after_start
        self.config = config
        self.metrics = Registry()
        self.started = asyncio.Event()
        self.api_port: int | None = None
        self.router: DeviceRouter | None = None
        self.link: MqttLink | None = None  # the control session; answers go out here
        self.telemetry_health = TelemetryHealth()
        self.events = EventHub(self.metrics)  # live events for /api/v1/events
        self.telemetry_worker: TelemetryProcess | None = None
        self.supervisor: Supervisor | None = None
        self._extra_routers = list(extra_routers)
        if config.api.enabled and config.api.jwt_secret is None:
            raise ConfigError(
                "environment", ["api.jwt_secret: set SCGW__API__JWT_SECRET (32+ characters)"]
            )

    async def _publish(self, topic: str, payload: bytes) -> None:
        if self.link is None:
            raise aiomqtt.MqttError("the gateway's MQTT link is not up yet")
        if self.router is not None:  # so its echo is not taken for someone else's message
            self.router.note_outgoing(topic, payload)
        await self.link.publish(topic, payload)

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        await asyncio.to_thread(db.upgrade, cfg.database.url)
        engine = db.make_engine(cfg.database.url)
        try:
            async with Supervisor("gateway") as supervisor, AsyncExitStack() as stack:
                self.supervisor = supervisor
                await self._run_components(stack, supervisor, engine, stop)
        finally:
            engine.dispose()
            log.info("gateway stopped")

    async def _run_components(
        self, stack: AsyncExitStack, supervisor: Supervisor, engine: Engine, stop: asyncio.Event
    ) -> None:
        cfg = self.config
        devices = {d.device_id: d for d in cfg.devices}
        # Issue 11: decisions are recorded (audit row + spent token) before they are sent;
        # the audit log comes first so it outlives everything that records into it.
        instance = new_instance_id()
        audit = await stack.enter_async_context(AuditLog.from_config(
            engine, cfg, supervisor=supervisor, instance_id=instance))
        access = await stack.enter_async_context(
            AccessService.from_config(engine, cfg, supervisor=supervisor, journal=audit))
        observer = _AuditObserver(audit)
        windows = await stack.enter_async_context(
            OfflineWindows.from_config(engine, cfg, instance_id=instance, supervisor=supervisor))
        hub = self.events
        pay_tap = PaymentTap(cfg.mqtt.root, self._publish, hub)
        # The canteen resolves through a wrapper that notes whose purse paid, for the event.
        payments = await stack.enter_async_context(
            CanteenService(engine, cfg, cast(AccessService, pay_tap.access(access)),
                           pay_tap.publish, observer.record, self.metrics, windows=windows)
        )
        for outcome in ("approved", "refused", "shortfall", "retry", "malformed"):
            self.metrics.counter_func(
                f"scgw_canteen_payments_{outcome}_total",
                f"Canteen payments answered: {outcome}.",
                lambda o=outcome: float(payments.counts()[o]),  # type: ignore[misc]
            )
        latest = await stack.enter_async_context(
            LatestCache(engine, set(devices), supervisor=supervisor))
        polled = await stack.enter_async_context(
            PolledReadings(cfg.mqtt.root, cfg.site.id, self._publish, supervisor=supervisor))
        modbus = await stack.enter_async_context(modbus_fleet(cfg, polled.enqueue, supervisor))
        commands = await stack.enter_async_context(
            ModbusCommands(cfg.mqtt.root, modbus, self._publish)
        )
        self.router = DeviceRouter(
            root=cfg.mqtt.root,
            devices=devices,
            access=access,
            publish=self._publish,
            metrics=self.metrics,
            payments=payments,
            commands=commands,
            status_observer=windows,
            events=hub,
        )
        stack.push_async_callback(self.router.close)
        client_id = cfg.mqtt.client_id or f"scgw-{cfg.site.id}-{secrets.token_hex(3)}"
        health = health_topic(cfg.mqtt.root, cfg.site.id)
        router = self.router
        alerts_prefix = f"{cfg.mqtt.root}/alerts/"

        ha_control = (control_topic(cfg.mqtt.root, cfg.site.id, "", "")[:-1]
                      if cfg.home_assistant.discovery else None)

        async def on_control(topic: str, payload: bytes) -> None:
            if topic == health:
                self.telemetry_health.update(payload)
            elif topic.startswith(alerts_prefix):
                alert_event(hub, payload)
            elif ha_control is not None and topic.startswith(ha_control):
                await self._home_assistant_asks(topic, payload, commands)
            else:
                await router.on_message(topic, payload)

        self.link = await stack.enter_async_context(self._mqtt_link(
            f"{client_id}-ctl",
            [*control_subscriptions(cfg.mqtt.root), *commands.subscriptions(),
             *router.watch_subscriptions(), health, alert_subscription(cfg.mqtt.root),
             *([control_subscription(cfg.mqtt.root, cfg.site.id)] if ha_control else [])],
            on_control, supervisor,
            status_topic=gateway_status_topic(cfg.mqtt.root, cfg.site.id)))
        self._register_link_metrics()
        link = self.link
        await stack.enter_async_context(GatewayPresence(
            engine, instance, link.connected.is_set, audit.reportable_seq,
            supervisor=supervisor))
        if cfg.home_assistant.discovery:
            supervisor.spawn("home-assistant-discovery", self._announce_to_home_assistant)
        worker = self.telemetry_worker = TelemetryProcess(cfg)
        supervisor.spawn("telemetry-worker", worker.run)
        self.metrics.counter_func(
            "scgw_telemetry_worker_recycles_total",
            "Hand-overs to a fresh telemetry worker to give memory back after a backlog.",
            lambda: float(worker.recycles))
        stack.push_async_callback(worker.stop)
        await self._start_ble_readers(stack, supervisor)
        energy = SeriesQuery.from_config(engine, cfg)
        stack.callback(energy.dispose)
        alerts = AlertStore(engine)
        stack.callback(alerts.dispose)
        presence = DevicePresence(list(devices), self.router.state, modbus.health, latest)
        feed = LiveFeed(hub, presence, {d: c.kind for d, c in devices.items()}, latest)
        supervisor.spawn("live-events", feed.run)
        services = ApiServices(access=access, audit=AuditTap(audit, hub),
                               canteen=payments.ledger, modbus=modbus, latest=latest,
                               energy=energy, alerts=alerts, device_state=presence)
        server = self._api_server(engine, services) if cfg.api.enabled else None
        serving: SupervisedTask | None = None
        if server is not None:
            serving = supervisor.spawn("api-server", server.serve, restart=False)
            await _until_listening(server, serving)
            self.api_port = server.servers[0].sockets[0].getsockname()[1]
            log.info("API listening on http://%s:%d", cfg.api.host, self.api_port)
        if self._freeze_after_start:
            # What start-up built (modules, the site model, the access index, the API's
            # routes) lives as long as the process: frozen, a full collection stops walking
            # it. Measured in `scgw run`: a gen-2 collection held this event loop, and any
            # card decision waiting on it, 83-93 ms with ~136,000 objects tracked, about once
            # a minute; 1.3-1.6 ms once frozen. Only for the process that owns the
            # interpreter (`scgw run`), not for a gateway run inside tests: garbage in cycles
            # among frozen objects is never collected. The index refers by id, not in
            # cycles, so a replaced index is still freed by reference counting.
            gc.collect()
            gc.freeze()
        self.started.set()
        await stop.wait()
        log.info("stopping")
        if server is not None and serving is not None:
            server.should_exit = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    await serving.join()

    def _mqtt_link(
        self, client_id: str, topics: list[str], on_message: MessageHandler,
        supervisor: Supervisor, *, status_topic: str | None = None,
        max_queued: int = 100_000,
    ) -> MqttLink:
        mqtt = self.config.mqtt
        return MqttLink(
            host=mqtt.host,
            port=mqtt.port,
            client_id=client_id,
            status_topic=status_topic,
            subscriptions=topics,
            on_message=on_message,
            username=mqtt.username,
            password=mqtt.password.get_secret_value() if mqtt.password else None,
            tls=mqtt.tls,
            keepalive_s=mqtt.keepalive_s,
            reconnect_min_s=mqtt.reconnect_min_s,
            reconnect_max_s=mqtt.reconnect_max_s,
            max_queued=max_queued,
            supervisor=supervisor,
        )

    async def _home_assistant_asks(self, topic: str, payload: bytes,
                                   commands: ModbusCommands) -> None:
        """A Home Assistant control message becomes the contract's `set` command for the
        unit: the same profile checks, the same answer on `command/result`."""
        asked = parse_control(self.config.mqtt.root, self.config.site.id, topic, payload)
        device = None if isinstance(asked, str) else next(
            (d for d in self.config.devices if d.device_id == asked[0] and d.is_modbus), None)
        if isinstance(asked, str) or device is None:
            log.warning("home assistant: refused %s", asked if isinstance(asked, str)
                        else f"{asked[0][:64]!r}: not a Modbus unit of this site")
            return
        command = {"action": "set", "command_id": f"ha-{secrets.token_hex(4)}",
                   "values": asked[1]}
        await commands.handle(device, json.dumps(command).encode())

    async def _announce_to_home_assistant(self) -> None:
        """Home Assistant discovery, once connected: the configs are retained at the broker,
        so one announcement a start is enough (HA reads them whenever it starts)."""
        link = self.link
        assert link is not None  # spawned after the link is up
        await link.connected.wait()
        count = await publish_discovery(link, self.config, self.config.home_assistant.prefix)
        log.info("home assistant: %d discovery configs published", count)

    def _register_link_metrics(self) -> None:
        self.metrics.gauge(
            "scgw_mqtt_connected", "1 while connected to the broker.",
            lambda: float(self.link is not None and self.link.connected.is_set()),
        )
        self.telemetry_health.register_metrics(self.metrics)

    async def _start_ble_readers(self, stack: AsyncExitStack, supervisor: Supervisor) -> None:
        """One scanner per reader with a BLE radio; a missing radio is logged, not fatal."""
        assert self.router is not None
        for device in self.config.devices:
            if device.ble is None:
                continue
            scanner = BleScanner(
                BleScannerConfig(
                    device.device_id,
                    rssi_threshold_dbm=device.ble.rssi_threshold_dbm,
                    adapter=device.ble.adapter,
                ),
                self.router.on_ble_token,
                backend=self._ble_backend,
                supervisor=supervisor,
            )
            try:
                await stack.enter_async_context(scanner)
            except Exception as exc:  # bleak raises backend-specific errors
                log.error("BLE reader %s not started: %s", device.device_id, exc)

    def _api_server(self, engine: Engine, services: ApiServices) -> _ApiServer:
        cfg = self.config
        assert cfg.api.jwt_secret is not None
        link = self.link
        ctx = ApiContext(
            config=cfg,
            engine=engine,
            jwt=JwtSettings(
                cfg.api.jwt_secret.get_secret_value(), cfg.api.jwt_audience, cfg.api.token_ttl_s
            ),
            metrics=self.metrics,
            publish=self._publish,
            ready=lambda: link is not None and link.connected.is_set(),
            problems=self.telemetry_health.problems,
            services=services,
            events=self.events,
        )
        app = create_app(ctx, [*all_extra_routers(), *self._extra_routers])
        config = uvicorn.Config(
            app,
            host=cfg.api.host,
            port=cfg.api.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        return _ApiServer(config)


async def _until_listening(server: _ApiServer, serving: SupervisedTask) -> None:
    """Uvicorn offers a flag, not an event; a bind failure ends its task instead."""
    while not server.started:
        if not serving.running:
            raise ConfigError("api", ["the API server could not start (is the port in use?)"])
        await asyncio.sleep(0.02)


class _AuditObserver:
    def __init__(self, audit: Any) -> None:
        self._audit = audit

    def record(
        self, device: Any, decision: Any, now: float, request_id: str | None = None
    ) -> None:
        self._audit.record_decision(device.device_id, device.kind, decision, now, request_id)


def command_topic(config: SiteConfig, device_id: str) -> str:
    return device_topic(config.mqtt.root, device_id, "command")


def install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def remove() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    return remove


async def run_until_signal(gateway: Gateway, duration_s: float | None = None) -> None:
    stop = asyncio.Event()
    remove = install_signal_handlers(stop)
    if duration_s is not None:
        asyncio.get_running_loop().call_later(duration_s, stop.set)
    started = time.monotonic()
    try:
        await gateway.run(stop)
    except ExceptionGroup as group:
        failed, _ = group.split(ComponentFailed)
        if failed is None:
            raise
        names = ", ".join(sorted({e.name for e in failed.exceptions
                                  if isinstance(e, ComponentFailed)}))
        log.critical("gateway stopped because %s failed (see the traceback above)", names)
        raise SystemExit(1) from None
    finally:
        remove()
        log.info("ran for %.1f s", time.monotonic() - started)
