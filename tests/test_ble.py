"""BLE scanner driver and phone simulator.

The radio is the hardware boundary: advertisements are bleak's own `BLEDevice` and
`AdvertisementData` objects, delivered through a bleak scanner backend
(`SimulatedAir.backend`) into `BleakScanner`'s detection callback, the path a platform
backend takes.
"""

from __future__ import annotations

import asyncio

import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from device_drivers.ble import (
    TOKEN_LIFETIME_S,
    BleScanner,
    BleScannerConfig,
    TokenDeduper,
    extract_token,
)
from device_drivers.tokens import (
    BLE_COMPANY_ID,
    BLE_TOKEN_BYTES,
    TokenKind,
    check,
    mint_ble,
    new_credential_id,
    new_secret,
    parse_ble_hex,
    parse_bytes,
    parse_qr,
)
from simulators.phone import SimulatedAir, SimulatedPhone

NOW = 1_763_800_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collector:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    async def __call__(self, reader: str, credential_type: str, value: str) -> None:
        self.seen.append((reader, credential_type, value))


def phone() -> SimulatedPhone:
    return SimulatedPhone(new_credential_id(), new_secret(), clock=lambda: NOW)


def adv(manufacturer_data: dict[int, bytes], rssi: int = -50) -> AdvertisementData:
    return AdvertisementData(
        local_name=None,
        manufacturer_data=manufacturer_data,
        service_data={},
        service_uuids=[],
        tx_power=None,
        rssi=rssi,
        platform_data=(),
    )


def test_phone_advertisement_fits_a_legacy_advertisement_and_parses() -> None:
    p = phone()
    payload = p.advertising_data()
    assert len(payload) <= 31
    device, data = p.advertisement(rssi=-60)
    assert isinstance(device, BLEDevice) and isinstance(data, AdvertisementData)
    raw = data.manufacturer_data[BLE_COMPANY_ID]
    assert len(raw) == BLE_TOKEN_BYTES
    assert payload.endswith(BLE_COMPANY_ID.to_bytes(2, "little") + raw)
    token = parse_bytes(raw)
    assert token is not None and token.kind is TokenKind.BLE
    assert token.credential_id == p.credential_id
    assert check(token, p.secret, NOW) is None
    assert data.rssi == -60


def test_phone_keeps_its_token_for_a_step_and_rotates_on_demand() -> None:
    p = phone()
    first = p.ble_token()
    assert p.ble_token() == first
    assert p.ble_token(NOW + 30) != first  # next time step
    p.rotate()
    assert p.ble_token(NOW + 30) != first


def test_phone_qr_is_a_valid_qr_token() -> None:
    p = phone()
    token = parse_qr(p.qr())
    assert token is not None and token.credential_id == p.credential_id
    assert check(token, p.secret, NOW) is None


def test_extract_token_ignores_foreign_and_malformed_manufacturer_data() -> None:
    cid, secret = new_credential_id(), new_secret()
    good = mint_ble(cid, secret, NOW)
    assert extract_token(adv({BLE_COMPANY_ID: good})) == good
    assert extract_token(adv({})) is None
    assert extract_token(adv({0x004C: good})) is None  # another company's data
    assert extract_token(adv({BLE_COMPANY_ID: good[:-1]})) is None
    assert extract_token(adv({BLE_COMPANY_ID: b"\x02" + good[1:] + b"\x00"})) is None
    assert extract_token(adv({BLE_COMPANY_ID: b"\x01" + good[1:]})) is None  # QR version byte
    assert extract_token(adv({0x1234: good}), company_id=0x1234) == good


async def test_token_from_phone_reaches_handler_bound_to_its_reader() -> None:
    air, got = SimulatedAir(), Collector()
    p = phone()
    config = BleScannerConfig("gate-north", adapter="hci-gate")
    async with BleScanner(config, got, backend=air.backend) as scanner:
        assert air.broadcast(p, rssi=-60) == 1
        await scanner.drain()
    assert len(got.seen) == 1
    reader, kind, value = got.seen[0]
    assert (reader, kind) == ("gate-north", "ble")
    token = parse_ble_hex(value)
    assert token is not None and token.credential_id == p.credential_id
    assert check(token, p.secret, NOW) is None
    assert scanner.stats.delivered == 1


async def test_bleak_objects_built_directly_are_accepted_and_foreign_ones_counted() -> None:
    air, got = SimulatedAir(), Collector()
    raw = mint_ble(new_credential_id(), new_secret(), NOW)
    async with BleScanner(BleScannerConfig("elev-b1-1"), got, backend=air.backend) as scanner:
        backend = scanner._scanner._backend  # type: ignore[union-attr]
        device = BLEDevice("C0:11:22:33:44:55", None, details=None)
        backend.call_detection_callbacks(device, adv({0x004C: b"\x02\x15beacon"}))
        backend.call_detection_callbacks(device, adv({BLE_COMPANY_ID: raw}, rssi=-40))
        await scanner.drain()
    assert got.seen == [("elev-b1-1", "ble", raw.hex())]
    assert scanner.stats.foreign == 1


async def test_rssi_threshold_ignores_far_phones_until_they_come_close() -> None:
    air, got = SimulatedAir(), Collector()
    p = phone()
    config = BleScannerConfig("gate-north", rssi_threshold_dbm=-70)
    async with BleScanner(config, got, backend=air.backend) as scanner:
        air.broadcast(p, rssi=-85)
        air.broadcast(p, rssi=-71)
        await scanner.drain()
        assert got.seen == []
        assert scanner.stats.weak == 2
        air.broadcast(p, rssi=-70)  # the same token, now close enough
        await scanner.drain()
    assert [v for _, _, v in got.seen] == [p.ble_token().hex()]


async def test_repeated_advertisements_of_one_token_are_handed_on_once() -> None:
    air, got, clock = SimulatedAir(), Collector(), FakeClock()
    p = phone()
    async with BleScanner(
        BleScannerConfig("gate-north"), got, backend=air.backend, clock=clock
    ) as scanner:
        for _ in range(20):
            air.broadcast(p)
        await scanner.drain()
        assert len(got.seen) == 1
        assert scanner.stats.duplicates == 19
        p.rotate()  # the app's next door: a fresh token is handed on at once
        air.broadcast(p)
        await scanner.drain()
        assert len(got.seen) == 2
        clock.now += TOKEN_LIFETIME_S - 1
        air.broadcast(p)
        await scanner.drain()
        assert len(got.seen) == 2
        clock.now += 2  # past the token's lifetime: it is no longer suppressed
        air.broadcast(p)
        await scanner.drain()
    assert len(got.seen) == 3


async def test_each_scanner_hears_only_its_own_adapter() -> None:
    air, got = SimulatedAir(), Collector()
    gate_phone, lift_phone = phone(), phone()
    async with (
        BleScanner(BleScannerConfig("gate-north", adapter="hci0"), got, backend=air.backend) as a,
        BleScanner(BleScannerConfig("elev-b1-1", adapter="hci1"), got, backend=air.backend) as b,
    ):
        air.broadcast(gate_phone, adapter="hci0")
        air.broadcast(lift_phone, adapter="hci1")
        await a.drain()
        await b.drain()
    assert sorted(got.seen) == sorted([
        ("gate-north", "ble", gate_phone.ble_token().hex()),
        ("elev-b1-1", "ble", lift_phone.ble_token().hex()),
    ])
    assert air.scanning_adapters == []  # both radios stopped on exit


async def test_a_failing_handler_does_not_stop_delivery() -> None:
    air = SimulatedAir()
    delivered: list[str] = []

    async def flaky(reader: str, kind: str, value: str) -> None:
        if not delivered:
            delivered.append("boom")
            raise RuntimeError("broker away")
        delivered.append(value)

    first, second = phone(), phone()
    async with BleScanner(BleScannerConfig("gate-north"), flaky, backend=air.backend) as scanner:
        air.broadcast(first)
        air.broadcast(second)
        await scanner.drain()
    assert delivered == ["boom", second.ble_token().hex()]
    assert scanner.stats.handler_errors == 1
    assert scanner.stats.delivered == 1


async def test_full_queue_drops_and_counts_and_shutdown_delivers_what_was_accepted() -> None:
    air, got = SimulatedAir(), Collector()
    release = asyncio.Event()

    async def slow(reader: str, kind: str, value: str) -> None:
        await release.wait()
        await got(reader, kind, value)

    phones = [phone() for _ in range(5)]
    config = BleScannerConfig("gate-north", queue_size=2)
    async with BleScanner(config, slow, backend=air.backend) as scanner:
        air.broadcast(phones[0])
        await asyncio.sleep(0)  # the delivery task takes the first token and waits
        for p in phones[1:]:
            air.broadcast(p)
        assert scanner.stats.dropped == 2
        release.set()
    # Leaving the context handed on every accepted token before stopping.
    assert [v for _, _, v in got.seen] == [p.ble_token().hex() for p in phones[:3]]
    assert scanner._delivery is None


async def test_scanner_start_failure_leaves_no_task_behind() -> None:
    class BrokenRadio(SimulatedAir().backend):  # type: ignore[misc]
        async def start(self) -> None:
            raise OSError("adapter hci9 not found")

    before = len(asyncio.all_tasks())
    scanner = BleScanner(BleScannerConfig("gate-north"), Collector(), backend=BrokenRadio)
    with pytest.raises(OSError, match="hci9"):
        async with scanner:
            pass
    assert len(asyncio.all_tasks()) == before


def test_deduper_forgets_old_tokens_so_memory_stays_bounded() -> None:
    dedupe = TokenDeduper(window_s=10.0)
    for i in range(100):
        assert dedupe.first_sighting(bytes([i]), now=float(i))
    assert len(dedupe) <= 20
    assert dedupe.first_sighting(bytes([99]), now=100.0) is False
    assert dedupe.first_sighting(bytes([0]), now=100.0) is True
