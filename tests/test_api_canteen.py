"""The canteen API on both databases: residents read their purse; staff top up and refund
with idempotency keys; bad input is a 4xx, never a 500."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import httpx
import pytest

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import canteen
from api.services import ApiServices
from device_drivers.vocabulary import Reason
from gateway.canteen.ledger import BatchPayment, Ledger
from gateway.config import SiteConfig
from gateway.metrics import Registry
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade
from gateway.store.users import Role, create_user

PASSWORD = "correct horse battery"


@dataclass
class Api:
    http: httpx.AsyncClient
    ledger: Ledger
    ctx: ApiContext

    async def headers(self, username: str) -> dict[str, str]:
        login = await self.http.post("/api/v1/auth/token",
                                     data={"username": username, "password": PASSWORD})
        assert login.status_code == 200, login.text
        return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _no_publish(topic: str, payload: bytes) -> None:
    raise AssertionError("the canteen API publishes nothing")


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "One"), [d.Floor("b1", 1), d.Floor("b1", 2)])
        d.create_unit(conn, "b1-0101", "b1", 1)
        for rid in ("r-1", "r-2", "r-gone"):
            d.create_resident(conn, "b1-0101", f"Resident {rid}", "owner", resident_id=rid)
        d.move_out(conn, "r-gone")
        create_user(conn, "ann", PASSWORD, Role.RESIDENT, resident_id="r-1")
        create_user(conn, "bob", PASSWORD, Role.RESIDENT, resident_id="r-2")
        create_user(conn, "staff", PASSWORD, Role.STAFF)
        create_user(conn, "engineer", PASSWORD, Role.ENGINEER)
    ledger = Ledger(engine)
    ctx = ApiContext(
        config=SiteConfig.model_validate({"site": {"id": "test"}}),
        engine=engine,
        jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
        metrics=Registry(),
        publish=_no_publish,
        services=ApiServices(canteen=ledger),
    )
    app = create_app(ctx, [canteen.router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield Api(http, ledger, ctx)
    engine.dispose()


async def test_residents_see_their_own_purse(api: Api) -> None:
    ann, bob = await api.headers("ann"), await api.headers("bob")
    empty = await api.http.get("/api/v1/me/canteen", headers=ann)
    assert empty.json() == {"resident_id": "r-1", "balance_cents": 0, "transactions": []}
    api.ledger.topup("r-1", 5000, "topup-key-1")
    api.ledger.pay("pos-1", "t-1", 1500, "r-1", time.time())
    mine = (await api.http.get("/api/v1/me/canteen", headers=ann)).json()
    assert mine["balance_cents"] == 3500
    assert [(t["kind"], t["amount_cents"], t["balance_cents"], t["txn_id"])
            for t in mine["transactions"]] == [
        ("payment", -1500, 3500, "t-1"), ("topup", 5000, 5000, None)]
    limited = await api.http.get("/api/v1/me/canteen?limit=1", headers=ann)
    assert len(limited.json()["transactions"]) == 1
    assert (await api.http.get("/api/v1/me/canteen", headers=bob)).json()["balance_cents"] == 0
    assert (await api.http.get("/api/v1/me/canteen?limit=0", headers=ann)).status_code == 422
    assert (await api.http.get("/api/v1/me/canteen")).status_code == 401
    staff = await api.headers("staff")
    assert (await api.http.get("/api/v1/me/canteen", headers=staff)).status_code == 403
    account = await api.http.get("/api/v1/canteen/accounts/r-1", headers=staff)
    assert account.json()["balance_cents"] == 3500
    assert (await api.http.get("/api/v1/canteen/accounts/r-1", headers=ann)).status_code == 403


async def test_staff_top_up_once_per_idempotency_key(api: Api) -> None:
    staff = await api.headers("staff")
    url = "/api/v1/canteen/accounts/r-1/topup"
    body = {"amount_cents": 10000, "idempotency_key": "till-2026-03-02-0001"}
    first = await api.http.post(url, json=body, headers=staff)
    assert first.status_code == 201, first.text
    assert first.json() | {"journal_id": 0} == {
        "journal_id": 0, "resident_id": "r-1", "amount_cents": 10000, "balance_cents": 10000,
        "replayed": False}
    again = await api.http.post(url, json=body, headers=staff)
    assert again.status_code == 200
    assert again.json() == first.json() | {"replayed": True}
    conflict = await api.http.post(url, json=body | {"amount_cents": 500}, headers=staff)
    assert conflict.status_code == 409 and "idempotency_key" in conflict.json()["detail"]
    assert api.ledger.balance("r-1") == 10000

    key = {"idempotency_key": "till-2026-03-02-0002"}
    for path, payload, code in [
        ("/api/v1/canteen/accounts/r-404/topup", {"amount_cents": 100, **key}, 404),
        ("/api/v1/canteen/accounts/r-gone/topup", {"amount_cents": 100, **key}, 409),
        ("/api/v1/canteen/accounts/bad%20id/topup", {"amount_cents": 100, **key}, 422),
        (url, {"amount_cents": 0, **key}, 422),
        (url, {"amount_cents": -100, **key}, 422),
        (url, {"amount_cents": 12.5, **key}, 422),
        (url, {"amount_cents": "100", **key}, 422),
        (url, {"amount_cents": 10**12, **key}, 422),
        (url, {"amount_cents": 100}, 422),
        (url, {"amount_cents": 100, "idempotency_key": "short"}, 422),
    ]:
        response = await api.http.post(path, json=payload, headers=staff)
        assert response.status_code == code, (path, payload, response.text)
        assert "detail" in response.json()
    bad_json = await api.http.post(url, content=b"{", headers=staff | {
        "content-type": "application/json"})
    assert bad_json.status_code == 422
    for user in ("ann", "engineer"):
        denied = await api.http.post(url, json=body, headers=await api.headers(user))
        assert denied.status_code == 403
    assert (await api.http.post(url, json=body)).status_code == 401
    assert api.ledger.balance("r-1") == 10000
    assert api.ledger.audit() == []


async def test_staff_refunds_and_reports(api: Api) -> None:
    staff = await api.headers("staff")
    api.ledger.topup("r-1", 3000, "topup-key-1")
    api.ledger.pay("pos-1", "t-1", 1800, "r-1", time.time())
    api.ledger.apply_batch("pos-2", "b-1", [
        BatchPayment("o-1", 900, Reason.REVOKED, time.time() - 60)])
    url = "/api/v1/canteen/accounts/r-1/refunds"
    body = {"amount_cents": 800, "idempotency_key": "refund-0001", "terminal_id": "pos-1",
            "txn_id": "t-1"}
    refund = await api.http.post(url, json=body, headers=staff)
    assert refund.status_code == 201, refund.text
    assert refund.json()["balance_cents"] == 2000
    assert (await api.http.post(url, json=body, headers=staff)).json()["replayed"] is True
    too_much = await api.http.post(url, json=body | {"amount_cents": 1001,
                                                     "idempotency_key": "refund-0002"},
                                   headers=staff)
    assert too_much.status_code == 409 and "1000 remain refundable" in too_much.json()["detail"]
    other = await api.http.post("/api/v1/canteen/accounts/r-2/refunds",
                                json=body | {"idempotency_key": "refund-0003"}, headers=staff)
    assert other.status_code == 404
    assert api.ledger.balance("r-1") == 2000

    today = datetime.now(UTC).date().isoformat()
    settled = await api.http.get(f"/api/v1/canteen/settlement?date={today}", headers=staff)
    assert settled.status_code == 200
    assert settled.json()["net_cents"] == 1000
    assert [(t["terminal_id"], t["net_cents"], t["shortfall_cents"])
            for t in settled.json()["terminals"]] == [("pos-1", 1000, 0), ("pos-2", 0, 900)]
    short = await api.http.get(f"/api/v1/canteen/reconciliation?date={today}", headers=staff)
    assert [(r["txn_id"], r["shortfall_cents"], r["reason"]) for r in short.json()] == [
        ("o-1", 900, "revoked")]
    for query in ("date=yesterday", f"date={today}&tz=Mars/Olympus", ""):
        bad = await api.http.get(f"/api/v1/canteen/settlement?{query}", headers=staff)
        assert bad.status_code == 422, query
    ann = await api.headers("ann")
    assert (await api.http.get(f"/api/v1/canteen/settlement?date={today}",
                               headers=ann)).status_code == 403


async def test_without_a_running_canteen_the_api_says_so(api: Api) -> None:
    api.ctx.services = ApiServices()
    response = await api.http.get("/api/v1/me/canteen", headers=await api.headers("ann"))
    assert response.status_code == 503
    assert response.json() == {"detail": "the canteen is not running"}


async def test_reports_count_days_in_the_sites_time_zone(api: Api) -> None:
    """A 07:30 breakfast in Asia/Shanghai is that day's, not the UTC day before it, in both
    reports, unless `tz` asks for another zone."""
    breakfast = datetime(2026, 3, 2, 7, 30, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
    assert datetime.fromtimestamp(breakfast, UTC).date().isoformat() == "2026-03-01"
    ledger = Ledger(api.ledger.engine, clock=lambda: breakfast)
    api.ctx.config = SiteConfig.model_validate({"site": {"id": "test",
                                                         "timezone": "Asia/Shanghai"}})
    api.ctx.services = ApiServices(canteen=ledger)
    ledger.topup("r-1", 1000, "topup-breakfast")
    assert ledger.pay("pos-1", "t-1", 700, "r-1", breakfast).approved
    ledger.apply_batch("pos-2", "b-1", [BatchPayment("o-1", 500, Reason.REVOKED, breakfast)])
    staff = await api.headers("staff")

    async def report(query: str) -> tuple[int, list[str]]:
        settled = (await api.http.get(f"/api/v1/canteen/settlement?{query}",
                                      headers=staff)).json()
        short = (await api.http.get(f"/api/v1/canteen/reconciliation?{query}",
                                    headers=staff)).json()
        return settled["net_cents"], [r["txn_id"] for r in short]

    assert await report("date=2026-03-02") == (700, ["o-1"])  # the site's day
    assert await report("date=2026-03-01") == (0, [])
    assert await report("date=2026-03-01&tz=UTC") == (700, ["o-1"])
    assert await report("date=2026-03-02&tz=UTC") == (0, [])
