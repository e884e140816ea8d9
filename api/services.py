"""The gateway services the API uses, declared here as the API sees them.

The API sits above the services in the layering, so it names only the calls its routes make,
as Protocols; the composition root (gateway.app) passes in the real objects, and tests may
pass a real service or a small stand-in. A service that is not running is None, and the
routes that need it answer 503 instead of failing on an attribute.

Which gateway classes satisfy these: AccessControl - gateway.access.service.AccessService;
DecisionAudit - gateway.access.audit.AuditLog; CanteenLedger - gateway.canteen.ledger.Ledger;
ModbusControl - device_drivers.modbus.fleet.ModbusFleet; LatestReadings -
gateway.telemetry.latest_store.LatestCache; DeviceStatus - gateway.devices.router.DeviceState;
EnergySeries - gateway.telemetry.series.SeriesQuery; AlertBook -
gateway.telemetry.alerts.AlertStore.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, tzinfo
from typing import Protocol

from device_drivers.vocabulary import Reading
from gateway.access.audit import DecisionLike
from gateway.canteen.reports import HistoryItem, SettlementRow, ShortfallRow

# --- access -------------------------------------------------------------------------------


class IssuedQr(Protocol):
    """A QR token for a phone's or a visitor's screen."""

    @property
    def qr(self) -> str: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def credential_id(self) -> str: ...


class RemoteDecision(DecisionLike, Protocol):
    """An access decision for a remote open: what the audit log records (a remote open is
    audited like a credential at the reader), plus the unlock duration the route answers."""

    @property
    def duration_s(self) -> int: ...


class AccessControl(Protocol):
    """The access service: the same rules as at the reader, and its in-memory index."""

    def issue_qr(self, resident_id: str, now: float) -> IssuedQr | None: ...

    def issue_visitor_qr(self, pass_id: str, now: float) -> IssuedQr | None: ...

    def check_remote(self, resident_id: str, device_id: str, now: float) -> RemoteDecision: ...

    def remote_readers(self) -> Mapping[str, str]:
        """device id -> kind ("gate" or "elevator") of the readers an app may act on."""

    async def refresh_now(self) -> None:
        """Reload from the store, so the next decision obeys a write the API just made."""


class DecisionAudit(Protocol):
    """The hash-chained audit log of access decisions."""

    def record_decision(
        self, device_id: str, device_kind: str, decision: RemoteDecision, now: float,
        request_id: str | None = None,
    ) -> None:
        """Queue it: for a decision that opens nothing."""

    async def record_decision_durably(
        self, device_id: str, device_kind: str, decision: RemoteDecision, now: float,
        request_id: str | None = None,
    ) -> bool:
        """Written to the store (True) or the local spill file before it returns: for a
        decision about to be acted on."""


# --- canteen ------------------------------------------------------------------------------


class Receipt(Protocol):
    """A top-up or refund as committed (or as first committed, when `replayed`)."""

    @property
    def journal_id(self) -> int: ...
    @property
    def account_id(self) -> str: ...
    @property
    def amount_cents(self) -> int: ...
    @property
    def balance_cents(self) -> int: ...
    @property
    def replayed(self) -> bool: ...


class CanteenLedger(Protocol):
    """The purses. Calls block on the database: routes run them in a worker thread.

    topup and refund raise the ledger's LedgerError subclasses (gateway.canteen.postings)
    for requests it refuses; their messages are safe to show to staff.
    """

    def balance(self, account_id: str) -> int: ...

    def history(self, account_id: str, limit: int) -> Sequence[HistoryItem]: ...

    def topup(self, account_id: str, amount_cents: int, idempotency_key: str) -> Receipt: ...

    def refund(
        self, account_id: str, terminal_id: str, txn_id: str, amount_cents: int,
        idempotency_key: str,
    ) -> Receipt: ...

    def reconcile(self, day: date, tz: tzinfo) -> Sequence[ShortfallRow]: ...

    def settle(self, day: date, tz: tzinfo) -> Sequence[SettlementRow]: ...


# --- devices ------------------------------------------------------------------------------


class RegisterInfo(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def input_type(self) -> str: ...
    @property
    def unit(self) -> str: ...
    @property
    def writable(self) -> bool: ...
    @property
    def min(self) -> float | None: ...
    @property
    def max(self) -> float | None: ...


class UnitProfile(Protocol):
    @property
    def registers(self) -> Sequence[RegisterInfo]: ...


class ModbusControl(Protocol):
    """The Modbus fleet. `write` checks values against the profile before sending and raises
    device_drivers.modbus.errors: UnknownDevice, WriteRefused, or another ModbusError."""

    @property
    def device_ids(self) -> Sequence[str]: ...

    def profile(self, device_id: str) -> UnitProfile: ...

    async def write(self, device_id: str, values: Mapping[str, float]) -> Mapping[str, float]: ...


class LatestReadings(Protocol):
    def get(self, device_id: str) -> Reading | None: ...


# --- energy (the local telemetry store) ---------------------------------------------------


class SeriesPoint(Protocol):
    @property
    def ts(self) -> float: ...
    @property
    def min(self) -> float: ...
    @property
    def max(self) -> float: ...
    @property
    def mean(self) -> float: ...
    @property
    def last(self) -> float: ...
    @property
    def count(self) -> int: ...


class SeriesAnswer(Protocol):
    @property
    def unit(self) -> str: ...
    @property
    def points(self) -> Sequence[SeriesPoint]: ...


class EnergySeries(Protocol):
    """1-minute rollups read back as a series (gateway.telemetry.series.SeriesQuery).

    Blocks on the database: routes run it in a worker thread. Raises LookupError when the
    selector names no known device, building, kind or site, and ValueError for a range it
    cannot answer (start >= end, a bad step, too many points); both messages are safe to show.
    """

    def series(self, *, device_id: str, metric: str, start: float, end: float,
               step: int) -> SeriesAnswer: ...


# --- alerts (the rules engine's, kept by the telemetry worker) ----------------------------


class AlertItem(Protocol):
    """One alert: the MQTT alert object (CONTRACT.md section 1) plus its lifecycle."""

    @property
    def alert_id(self) -> str: ...
    @property
    def rule_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def metric(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def severity(self) -> str: ...
    @property
    def value(self) -> float | None: ...
    @property
    def started_at(self) -> float: ...
    @property
    def ts(self) -> float: ...
    @property
    def message(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def fired_at(self) -> float: ...
    @property
    def resolved_at(self) -> float | None: ...
    @property
    def acked_at(self) -> float | None: ...
    @property
    def acked_by(self) -> str | None: ...


class AlertBook(Protocol):
    """Alerts as stored; blocking calls (routes run them in a worker thread)."""

    def list_alerts(self, *, state: str | None = None, device_id: str | None = None,
                    since: float | None = None, limit: int = 200) -> Sequence[AlertItem]: ...

    def ack(self, alert_id: str, user: str, now: float) -> AlertItem | None: ...


class DeviceStatus(Protocol):
    """What the device router last heard from a device over MQTT."""

    @property
    def online(self) -> bool | None: ...
    @property
    def last_seen(self) -> float | None: ...


# --- the set the API is given -------------------------------------------------------------


@dataclass(frozen=True)
class ApiServices:
    """One field per service; None where that service is not running in this process."""

    access: AccessControl | None = None
    audit: DecisionAudit | None = None
    canteen: CanteenLedger | None = None
    modbus: ModbusControl | None = None
    latest: LatestReadings | None = None
    energy: EnergySeries | None = None
    alerts: AlertBook | None = None
    device_state: Mapping[str, DeviceStatus] = field(default_factory=dict)
