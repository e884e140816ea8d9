"""BLE reader: turns scgw tokens in phones' advertisements into access requests.

A phone advertises a 23-byte BLE token (device_drivers/tokens.py) as manufacturer data under
`BLE_COMPANY_ID`. Each scanner is bound to one reader device id (one adapter per reader, or
a shared adapter with per-reader RSSI thresholds), so a token heard near the elevator is
never presented at the gate. Phones repeat an advertisement many times a second; the same
token is handed on once, since a second presentation could only be refused as replayed.

The driver checks shape only (company id, version byte, length). Authentication, expiry and
replay are the access service's job, as for QR tokens arriving over MQTT.

The radio is bleak's: `BleakScanner` with a detection callback. Tests and the demo pass a
`backend` class (a `BaseBleakScanner`) in place of the platform's radio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner

from device_drivers.supervision import ComponentTasks, SupervisedTask, Supervisor
from device_drivers.tokens import (
    BLE_COMPANY_ID,
    BLE_TOKEN_BYTES,
    MAX_SKEW_STEPS,
    TIME_STEP_S,
    TokenKind,
    parse_bytes,
)

log = logging.getLogger(__name__)

CREDENTIAL_TYPE = "ble"
# A token is accepted for its own step plus the skew on either side; remembering it that
# long means a phone lingering at a reader never produces a second (replayed) request.
TOKEN_LIFETIME_S = float((1 + 2 * MAX_SKEW_STEPS) * TIME_STEP_S)

TokenHandler = Callable[[str, str, str], Awaitable[None]]
"""Called as `handler(reader_device_id, "ble", token_hex)`, the shape of an MQTT request."""


@dataclass(frozen=True, slots=True)
class BleScannerConfig:
    reader_device_id: str
    rssi_threshold_dbm: int = -75
    adapter: str | None = None  # BlueZ adapter such as "hci1"; None = the default one
    company_id: int = BLE_COMPANY_ID
    dedupe_s: float = TOKEN_LIFETIME_S
    scanning_mode: Literal["active", "passive"] = "active"
    queue_size: int = 256


@dataclass
class BleStats:
    """Counters for /metrics; a rising `weak` count suggests the threshold is too strict."""

    advertisements: int = 0
    foreign: int = 0  # no scgw token in the advertisement
    weak: int = 0  # below the RSSI threshold
    duplicates: int = 0
    delivered: int = 0
    dropped: int = 0  # queue full: the handler is slower than the phones
    handler_errors: int = 0


def extract_token(adv: AdvertisementData, company_id: int = BLE_COMPANY_ID) -> bytes | None:
    """The raw BLE token in an advertisement, or None when it carries none of ours."""
    raw = adv.manufacturer_data.get(company_id)
    if raw is None or len(raw) != BLE_TOKEN_BYTES:
        return None
    token = parse_bytes(bytes(raw))
    if token is None or token.kind is not TokenKind.BLE:
        return None
    return bytes(raw)


class TokenDeduper:
    """Remembers tokens already handed on, for `window_s` after they were first heard.

    Memory is bounded by the number of distinct tokens heard within one window.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._first_seen: dict[bytes, float] = {}
        self._next_prune = 0.0

    def first_sighting(self, token: bytes, now: float) -> bool:
        if now >= self._next_prune:
            cutoff = now - self.window_s
            self._first_seen = {t: s for t, s in self._first_seen.items() if s > cutoff}
            self._next_prune = now + min(self.window_s, 5.0)
        seen_at = self._first_seen.get(token)
        if seen_at is not None and now - seen_at < self.window_s:
            return False
        self._first_seen[token] = now
        return True

    def __len__(self) -> int:
        return len(self._first_seen)


class BleScanner:
    """One BLE reader: a bleak scanner bound to a reader device id.

    An async context manager that owns the radio scan and the delivery task. The detection
    callback runs in the event loop and only filters and enqueues, so a slow handler never
    stalls the radio; when the queue is full new tokens are dropped and counted.
    """

    def __init__(
        self,
        config: BleScannerConfig,
        handler: TokenHandler,
        *,
        backend: type[BaseBleakScanner] | None = None,
        clock: Callable[[], float] = time.monotonic,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.config = config
        self._tasks = ComponentTasks(supervisor, f"ble-{config.reader_device_id}")
        self.stats = BleStats()
        self._handler = handler
        self._backend = backend
        self._clock = clock
        self._deduper = TokenDeduper(config.dedupe_s)
        self._queue: asyncio.Queue[str] = asyncio.Queue(config.queue_size)
        self._scanner: BleakScanner | None = None
        self._delivery: SupervisedTask | None = None

    @property
    def reader_device_id(self) -> str:
        return self.config.reader_device_id

    async def __aenter__(self) -> Self:
        bluez = {"adapter": self.config.adapter} if self.config.adapter else {}
        scanner = BleakScanner(
            self.on_advertisement,
            None,
            self.config.scanning_mode,
            bluez=bluez,  # type: ignore[arg-type]
            backend=self._backend,
        )
        await self._tasks.start()
        self._delivery = self._tasks.spawn(f"ble-deliver-{self.reader_device_id}", self._deliver)
        try:
            await scanner.start()
        except BaseException:
            await self._stop_delivery()
            raise
        self._scanner = scanner
        log.info("BLE reader %s scanning (adapter %s, threshold %d dBm)",
                 self.reader_device_id, self.config.adapter or "default",
                 self.config.rssi_threshold_dbm)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scanner, self._scanner = self._scanner, None
        try:
            if scanner is not None:
                await scanner.stop()
        finally:
            await self._stop_delivery()

    def on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak's detection callback: filter, de-duplicate, enqueue; never blocks."""
        self.stats.advertisements += 1
        raw = extract_token(adv, self.config.company_id)
        if raw is None:
            self.stats.foreign += 1
            return
        if adv.rssi < self.config.rssi_threshold_dbm:
            # Not remembered: the same token may still be accepted as the phone comes closer.
            self.stats.weak += 1
            return
        if not self._deduper.first_sighting(raw, self._clock()):
            self.stats.duplicates += 1
            return
        try:
            self._queue.put_nowait(raw.hex())
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.warning("BLE reader %s: handler too slow, token dropped", self.reader_device_id)

    async def _deliver(self) -> None:
        while True:
            token_hex = await self._queue.get()
            try:
                await self._handler(self.reader_device_id, CREDENTIAL_TYPE, token_hex)
                self.stats.delivered += 1
            except Exception:
                self.stats.handler_errors += 1
                log.exception("BLE reader %s: token handler failed", self.reader_device_id)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait until every enqueued token has been handed to the handler."""
        await self._queue.join()

    async def _stop_delivery(self) -> None:
        delivery, self._delivery = self._delivery, None
        # Tokens already accepted are handed on before stopping: the person is at the door.
        if delivery is not None and delivery.running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._queue.join()
        await self._tasks.stop()
