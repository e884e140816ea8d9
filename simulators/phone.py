"""A resident's phone: holds an enrolled credential and shows QR codes or advertises BLE tokens.

It computes tokens offline exactly as a phone app would (device_drivers/tokens.py) and emits
them in bleak's own `BLEDevice` / `AdvertisementData` objects, so the BLE driver is exercised
on the same objects a real radio produces. `SimulatedAir` stands in for the radio between
phones and readers: a `BaseBleakScanner` backend that readers started with
`backend=air.backend` listen on, each on its own adapter name.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner

from device_drivers.tokens import BLE_COMPANY_ID, mint_ble, mint_qr, time_step

_AD_FLAGS = 0x01
_AD_MANUFACTURER = 0xFF
_FLAGS_LE_GENERAL_NO_BREDR = 0x06
MAX_LEGACY_ADVERTISEMENT_BYTES = 31


def random_address() -> str:
    """A random static address (the two top bits set), as phones use for privacy."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] |= 0xC0
    return ":".join(f"{b:02X}" for b in octets)


@dataclass
class SimulatedPhone:
    """A phone app with one enrolled credential (credential id + secret from enrolment).

    The BLE token is kept for a whole time step, as an app advertising in the background
    would; `rotate()` starts a fresh one (the app does so after each door it opened).
    """

    credential_id: str
    secret: bytes
    company_id: int = BLE_COMPANY_ID
    address: str = field(default_factory=random_address)
    local_name: str | None = None
    clock: Callable[[], float] = time.time
    _token: bytes | None = field(default=None, init=False, repr=False)
    _token_step: int | None = field(default=None, init=False, repr=False)

    def qr(self, now: float | None = None) -> str:
        """The text of the QR code the app shows (a new single-use token each call)."""
        return mint_qr(self.credential_id, self.secret, self._now(now))

    def ble_token(self, now: float | None = None) -> bytes:
        at = self._now(now)
        if self._token is None or self._token_step != time_step(at):
            self._token = mint_ble(self.credential_id, self.secret, at)
            self._token_step = time_step(at)
        return self._token

    def rotate(self) -> None:
        self._token = None

    def manufacturer_data(self, now: float | None = None) -> dict[int, bytes]:
        return {self.company_id: self.ble_token(now)}

    def advertising_data(self, now: float | None = None) -> bytes:
        """The legacy advertising payload on air: flags AD plus manufacturer-specific AD.

        Shows the token fits the 31 bytes of a legacy advertisement with room to spare.
        """
        flags = bytes([2, _AD_FLAGS, _FLAGS_LE_GENERAL_NO_BREDR])
        body = self.company_id.to_bytes(2, "little") + self.ble_token(now)
        payload = flags + bytes([1 + len(body), _AD_MANUFACTURER]) + body
        if len(payload) > MAX_LEGACY_ADVERTISEMENT_BYTES:
            raise ValueError(f"advertisement of {len(payload)} bytes does not fit 31")
        return payload

    def advertisement(
        self, now: float | None = None, rssi: int = -55, tx_power: int | None = None
    ) -> tuple[BLEDevice, AdvertisementData]:
        """What a reader's radio reports for one received advertisement of this phone."""
        device = BLEDevice(self.address, self.local_name, details=None)
        adv = AdvertisementData(
            local_name=self.local_name,
            manufacturer_data=self.manufacturer_data(now),
            service_data={},
            service_uuids=[],
            tx_power=tx_power,
            rssi=rssi,
            platform_data=(),
        )
        return device, adv

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now


class SimulatedAir:
    """The radio medium between simulated phones and BLE readers.

    `backend` is a bleak scanner backend class bound to this air; a reader started with
    `BleakScanner(..., backend=air.backend, bluez={"adapter": name})` hears what is
    broadcast to its adapter name (or to every adapter).
    """

    def __init__(self) -> None:
        self._listening: list[_AirScanner] = []
        air = self

        class _Bound(_AirScanner):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(air, *args, **kwargs)

        self.backend: type[BaseBleakScanner] = _Bound

    def broadcast(
        self, phone: SimulatedPhone, rssi: int = -55, adapter: str | None = None,
        now: float | None = None,
    ) -> int:
        """One advertisement of `phone`; returns how many scanning adapters heard it."""
        device, adv = phone.advertisement(now, rssi=rssi)
        heard = 0
        for scanner in list(self._listening):
            if adapter is None or scanner.adapter == adapter:
                scanner.receive(device, adv)
                heard += 1
        return heard

    @property
    def scanning_adapters(self) -> list[str | None]:
        return [s.adapter for s in self._listening]

    def _start(self, scanner: _AirScanner) -> None:
        self._listening.append(scanner)

    def _stop(self, scanner: _AirScanner) -> None:
        if scanner in self._listening:
            self._listening.remove(scanner)


class _AirScanner(BaseBleakScanner):
    """A bleak backend whose "radio" is a SimulatedAir (the hardware boundary in the demo)."""

    def __init__(
        self,
        air: SimulatedAir,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        *,
        bluez: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self.air = air
        self.adapter: str | None = (bluez or {}).get("adapter")

    async def start(self) -> None:
        self.seen_devices = {}
        self.air._start(self)

    async def stop(self) -> None:
        self.air._stop(self)

    def receive(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """The path a platform backend takes for each advertisement the OS reports."""
        if not self.is_allowed_uuid(adv.service_uuids):
            return
        self.seen_devices[device.address] = (device, adv)
        self.call_detection_callbacks(device, adv)
