"""Route dependencies for the gateway services a route cannot work without.

A service that is not running in this process (a test app, a gateway without Modbus) is a
503 naming the service, never an AttributeError turned into a 500.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Path, status

from api.auth import Ctx
from api.services import (
    AccessControl,
    AlertBook,
    CanteenLedger,
    EnergySeries,
    LatestReadings,
    ModbusControl,
)
from device_drivers.vocabulary import DEVICE_ID_PATTERN

T = TypeVar("T")
# A device named in a path: anything else is a 422, never a lookup.
DeviceId = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, description="a device id")]


def _running(service: T | None, what: str) -> T:
    if service is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"{what} is not running")
    return service


def access_service(ctx: Ctx) -> AccessControl:
    return _running(ctx.services.access, "access control")


def canteen_ledger(ctx: Ctx) -> CanteenLedger:
    return _running(ctx.services.canteen, "the canteen")


def modbus_control(ctx: Ctx) -> ModbusControl:
    return _running(ctx.services.modbus, "Modbus")


def latest_readings(ctx: Ctx) -> LatestReadings:
    return _running(ctx.services.latest, "live telemetry")


Access = Annotated[AccessControl, Depends(access_service)]
LedgerDep = Annotated[CanteenLedger, Depends(canteen_ledger)]
Modbus = Annotated[ModbusControl, Depends(modbus_control)]
Latest = Annotated[LatestReadings, Depends(latest_readings)]


def energy_series(ctx: Ctx) -> EnergySeries:
    return _running(ctx.services.energy, "the energy store")


Energy = Annotated[EnergySeries, Depends(energy_series)]


def alert_book(ctx: Ctx) -> AlertBook:
    return _running(ctx.services.alerts, "the alert store")


Alerts = Annotated[AlertBook, Depends(alert_book)]
