"""Canteen purses over the API: a resident's balance and history; staff top-ups, refunds
and the day's reports.

Money-moving calls carry a client-chosen `idempotency_key`: a retried request (a timeout,
a double click) returns the first receipt with `replayed: true` instead of paying twice,
and the key reused for a different request is a 409. Mounting:
`create_app(ctx, [canteen.router])` with the ledger in `ctx.services.canteen`.

Days are the site's (`site.timezone`): a 07:30 breakfast in Asia/Shanghai belongs to that
day, not the UTC day before. `tz` may name another zone for one report. A day is an ISO
`YYYY-MM-DD` string and nothing else (a number is not read as seconds since 1970).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from datetime import date
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, BeforeValidator, Field

from api.auth import Ctx, Resident, require_roles
from api.deps import LedgerDep
from api.errors import errors
from api.services import CanteenLedger, Receipt
from gateway.canteen import policy
from gateway.canteen.postings import (
    IdempotencyConflict,
    InvalidRequest,
    LedgerError,
    RefundRefused,
    UnknownPayment,
)
from gateway.canteen.reports import ShortfallRow
from gateway.store.directory import get_resident
from gateway.store.directory_schema import NotFound
from gateway.store.users import Role, User

router = APIRouter(prefix="/api/v1", tags=["canteen"])
UNPROCESSABLE = 422  # Starlette renamed the constant; the number is what clients see
Staff = Annotated[User, Depends(require_roles(Role.STAFF))]
ID_PATTERN = policy.ACCOUNT_ID_PATTERN.pattern
KEY_PATTERN = policy.IDEMPOTENCY_KEY_PATTERN.pattern


class TransactionOut(BaseModel):
    journal_id: int
    kind: str
    amount_cents: int = Field(description="signed: negative for payments")
    balance_cents: int = Field(description="the purse's balance after this movement")
    terminal_id: str | None
    txn_id: str | None
    posted_at: float


class CanteenOut(BaseModel):
    resident_id: str
    balance_cents: int
    transactions: list[TransactionOut]


class TopupIn(BaseModel):
    amount_cents: int = Field(gt=0, le=policy.MAX_TOPUP_CENTS, strict=True)
    idempotency_key: str = Field(pattern=KEY_PATTERN)


class RefundIn(BaseModel):
    amount_cents: int = Field(gt=0, le=policy.MAX_AMOUNT_CENTS, strict=True)
    idempotency_key: str = Field(pattern=KEY_PATTERN)
    terminal_id: str = Field(pattern=ID_PATTERN, description="the payment being refunded")
    txn_id: str = Field(min_length=1, max_length=64)


class ReceiptOut(BaseModel):
    journal_id: int
    resident_id: str
    amount_cents: int
    balance_cents: int
    replayed: bool


class SettlementRowOut(BaseModel):
    terminal_id: str
    payments: int
    sales_cents: int
    refunds: int
    refunds_cents: int
    net_cents: int
    shortfalls: int
    shortfall_cents: int


class SettlementOut(BaseModel):
    date: date
    terminals: list[SettlementRowOut]
    net_cents: int


PathId = Annotated[str, Path(pattern=ID_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=500)]
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_day(value: object) -> object:
    """Only `YYYY-MM-DD`: pydantic alone would also read `0` as 1970-01-01."""
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not _ISO_DAY.fullmatch(value):
        raise ValueError("a date as YYYY-MM-DD")
    return value


Day = Annotated[date, BeforeValidator(_iso_day), Query(
    alias="date", description="the day, `YYYY-MM-DD`, in the site's time zone unless `tz`")]
Zone = Annotated[str | None, Query(
    min_length=1, max_length=64, description="an IANA time zone; default `site.timezone`")]


def _zone(ctx: Ctx, name: str | None) -> ZoneInfo:
    name = ctx.config.site.timezone if name is None else name
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HTTPException(UNPROCESSABLE,
                            detail=f"unknown time zone {name!r}") from None


async def _statement(ledger: CanteenLedger, resident_id: str, limit: int) -> CanteenOut:
    def read() -> CanteenOut:
        history = ledger.history(resident_id, limit)
        return CanteenOut(
            resident_id=resident_id,
            balance_cents=ledger.balance(resident_id),
            transactions=[TransactionOut(**asdict(item)) for item in history],
        )

    return await run_in_threadpool(read)


def _receipt(receipt: Receipt, response: Response) -> ReceiptOut:
    response.status_code = status.HTTP_200_OK if receipt.replayed else status.HTTP_201_CREATED
    return ReceiptOut(journal_id=receipt.journal_id, resident_id=receipt.account_id,
                      amount_cents=receipt.amount_cents, balance_cents=receipt.balance_cents,
                      replayed=receipt.replayed)


def _refused(exc: LedgerError) -> HTTPException:
    code = {
        IdempotencyConflict: status.HTTP_409_CONFLICT,
        RefundRefused: status.HTTP_409_CONFLICT,
        UnknownPayment: status.HTTP_404_NOT_FOUND,
        InvalidRequest: UNPROCESSABLE,
    }[type(exc)]
    return HTTPException(code, detail=str(exc))


@router.get("/me/canteen", response_model=CanteenOut, responses=errors(401, 403, 422, 503))
async def my_canteen(user: Resident, ledger: LedgerDep, limit: Limit = 50) -> CanteenOut:
    """The signed-in resident's purse: balance and newest movements first."""
    assert user.resident_id is not None
    return await _statement(ledger, user.resident_id, limit)


@router.get("/canteen/accounts/{resident_id}", response_model=CanteenOut,
            responses=errors(401, 403, 422, 503))
async def account(
    resident_id: PathId, _: Staff, ledger: LedgerDep, limit: Limit = 50,
) -> CanteenOut:
    return await _statement(ledger, resident_id, limit)


@router.post("/canteen/accounts/{resident_id}/topup", response_model=ReceiptOut,
             status_code=status.HTTP_201_CREATED,
             responses={200: {"model": ReceiptOut,
                              "description": "a replay of an earlier top-up with this key"},
                        **errors(401, 403, 404, 409, 422, 503)})
async def topup(
    ctx: Ctx, resident_id: PathId, body: TopupIn, _: Staff, ledger: LedgerDep,
    response: Response,
) -> ReceiptOut:
    """Credit a resident's purse (cash taken at the counter)."""
    def run() -> Receipt:
        with ctx.reader.connect() as conn:
            try:
                resident = get_resident(conn, resident_id)
            except NotFound as exc:
                raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
        if resident.moved_out_at is not None:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                detail=f"resident {resident_id!r} has moved out")
        try:
            return ledger.topup(resident_id, body.amount_cents, body.idempotency_key)
        except (IdempotencyConflict, InvalidRequest) as exc:
            raise _refused(exc) from None

    return _receipt(await run_in_threadpool(run), response)


@router.post("/canteen/accounts/{resident_id}/refunds", response_model=ReceiptOut,
             status_code=status.HTTP_201_CREATED,
             responses={200: {"model": ReceiptOut,
                              "description": "a replay of an earlier refund with this key"},
                        **errors(401, 403, 404, 409, 422, 503)})
async def refund(
    resident_id: PathId, body: RefundIn, _: Staff, ledger: LedgerDep, response: Response,
) -> ReceiptOut:
    """Give (part of) a canteen payment back to the purse it was taken from."""
    def run() -> Receipt:
        try:
            return ledger.refund(resident_id, body.terminal_id, body.txn_id, body.amount_cents,
                                 body.idempotency_key)
        except (IdempotencyConflict, InvalidRequest, RefundRefused, UnknownPayment) as exc:
            raise _refused(exc) from None

    return _receipt(await run_in_threadpool(run), response)


@router.get("/canteen/reconciliation", response_model=list[ShortfallRow],
            responses=errors(401, 403, 422, 503))
async def reconciliation(
    ctx: Ctx, day: Day, _: Staff, ledger: LedgerDep, tz: Zone = None,
) -> list[ShortfallRow]:
    """Offline sales posted that day that their purse could not cover."""
    rows = await run_in_threadpool(ledger.reconcile, day, _zone(ctx, tz))
    return list(rows)


@router.get("/canteen/settlement", response_model=SettlementOut,
            responses=errors(401, 403, 422, 503))
async def settlement(
    ctx: Ctx, day: Day, _: Staff, ledger: LedgerDep, tz: Zone = None,
) -> SettlementOut:
    """Per terminal: sales, refunds and net for the day (the same figures as the CLI)."""
    rows = await run_in_threadpool(ledger.settle, day, _zone(ctx, tz))
    return SettlementOut(
        date=day,
        terminals=[SettlementRowOut(**asdict(r), net_cents=r.net_cents) for r in rows],
        net_cents=sum(r.net_cents for r in rows),
    )
