"""The canteen shell: payment messages from terminals -> credential -> ledger -> answer.

The ledger is blocking SQL, so messages are handled on one worker thread and a slow disk
never delays a gate. One thread, not a pool: writers to one SQLite file queue on its lock
anyway, and a pool of them measured p99 10-81 ms against 2-5 ms for a single writer.

Credential resolution, however, hops back onto the event loop: the access service (and
its site-wide replay guard) stays single-threaded, so a QR token presented at a canteen
and a gate in the same instant can be used only once. The resolution goes through
`AccessService.admit`, so it is audited and its token durably spent before the ledger is
asked; the ledger spends the token again under the same payment reference, which a retry of
that payment may do and nothing else may.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy import Engine

from device_drivers.mqtt_protocol import device_topic
from device_drivers.offline_sales import OfflineLimits
from device_drivers.supervision import RequestTasks
from device_drivers.vocabulary import Reason
from gateway.access.service import AccessService
from gateway.canteen.ledger import Ledger
from gateway.canteen.offline_windows import OfflineWindows
from gateway.canteen.payments import PaymentHandler
from gateway.config import DeviceConfig, SiteConfig
from gateway.metrics import Registry

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
Observe = Callable[[DeviceConfig, Any, float], None]
RESOLVE_TIMEOUT_S = 5.0
SHUTDOWN_GRACE_S = 2.0
T = TypeVar("T")


class CanteenService:
    def __init__(
        self,
        engine: Engine,
        config: SiteConfig,
        access: AccessService,
        publish: Publish,
        observe: Observe | None = None,
        metrics: Registry | None = None,
        windows: OfflineWindows | None = None,
    ) -> None:
        """`observe` is called for a resolution that admit() did not audit (no journal);
        `windows`: the terminals' offline windows (None: offline sales are believed at any
        time within the ts bounds)."""
        self._engine = engine
        self._windows = windows
        self._config = config
        self._access = access
        self._publish = publish
        self._observe = observe
        self._metrics = metrics
        if metrics is not None:
            metrics.histogram("scgw_canteen_payment_seconds",
                              "Time from a payment message's arrival to its answer being sent.")
        self._handlers: dict[str, PaymentHandler] = {}
        self._inflight = RequestTasks("canteen payments")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canteen-ledger")
        self.ledger: Ledger | None = None

    async def __aenter__(self) -> CanteenService:
        self._loop = asyncio.get_running_loop()
        limits = OfflineLimits.from_config(self._config.canteen)
        self.ledger = await self._in_worker(Ledger, self._engine, limits, time.time,
                                            self._config.site.timezone)
        await self._in_worker(self.ledger.warm_up)
        return self

    async def _in_worker(self, func: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._worker, func, *args)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Payments already taken from the broker are finished and answered, not dropped.
        await self._inflight.close(SHUTDOWN_GRACE_S)
        # Anything still queued was never applied; the terminal's retry will be.
        self._worker.shutdown(wait=False, cancel_futures=True)

    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for handler in self._handlers.values():
            total.update(handler.counts)
        return total

    def _handler(self, device: DeviceConfig) -> PaymentHandler:
        handler = self._handlers.get(device.device_id)
        if handler is None:
            assert self.ledger is not None
            windows = self._windows.windows if self._windows is not None else None
            handler = PaymentHandler(self.ledger, self._resolver(device), windows=windows)
            self._handlers[device.device_id] = handler
        return handler

    def _resolver(self, device: DeviceConfig) -> Callable[[str, str, float, str],
                                                          str | Reason]:
        loop = self._loop
        assert loop is not None

        async def on_loop(credential_type: str, value: str, now: float,
                          use_ref: str) -> str | Reason:
            decision = await self._access.admit(device.device_id, credential_type, value, now,
                                                request_id=use_ref, payment_ref=use_ref)
            if decision is None:  # cannot be: a payment's own reference is never a peer's
                return Reason.REPLAYED_TOKEN
            if self._observe is not None and self._access.journal is None:
                self._observe(device, decision, time.time())
            if decision.granted and decision.account is not None:
                return str(decision.account)
            return Reason(str(decision.reason or Reason.NOT_PERMITTED))

        def resolve(credential_type: str, value: str, now: float, use_ref: str) -> str | Reason:
            future = asyncio.run_coroutine_threadsafe(
                on_loop(credential_type, value, now, use_ref), loop)
            return future.result(RESOLVE_TIMEOUT_S)

        return resolve

    async def handle(self, device: DeviceConfig, channel: str, payload: bytes) -> None:
        """Start handling; the MQTT reader moves on to the next message at once."""
        if not self._inflight.start(self._handle(device, channel, payload)):
            log.error("canteen: too many payments in flight; %s will retry", device.device_id)

    async def _handle(self, device: DeviceConfig, channel: str, payload: bytes) -> None:
        handler = self._handler(device)
        started = time.perf_counter()
        try:
            reply = await self._in_worker(handler.handle, device.device_id, channel, payload)
        except Exception:
            log.exception("payment from %s failed; the terminal will retry", device.device_id)
            return
        if reply is None:
            return
        topic = device_topic(self._config.mqtt.root, device.device_id, reply.channel)
        try:
            await self._publish(topic, reply.payload)
            if self._metrics is not None:
                self._metrics.observe("scgw_canteen_payment_seconds",
                                      time.perf_counter() - started)
        except Exception:
            # The ledger holds the result; the terminal's retry gets it from there.
            log.warning("could not answer %s on %s", device.device_id, reply.channel)
