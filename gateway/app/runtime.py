"""The gateway process: one asyncio TaskGroup owning MQTT, drivers and the API server.

Start-up order follows dependencies (store -> access index -> audit -> MQTT -> Modbus ->
API); shutdown runs in reverse through one AsyncExitStack, so pending audit entries and
in-flight payments are flushed before the database is let go. SIGTERM/SIGINT set the stop
event; everything is down within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import uvicorn
from bleak.backends.scanner import BaseBleakScanner
from fastapi import APIRouter
from sqlalchemy import Engine

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import all_extra_routers
from device_drivers.ble import BleScanner, BleScannerConfig
from device_drivers.mqtt import MqttLink
from device_drivers.mqtt_protocol import device_topic, subscriptions
from gateway.access.audit import AuditLog
from gateway.access.service import AccessService
from gateway.canteen.terminals import CanteenService
from gateway.config import ConfigError, SiteConfig
from gateway.devices.modbus import ModbusCommands, modbus_fleet
from gateway.devices.router import DeviceRouter
from gateway.metrics import Registry
from gateway.store import db
from gateway.telemetry.bus import TelemetryBus
from gateway.telemetry.latest import LatestReadings

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
    ) -> None:
        self._ble_backend = ble_backend
        self.config = config
        self.metrics = Registry()
        self.bus = TelemetryBus()
        self.started = asyncio.Event()
        self.api_port: int | None = None
        self.router: DeviceRouter | None = None
        self.link: MqttLink | None = None
        self._extra_routers = list(extra_routers)
        if config.api.enabled and config.api.jwt_secret is None:
            raise ConfigError(
                "environment", ["api.jwt_secret: set SCGW__API__JWT_SECRET (32+ characters)"]
            )

    async def _publish(self, topic: str, payload: bytes) -> None:
        assert self.link is not None
        await self.link.publish(topic, payload)

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        await asyncio.to_thread(db.upgrade, cfg.database.url)
        engine = db.make_engine(cfg.database.url)
        try:
            async with AsyncExitStack() as stack:
                await self._run_components(stack, engine, stop)
        finally:
            engine.dispose()
            log.info("gateway stopped")

    async def _run_components(
        self, stack: AsyncExitStack, engine: Engine, stop: asyncio.Event
    ) -> None:
        cfg = self.config
        devices = {d.device_id: d for d in cfg.devices}
        access = await stack.enter_async_context(AccessService.from_config(engine, cfg))
        audit = await stack.enter_async_context(AuditLog(engine))
        observer = _AuditObserver(audit)
        payments = await stack.enter_async_context(
            CanteenService(engine, cfg, access, self._publish, observer.record)
        )
        for outcome in ("approved", "refused", "shortfall", "retry", "malformed"):
            self.metrics.gauge(
                f"scgw_canteen_payments_{outcome}_total",
                f"Canteen payments answered: {outcome}.",
                lambda o=outcome: float(payments.counts()[o]),  # type: ignore[misc]
            )
        latest = await stack.enter_async_context(LatestReadings(self.bus, set(devices)))
        modbus = await stack.enter_async_context(modbus_fleet(cfg, self.bus))
        commands = await stack.enter_async_context(
            ModbusCommands(cfg.mqtt.root, modbus, self._publish)
        )
        self.router = DeviceRouter(
            root=cfg.mqtt.root,
            devices=devices,
            access=access,
            publish=self._publish,
            metrics=self.metrics,
            bus=self.bus,
            payments=payments,
            observer=observer,
            commands=commands,
        )
        client_id = cfg.mqtt.client_id or f"scgw-{cfg.site.id}-{secrets.token_hex(3)}"
        password = cfg.mqtt.password.get_secret_value() if cfg.mqtt.password else None
        self.link = await stack.enter_async_context(
            MqttLink(
                host=cfg.mqtt.host,
                port=cfg.mqtt.port,
                client_id=client_id,
                status_topic=f"{cfg.mqtt.root}/gateway/{cfg.site.id}/status",
                subscriptions=[*subscriptions(cfg.mqtt.root), *commands.subscriptions()],
                on_message=self.router.on_message,
                username=cfg.mqtt.username,
                password=password,
                tls=cfg.mqtt.tls,
                keepalive_s=cfg.mqtt.keepalive_s,
                reconnect_min_s=cfg.mqtt.reconnect_min_s,
                reconnect_max_s=cfg.mqtt.reconnect_max_s,
            )
        )
        self.metrics.gauge(
            "scgw_mqtt_connected", "1 while connected to the broker.",
            lambda: float(self.link is not None and self.link.connected.is_set()),
        )
        await self._start_ble_readers(stack)
        async with asyncio.TaskGroup() as tasks:
            extras = {"modbus": modbus, "canteen": payments, "latest": latest, "audit": audit}
            server = self._api_server(engine, access, extras) if cfg.api.enabled else None
            if server is not None:
                serving = tasks.create_task(server.serve(), name="api-server")
                await _until_listening(server, serving)
                self.api_port = server.servers[0].sockets[0].getsockname()[1]
                log.info("API listening on http://%s:%d", cfg.api.host, self.api_port)
            self.started.set()
            await stop.wait()
            log.info("stopping")
            if server is not None:
                server.should_exit = True

    async def _start_ble_readers(self, stack: AsyncExitStack) -> None:
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
            )
            try:
                await stack.enter_async_context(scanner)
            except Exception as exc:  # bleak raises backend-specific errors
                log.error("BLE reader %s not started: %s", device.device_id, exc)

    def _api_server(self, engine: Engine, access: Any, extras: dict[str, Any]) -> _ApiServer:
        cfg = self.config
        assert cfg.api.jwt_secret is not None and self.router is not None
        link = self.link
        ctx = ApiContext(
            config=cfg,
            engine=engine,
            jwt=JwtSettings(
                cfg.api.jwt_secret.get_secret_value(), cfg.api.jwt_audience, cfg.api.token_ttl_s
            ),
            metrics=self.metrics,
            access=access,
            publish=self._publish,
            device_state=self.router.state,
            ready=lambda: link is not None and link.connected.is_set(),
            extras=extras,
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


async def _until_listening(server: _ApiServer, serving: asyncio.Task[None]) -> None:
    """Uvicorn offers a flag, not an event; a bind failure ends its task instead."""
    while not server.started:
        if serving.done():
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
    finally:
        remove()
        log.info("ran for %.1f s", time.monotonic() - started)
