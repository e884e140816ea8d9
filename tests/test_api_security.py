"""The API's own defences (issue 11), on both databases with the real access service and
ledger: token lifetimes capped, sessions that end the moment a user is disabled or moves
out, caps on phones and visitor passes, /metrics behind its token, sign-in limits, and days
counted in the site's time zone."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import httpx
import jwt
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.login import Busy, HashWorker, LoginGuard
from api.routers import admin, canteen
from api.services import ApiServices
from gateway.access.decision import Reader
from gateway.access.service import AccessService
from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.metrics import Registry
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade
from gateway.store.users import Role, create_user, set_disabled

PASSWORD = "correct horse battery"
METRICS_TOKEN = "m3trics-" + "x" * 24
BREAKFAST = datetime(2026, 3, 2, 7, 30, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
CONFIG = SiteConfig.model_validate({
    "site": {"id": "test", "timezone": "Asia/Shanghai"},
    "api": {"phone_credentials_per_resident": 3, "visitor_passes_per_resident": 3,
            "metrics_token": METRICS_TOKEN, "login_attempts_per_username": 5,
            "login_attempts_per_client": 12},
})


@dataclass
class Api:
    http: httpx.AsyncClient
    ctx: ApiContext
    ledger: Ledger
    app: FastAPI

    def client(self, address: str) -> httpx.AsyncClient:
        """Another client of the same app, seen at `address`."""
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://api")

    async def login(self, username: str, password: str = PASSWORD,
                    http: httpx.AsyncClient | None = None) -> httpx.Response:
        return await (http or self.http).post(
            "/api/v1/auth/token", data={"username": username, "password": password})

    async def headers(self, username: str) -> dict[str, str]:
        answer = await self.login(username)
        assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {answer.json()['access_token']}"}


async def _no_publish(topic: str, payload: bytes) -> None:
    raise AssertionError("nothing here publishes")


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "One"), [d.Floor("b1", 1), d.Floor("b1", 2)])
        d.create_unit(conn, "b1-0201", "b1", 2)
        d.create_resident(conn, "b1-0201", "Ann", "owner", resident_id="r-1")
        d.create_resident(conn, "b1-0201", "Bob", "family", resident_id="r-2")
        create_user(conn, "ann", PASSWORD, Role.RESIDENT, resident_id="r-1")
        create_user(conn, "bob", PASSWORD, Role.RESIDENT, resident_id="r-2")
        for role in (Role.STAFF, Role.ADMIN):
            create_user(conn, role.value, PASSWORD, role)
    ledger = Ledger(engine, clock=lambda: BREAKFAST)
    readers = [Reader("gate-north", "gate"), Reader("canteen-1", "canteen")]
    async with AccessService(engine, readers, poll_interval_s=60) as access:
        ctx = ApiContext(config=CONFIG, engine=engine,
                         jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
                         metrics=Registry(), publish=_no_publish,
                         services=ApiServices(access=access, canteen=ledger))
        app = create_app(ctx, [admin.router, canteen.router])
        transport = httpx.ASGITransport(app=app)  # the client is 127.0.0.1
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield Api(http, ctx, ledger, app)
    engine.dispose()


def _claims(api: Api, headers: dict[str, str]) -> dict[str, object]:
    token = headers["Authorization"].split()[1]
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def test_token_lifetime_is_capped_even_when_correctly_signed(api: Api) -> None:
    good = await api.headers("staff")
    claims = _claims(api, good)
    assert claims["exp"] - claims["iat"] == 600  # type: ignore[operator]
    now = int(time.time())

    def signed(**changes: object) -> dict[str, str]:
        token = jwt.encode({**claims, **changes}, api.ctx.jwt.secret, algorithm="HS256")
        return {"Authorization": f"Bearer {token}"}

    refused = [
        signed(exp=253402300799),  # 9999-12-31
        signed(iat=now, exp=now + 601),  # one second beyond token_ttl_s
        signed(iat=now + 3600, exp=now + 3600 + 300),  # issued an hour from now
        signed(iat=str(now)),  # not a number
    ]
    for headers in refused:
        answer = await api.http.get("/api/v1/residents", headers=headers)
        assert answer.status_code == 401, headers
        assert answer.json() == {"detail": "not authenticated"}
    assert (await api.http.get("/api/v1/residents", headers=signed(
        iat=now - 10, exp=now + 590))).status_code == 200
    assert (await api.http.get("/api/v1/residents", headers=good)).status_code == 200


async def test_a_moved_out_or_disabled_users_session_ends_at_once(api: Api) -> None:
    ann, staff, bob = await api.headers("ann"), await api.headers("staff"), await api.headers(
        "bob")
    assert (await api.http.get("/api/v1/me", headers=ann)).status_code == 200
    moved = await api.http.post("/api/v1/residents/r-1/move-out", headers=staff)
    assert moved.status_code == 200
    for path in ("/api/v1/me", "/api/v1/me/credentials", "/api/v1/me/canteen"):
        answer = await api.http.get(path, headers=ann)
        assert answer.status_code == 401, path
    assert (await api.login("ann")).status_code == 401  # and no new session either
    assert (await api.http.get("/api/v1/me", headers=bob)).status_code == 200

    staff_id = str(_claims(api, staff)["sub"])
    with api.ctx.engine.begin() as conn:
        assert set_disabled(conn, staff_id)
    assert (await api.http.get("/api/v1/residents", headers=staff)).status_code == 401
    assert (await api.login("staff")).status_code == 401
    with api.ctx.engine.begin() as conn:
        set_disabled(conn, staff_id, False)
    assert (await api.http.get("/api/v1/residents", headers=staff)).status_code == 200


async def test_phone_credentials_and_visitor_passes_are_capped_per_resident(api: Api) -> None:
    ann, admin_h = await api.headers("ann"), await api.headers("admin")
    phones = []
    for i in range(3):
        enrolled = await api.http.post("/api/v1/me/credentials", headers=ann,
                                       json={"label": f"phone {i}"})
        assert enrolled.status_code == 201, enrolled.text
        phones.append(enrolled.json()["credential_id"])
    for path, headers in (("/api/v1/me/credentials", ann),
                          ("/api/v1/residents/r-1/credentials", admin_h)):
        over = await api.http.post(path, headers=headers, json={})
        assert over.status_code == 409, path
        assert over.json() == {"detail": "resident 'r-1' already has 3 phone credentials, "
                                         "the most allowed (3); revoke one first"}
    revoked = await api.http.post(f"/api/v1/me/credentials/{phones[0]}/revoke", headers=ann)
    assert revoked.status_code == 200
    assert (await api.http.post("/api/v1/me/credentials", headers=ann, json={})
            ).status_code == 201

    now = time.time()
    with api.ctx.engine.begin() as conn:  # an expired pass does not count
        d.issue_visitor_pass(conn, "r-1", "Yesterday", now - 7200, now - 3600)
    visit = {"visitor_name": "V", "valid_from": now, "valid_until": now + 3600}
    passes = []
    for _ in range(3):
        issued = await api.http.post("/api/v1/me/visitor-passes", headers=ann, json=visit)
        assert issued.status_code == 201, issued.text
        passes.append(issued.json()["pass_id"])
    over = await api.http.post("/api/v1/me/visitor-passes", headers=ann, json=visit)
    assert over.status_code == 409
    assert "3 active visitor passes, the most allowed (3)" in over.json()["detail"]
    by_staff = await api.http.post("/api/v1/visitor-passes", headers=admin_h,
                                   json={**visit, "issued_by": "r-1"})
    assert by_staff.status_code == 409
    assert (await api.http.post(f"/api/v1/me/visitor-passes/{passes[0]}/revoke", headers=ann)
            ).status_code == 200
    assert (await api.http.post("/api/v1/me/visitor-passes", headers=ann, json=visit)
            ).status_code == 201
    bob = await api.headers("bob")  # caps are per resident
    assert (await api.http.post("/api/v1/me/visitor-passes", headers=bob, json=visit)
            ).status_code == 201
    for bad in ({**visit, "valid_until": 1e300}, {**visit, "valid_from": -1.0}):
        assert (await api.http.post("/api/v1/me/visitor-passes", headers=bob, json=bad)
                ).status_code == 422


async def test_metrics_need_the_token_away_from_loopback(api: Api) -> None:
    local = await api.http.get("/metrics")
    assert local.status_code == 200 and "scgw_api_logins_total" in local.text
    async with api.client("192.0.2.7") as remote:
        refused = await remote.get("/metrics")
        assert refused.status_code == 401
        assert refused.json() == {"detail": "metrics need the token"}
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = await remote.get("/metrics", headers={"Authorization": "Bearer " + "y" * 32})
        assert wrong.status_code == 401
        right = await remote.get("/metrics",
                                 headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert right.status_code == 200 and "# TYPE" in right.text
    api.ctx.config = CONFIG.model_copy(update={"api": CONFIG.api.model_copy(
        update={"metrics_networks": []})})
    assert (await api.http.get("/metrics")).status_code == 401  # loopback needs it too now
    assert (await api.http.get("/metrics", headers={
        "Authorization": f"Bearer {METRICS_TOKEN}"})).status_code == 200


async def test_sign_in_limits_answer_429_with_retry_after(api: Api) -> None:
    async with api.client("198.51.100.1") as attacker, api.client("198.51.100.2") as other:
        answers = await asyncio.gather(*(api.login("ann", "wrong password!", attacker)
                                         for _ in range(30)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {401, 429, 503}, codes
        assert codes.count(401) <= 5  # login_attempts_per_username: only these were hashed
        assert codes.count(429) >= 18  # the client's 12 are gone; and ann's 5
        for answer in answers:
            if answer.status_code in (429, 503):
                assert int(answer.headers["retry-after"]) >= 1
                assert answer.json()["detail"]
        # Ann's own right password from another address: her user name is over its limit.
        ann = await api.login("ann", http=other)
        assert ann.status_code == 429 and ann.json() == {
            "detail": "too many sign-in attempts for this user"}
        assert 1 <= int(ann.headers["retry-after"]) <= CONFIG.api.login_window_s
        # Bob signs in from there as usual, and from the attacker's address not at all.
        assert (await api.login("bob", http=other)).status_code == 200
        blocked = await api.login("bob", http=attacker)
        assert blocked.status_code == 429 and "this address" in blocked.json()["detail"]
    counted = api.ctx.metrics.render()
    assert 'scgw_api_logins_total{result="rate_limited"}' in counted


async def test_a_multipart_sign_in_is_counted_by_the_route_instead(api: Api) -> None:
    """The middleware counts urlencoded forms; a multipart one reaches the route, which
    counts it against the same limits."""
    async with api.client("198.51.100.9") as client:
        codes = []
        for _ in range(7):
            answer = await client.post("/api/v1/auth/token", files={
                "username": (None, "bob"), "password": (None, "not the password")})
            codes.append(answer.status_code)
        assert codes == [401] * 5 + [429] * 2  # login_attempts_per_username: 5
        urlencoded = await api.login("bob", http=client)
        assert urlencoded.status_code == 429  # the same window, whichever way it came


async def test_a_success_clears_the_user_names_failures(api: Api) -> None:
    for _ in range(4):
        assert (await api.login("bob", "not the password")).status_code == 401
    assert (await api.login("bob")).status_code == 200
    for _ in range(4):  # without the clearing, the fifth failure would be a 429
        assert (await api.login("bob", "not the password")).status_code == 401


async def test_the_hashing_queue_is_bounded() -> None:
    worker = HashWorker(max_waiting=2)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow() -> str:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        return "done"

    async def one() -> str:
        with worker.place():
            return await worker.run(slow)

    running = [asyncio.create_task(one()) for _ in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(Busy) as busy, worker.place():
        pass
    assert busy.value.retry_after_s >= 1
    release.set()
    assert await asyncio.gather(*running) == ["done"] * 3
    assert worker.placed == 0


def test_the_guard_counts_clients_before_user_names() -> None:
    guard = LoginGuard(window_s=60, per_username=2, per_client=3, max_waiting=1)
    assert guard.admit("ann", "a") is None and guard.admit("ann", "a") is None
    refused = guard.admit("ann", "a")
    assert refused is not None and "this user" in refused.reason
    assert 1 <= refused.retry_after_s <= 60
    refused = guard.admit("bob", "a")
    assert refused is not None and "this address" in refused.reason
    assert guard.admit("bob", "b") is None  # bob's name was never counted at "a"


async def test_canteen_days_are_the_sites_and_dates_are_iso_only(api: Api) -> None:
    api.ledger.topup("r-1", 5000, "topup-key-0001")
    result = api.ledger.pay("canteen-1", "t-1", 1200, "r-1", BREAKFAST)
    assert result.approved
    staff = await api.headers("staff")
    assert datetime.fromtimestamp(BREAKFAST, UTC).date().isoformat() == "2026-03-01"
    site_day = await api.http.get("/api/v1/canteen/settlement?date=2026-03-02", headers=staff)
    assert site_day.status_code == 200 and site_day.json()["net_cents"] == 1200
    utc_day = await api.http.get("/api/v1/canteen/settlement?date=2026-03-01&tz=UTC",
                                 headers=staff)
    assert utc_day.json()["net_cents"] == 1200
    before = await api.http.get("/api/v1/canteen/settlement?date=2026-03-01", headers=staff)
    assert before.json()["net_cents"] == 0
    for day in ("0", "20260302", "2026-3-2", "1772409600", "2026-03-02T00:00:00", "2026-02-30",
                "٢٠٢٦-٠٣-٠٢"):
        for path in ("settlement", "reconciliation"):
            answer = await api.http.get(f"/api/v1/canteen/{path}", params={"date": day},
                                        headers=staff)
            assert answer.status_code == 422, (path, day)
            assert isinstance(answer.json()["detail"], list)
