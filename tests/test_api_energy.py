"""`GET /api/v1/energy/series` on both databases, through the real route, store and query:
the CONTRACT.md section 3 answer, defaults, sums (community power now and over a day in one
request each), 404 naming what is unknown, 422 for bad ranges, roles."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import all_extra_routers
from api.services import ApiServices
from device_drivers.vocabulary import Reading
from gateway.config import SiteConfig
from gateway.metrics import Registry
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade
from gateway.store.users import Role, create_user
from gateway.telemetry.local_db import LocalDb
from gateway.telemetry.rollups import RollupStore
from gateway.telemetry.series import SeriesQuery

PASSWORD = "correct horse battery"
URL = "/api/v1/energy/series"
CONFIG = SiteConfig.model_validate({
    "site": {"id": "maple"},
    "buildings": [{"id": "b1", "floors": [{"number": 1}]}, {"id": "b2", "floors": [{"number": 1}]},
                  {"id": "b3", "floors": [{"number": 1}]}],
    "devices": [
        {"device_id": "m-1", "kind": "meter", "name": "B1 supply", "building": "b1"},
        {"device_id": "m-2", "kind": "meter", "name": "B2 supply", "building": "b2"},
        {"device_id": "ahu-1", "kind": "hvac", "name": "AHU", "building": "b1"},
        {"device_id": "gate-1", "kind": "gate", "name": "North gate"},
    ]})


@dataclass
class Api:
    http: httpx.AsyncClient
    ctx: ApiContext
    now: float  # the minute the readings end in has started 30 s before this
    tokens: dict[str, str] = field(default_factory=dict)

    async def get(self, user: str | None, **params: object) -> httpx.Response:
        headers = {}
        if user is not None:
            if user not in self.tokens:  # argon2 is slow on purpose: log in once per user
                login = await self.http.post("/api/v1/auth/token",
                                             data={"username": user, "password": PASSWORD})
                assert login.status_code == 200, login.text
                self.tokens[user] = login.json()["access_token"]
            headers["Authorization"] = f"Bearer {self.tokens[user]}"
        return await self.http.get(URL, params=params, headers=headers)  # type: ignore[arg-type]


async def _no_publish(topic: str, payload: bytes) -> None:
    raise AssertionError("nothing here publishes")


def _app(ctx: ApiContext) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(ctx, all_extra_routers()))
    return httpx.AsyncClient(transport=transport, base_url="http://api")


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "One"), [d.Floor("b1", 1)])
        d.create_unit(conn, "b1-0101", "b1", 1)
        d.create_resident(conn, "b1-0101", "Ann", "owner", resident_id="r-1")
        for name, role in [("engineer", Role.ENGINEER), ("admin", Role.ADMIN),
                           ("staff", Role.STAFF)]:
            create_user(conn, name, PASSWORD, role)
        create_user(conn, "resident", PASSWORD, Role.RESIDENT, resident_id="r-1")
    now = (time.time() // 60) * 60 + 30
    # Ten minutes of one reading per 5 s: m-1 at 1000 W, m-2 at 500 W, the AHU at 20 W;
    # m-1 steps up to 1200 W for its last reading.
    readings = []
    for i in range(120):
        ts = now - 600 + 5 * i
        readings += [Reading("m-1", "meter", ts, {"power_w": 1200.0 if i == 119 else 1000.0}),
                     Reading("m-2", "meter", ts, {"power_w": 500.0}),
                     Reading("ahu-1", "hvac", ts, {"power_w": 20.0, "vendor_x": 1.0})]
    local = LocalDb(database_url)
    RollupStore(local).apply(readings, end_recno=0)
    local.close()
    query = SeriesQuery.from_config(engine, CONFIG)
    ctx = ApiContext(config=CONFIG, engine=engine,
                     jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
                     metrics=Registry(), publish=_no_publish,
                     services=ApiServices(energy=query))
    async with _app(ctx) as http:
        yield Api(http, ctx, now)
    query.dispose()
    engine.dispose()


async def test_a_device_series_as_the_contract_says(api: Api) -> None:
    answer = await api.get("engineer", device_id="m-1", metric="power_w", start=api.now - 300,
                           end=api.now, step=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"device_id", "metric", "unit", "step", "points"}
    assert (body["device_id"], body["metric"], body["unit"], body["step"]) == (
        "m-1", "power_w", "W", 60)
    points = body["points"]
    assert [p["ts"] for p in points] == [api.now - 330 + 60 * i for i in range(6)]
    assert all(set(p) == {"ts", "min", "max", "mean", "last", "count"} for p in points)
    assert points[0] == {"ts": api.now - 330, "min": 1000.0, "max": 1000.0, "mean": 1000.0,
                         "last": 1000.0, "count": 12}
    newest = points[-1]  # the minute now is in: 6 readings, the last one 1200 W
    assert (newest["count"], newest["max"], newest["last"]) == (6, 1200.0, 1200.0)
    assert newest["mean"] == pytest.approx(1200 / 6 + 1000 * 5 / 6)
    custom = await api.get("admin", device_id="ahu-1", metric="vendor_x", start=api.now - 60,
                           end=api.now)
    assert custom.status_code == 200 and custom.json()["unit"] == ""


async def test_community_power_now_and_over_a_day_are_one_request_each(api: Api) -> None:
    now = await api.get("engineer", device_id="kind:meter", metric="power_w", start=api.now - 30,
                        end=api.now)
    assert now.status_code == 200, now.text
    [point] = now.json()["points"]
    assert (point["last"], point["count"]) == (1700.0, 12)  # 1200 W + 500 W
    day = await api.get("engineer", device_id="kind:meter", metric="power_w")  # defaults
    body = day.json()
    assert body["step"] == 60 and len(body["points"]) == 11
    assert [p["mean"] for p in body["points"][:-1]] == [1500.0] * 10
    assert sum(p["count"] for p in body["points"]) == 240
    site = await api.get("engineer", device_id="site:maple", metric="power_w", step=3600,
                         start=api.now - 86_400, end=api.now)
    assert sum(p["count"] for p in site.json()["points"]) == 360
    b1 = await api.get("engineer", device_id="building:b1", metric="power_w",
                       start=api.now - 330, end=api.now - 270)
    assert [p["mean"] for p in b1.json()["points"]] == [1020.0]
    month = await api.get("engineer", device_id="m-2", metric="power_w",
                          start=api.now - 30 * 86_400, end=api.now)
    assert month.json()["step"] == 1800  # the default step keeps it to 1,440 points


async def test_unknown_selectors_are_404s_that_name_them(api: Api) -> None:
    for selector, detail in [("m-9", "no device 'm-9'"),
                             ("building:b3", "no devices in building 'b3'"),
                             ("building:b9", "no devices in building 'b9'"),
                             ("kind:lamp", "no device kind 'lamp'"),
                             ("kind:canteen", "no devices of kind 'canteen'"),
                             ("site:oak", "no site 'oak'")]:
        answer = await api.get("engineer", device_id=selector, metric="power_w")
        assert answer.status_code == 404, selector
        assert answer.json()["detail"].startswith(detail), answer.json()
    nothing = await api.get("engineer", device_id="gate-1", metric="power_w")
    assert nothing.status_code == 200 and nothing.json()["points"] == []


async def test_bad_ranges_are_422s_never_500s(api: Api) -> None:
    now = api.now
    for params in [
        {"start": now, "end": now},
        {"start": now, "end": now - 60},
        {"start": now + 86_400},  # after the default end, now
        {"step": 90}, {"step": 0}, {"step": -60}, {"step": "x"}, {"step": 1.5},
        {"start": "nan"}, {"end": "inf"}, {"start": -1}, {"end": 1e300},
        {"start": 0, "end": now, "step": 60},  # far more than 10,000 points
        {"device_id": ""}, {"metric": ""}, {"metric": "m" * 129},
    ]:
        query = {"device_id": "m-1", "metric": "power_w", **params}
        answer = await api.get("engineer", **query)
        assert answer.status_code == 422, (params, answer.text)
        assert "detail" in answer.json()
    missing = await api.get("engineer", device_id="m-1")
    assert missing.status_code == 422
    tail = await api.get("engineer", device_id="m-1", metric="power_w", start=0, end=now,
                         step=86_400 * 30)
    assert tail.status_code == 200


async def test_roles(api: Api) -> None:
    params = {"device_id": "m-1", "metric": "power_w"}
    for user, code in [("resident", 403), ("staff", 403), (None, 401), ("engineer", 200),
                       ("admin", 200)]:
        assert (await api.get(user, **params)).status_code == code, user


async def test_a_gateway_without_the_store_answers_503_and_openapi_declares_the_route(
        api: Api) -> None:
    route = (await api.http.get("/openapi.json")).json()["paths"][URL]["get"]
    assert {"200", "401", "403", "404", "422", "503"} <= set(route["responses"])
    api.ctx.services = ApiServices()  # a process where the store is not running
    answer = await api.get("engineer", device_id="m-1", metric="power_w")
    assert answer.status_code == 503
    assert answer.json() == {"detail": "the energy store is not running"}
