"""The API's seams: it reaches gateway services only through the interfaces in api.services,
answers 503 naming a service that is not running, and /openapi.json describes every answer.

Stand-ins here play the Modbus fleet and the latest-readings view, so each error a real
fleet raises can be produced on demand; the real classes are checked against the same
Protocols by mypy where the runtime builds ApiServices.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import all_extra_routers
from api.services import ApiServices
from device_drivers.modbus.errors import ModbusTimeout, UnknownDevice, WriteRefused
from device_drivers.modbus.profile import Register
from device_drivers.vocabulary import Reading
from gateway.config import SiteConfig
from gateway.metrics import Registry
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade
from gateway.store.users import Role, create_user

PASSWORD = "correct horse battery"
CONFIG = SiteConfig.model_validate({"site": {"id": "test"}, "devices": [
    {"device_id": "gate-north", "kind": "gate", "name": "North gate"},
    {"device_id": "meter-1", "kind": "meter", "name": "Main meter"}]})


@dataclass
class UnitProfile:
    registers: tuple[Register, ...]


class Fleet:
    """A Modbus fleet of one unit, failing the way a real one does."""

    device_ids = ("erv-1",)
    fan = Register(name="fan_speed_pct", input_type="holding", address=0, unit="%",
                   writable=True, min=0, max=100)

    def profile(self, device_id: str) -> UnitProfile:
        return UnitProfile((self.fan,))

    async def write(self, device_id: str, values: Mapping[str, float]) -> Mapping[str, float]:
        if device_id not in self.device_ids:
            raise UnknownDevice(device_id)
        if values["fan_speed_pct"] > 100:
            raise WriteRefused(device_id, ["fan_speed_pct: 150 is above the maximum 100"])
        if values["fan_speed_pct"] == 13:
            raise ModbusTimeout("no answer from unit 1")
        return dict(values)


class Latest:
    def get(self, device_id: str) -> Reading | None:
        return Reading("meter-1", "meter", 1700.0, {"power_w": 420.0}) if (
            device_id == "meter-1") else None


@dataclass
class Online:
    online: bool | None
    last_seen: float | None


@dataclass
class Api:
    http: httpx.AsyncClient
    ctx: ApiContext

    async def headers(self, username: str) -> dict[str, str]:
        login = await self.http.post("/api/v1/auth/token",
                                     data={"username": username, "password": PASSWORD})
        assert login.status_code == 200, login.text
        return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _no_publish(topic: str, payload: bytes) -> None:
    raise AssertionError("nothing here publishes")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    url = f"sqlite:///{tmp_path / 'scgw.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "One"), [d.Floor("b1", 1)])
        d.create_unit(conn, "b1-0101", "b1", 1)
        d.create_resident(conn, "b1-0101", "Ann", "owner", resident_id="r-1")
        create_user(conn, "engineer", PASSWORD, Role.ENGINEER)
        create_user(conn, "staff", PASSWORD, Role.STAFF)
        create_user(conn, "resident", PASSWORD, Role.RESIDENT, resident_id="r-1")
    ctx = ApiContext(config=CONFIG, engine=engine,
                     jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
                     metrics=Registry(), publish=_no_publish)
    transport = httpx.ASGITransport(app=create_app(ctx, all_extra_routers()))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield Api(http, ctx)
    engine.dispose()


async def test_a_service_that_is_not_running_is_a_503_that_names_it(api: Api) -> None:
    engineer, resident = await api.headers("engineer"), await api.headers("resident")
    for method, path, headers, service in [
        ("POST", "/api/v1/devices/erv-1/set", engineer, "Modbus"),
        ("GET", "/api/v1/devices/erv-1/registers", engineer, "Modbus"),
        ("GET", "/api/v1/devices/meter-1/latest", engineer, "live telemetry"),
        ("POST", "/api/v1/me/access-token", resident, "access control"),
        ("GET", "/api/v1/me/devices", resident, "access control"),
        ("GET", "/api/v1/me/canteen", resident, "the canteen"),
    ]:
        answer = await api.http.request(method, path, headers=headers,
                                        json={"values": {"fan_speed_pct": 1}})
        assert answer.status_code == 503, (path, answer.text)
        assert answer.json() == {"detail": f"{service} is not running"}
    # Who may ask is settled before whether the service runs.
    refused = await api.http.post("/api/v1/devices/erv-1/set", headers=resident,
                                  json={"values": {"fan_speed_pct": 1}})
    assert refused.status_code == 403


async def test_modbus_control_through_its_interface(api: Api) -> None:
    api.ctx.services = ApiServices(modbus=Fleet())
    engineer = await api.headers("engineer")

    async def set_fan(device_id: str, value: float) -> httpx.Response:
        return await api.http.post(f"/api/v1/devices/{device_id}/set", headers=engineer,
                                   json={"values": {"fan_speed_pct": value}})

    ok = await set_fan("erv-1", 60)
    assert ok.status_code == 200 and ok.json() == {"device_id": "erv-1",
                                                   "values": {"fan_speed_pct": 60.0}}
    refused = await set_fan("erv-1", 150)
    assert refused.status_code == 422 and "above the maximum" in refused.json()["detail"]
    unknown = await set_fan("nope", 10)
    assert unknown.status_code == 404 and unknown.json() == {"detail": "no device 'nope'"}
    failed = await set_fan("erv-1", 13)
    assert failed.status_code == 502 and "no answer" in failed.json()["detail"]
    registers = await api.http.get("/api/v1/devices/erv-1/registers", headers=engineer)
    assert registers.json() == [{"name": "fan_speed_pct", "input_type": "holding",
                                 "data_type": "uint16", "unit": "%", "writable": True,
                                 "min": 0.0, "max": 100.0, "scale": 1.0, "step": 1.0,
                                 "values": None, "description": ""}]
    missing = await api.http.get("/api/v1/devices/nope/registers", headers=engineer)
    assert missing.status_code == 404 and "'nope'" in missing.json()["detail"]


async def test_device_list_and_latest_readings(api: Api) -> None:
    api.ctx.services = ApiServices(latest=Latest(),
                                   device_state={"gate-north": Online(True, 1699.5)})
    staff = await api.headers("staff")
    devices = (await api.http.get("/api/v1/devices", headers=staff)).json()
    assert {d["device_id"]: (d["online"], d["last_seen"]) for d in devices} == {
        "gate-north": (True, 1699.5), "meter-1": (False, None)}  # never null: not heard
    latest = await api.http.get("/api/v1/devices/meter-1/latest", headers=staff)
    assert latest.json() == {"device_id": "meter-1", "kind": "meter", "ts": 1700.0,
                             "metrics": {"power_w": 420.0}}
    silent = await api.http.get("/api/v1/devices/gate-north/latest", headers=staff)
    assert silent.status_code == 404 and "'gate-north'" in silent.json()["detail"]


def _schema(spec: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in ref:
        ref = spec["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    if ref.get("type") == "array":
        return _schema(spec, ref["items"])
    return ref


async def test_openapi_declares_every_answer(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            for code, response in operation["responses"].items():
                if code == "204":
                    continue
                content = response.get("content")
                assert content, f"{where} {code} declares no body"
                if path == "/metrics" and code == "200":
                    assert list(content) == ["text/plain; version=0.0.4"]
                    continue
                if path == "/api/v1/events" and code == "200":
                    assert list(content) == ["text/event-stream"]
                    continue
                body = _schema(spec, content["application/json"]["schema"])
                assert body.get("properties"), f"{where} {code} has no fields: {body}"
                if code.startswith(("4", "5")) and path != "/readyz":  # 503: {"ready": false}
                    assert list(body["properties"]) == ["detail"], where
            # Signing in and accepting an invitation need no token; every role may follow
            # the live events (each sees its own), so no 403 there.
            if path.startswith("/api/v1/") and path not in (
                    "/api/v1/auth/token", "/api/v1/invitations/accept", "/api/v1/events"):
                assert {"401", "403"} <= set(operation["responses"]), where

    def fields(path: str, method: str, code: str) -> set[str]:
        response = spec["paths"][path][method]["responses"][code]
        return set(_schema(spec, response["content"]["application/json"]["schema"])
                   ["properties"])

    # Secrets are in the answers to an enrolment or a new pass, never in a listing.
    assert "secret_hex" in fields("/api/v1/residents/{resident_id}/credentials", "post", "201")
    assert "secret_hex" in fields("/api/v1/me/visitor-passes", "post", "201")
    for path in ("/api/v1/me/credentials", "/api/v1/visitor-passes",
                 "/api/v1/me/visitor-passes"):
        assert "secret_hex" not in fields(path, "get", "200"), path
    assert fields("/api/v1/residents/{resident_id}", "get", "200") >= {
        "resident", "unit", "cards", "credentials", "groups"}
    assert "404" in spec["paths"]["/api/v1/residents/{resident_id}/cards"]["post"]["responses"]
    assert "409" in spec["paths"]["/api/v1/residents"]["post"]["responses"]
