"""The directory API on both databases: staff manage it, residents only their own data, and
every write is obeyed by the readers on the very next request."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import Engine, select

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import admin
from api.services import ApiServices
from device_drivers import tokens as c
from device_drivers.vocabulary import Reason
from gateway.access.audit import audit_log, verify
from gateway.access.decision import Reader
from gateway.access.service import AccessService
from gateway.config import SiteConfig
from gateway.metrics import Registry
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade
from gateway.store.users import Role, create_user

PASSWORD = "correct horse battery"
READERS = [Reader("gate-north", "gate"), Reader("elev-b1-1", "elevator", building_id="b1"),
           Reader("gym", "gate", restricted=True), Reader("canteen-1", "canteen")]


@dataclass
class Api:
    http: httpx.AsyncClient
    access: AccessService
    engine: Engine

    async def login(self, username: str) -> dict[str, str]:
        answer = await self.http.post("/api/v1/auth/token",
                                      data={"username": username, "password": PASSWORD})
        assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {answer.json()['access_token']}"}


async def _no_publish(topic: str, payload: bytes) -> None:
    raise AssertionError("the directory API publishes nothing")


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "One"), [
            d.Floor("b1", 1, "lobby", True), *(d.Floor("b1", n) for n in range(2, 7))])
        d.create_unit(conn, "b1-0201", "b1", 2)
        d.create_unit(conn, "b1-0501", "b1", 5)
        d.create_resident(conn, "b1-0201", "Ann", "owner", resident_id="r-1")
        d.create_resident(conn, "b1-0501", "Bob", "tenant", resident_id="r-2")
        create_user(conn, "ann", PASSWORD, Role.RESIDENT, resident_id="r-1")
        create_user(conn, "bob", PASSWORD, Role.RESIDENT, resident_id="r-2")
        for role in (Role.STAFF, Role.ENGINEER, Role.ADMIN):
            create_user(conn, role.value, PASSWORD, role)
    async with AccessService(engine, READERS, poll_interval_s=60) as access:
        ctx = ApiContext(
            config=SiteConfig.model_validate({"site": {"id": "test"}}),
            engine=engine,
            jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
            metrics=Registry(),
            publish=_no_publish,
            services=ApiServices(access=access),
        )
        transport = httpx.ASGITransport(app=create_app(ctx, [admin.router]))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield Api(http, access, engine)
    engine.dispose()


def qr(enrolled: dict[str, str]) -> str:
    return c.mint_qr(enrolled["credential_id"], bytes.fromhex(enrolled["secret_hex"]),
                     time.time())


async def test_staff_manage_the_directory_and_readers_obey_at_once(api: Api) -> None:
    staff = await api.login("staff")
    unit = await api.http.post("/api/v1/units", headers=staff, json={
        "unit_id": "b1-0601", "building_id": "b1", "floor": 6})
    assert unit.status_code == 201
    made = await api.http.post("/api/v1/residents", headers=staff, json={
        "unit_id": "b1-0601", "name": "Cai", "role": "family"})
    assert made.status_code == 201
    rid = made.json()["resident_id"]
    for kind, number in (("gate", "G-CAI"), ("elevator", "E-CAI")):
        card = await api.http.post(f"/api/v1/residents/{rid}/cards", headers=staff,
                                   json={"kind": kind, "card_number": number})
        assert card.status_code == 201, card.text
    refused = await api.http.post(f"/api/v1/residents/{rid}/credentials", headers=staff,
                                  json={"label": "Cai's phone"})
    assert refused.status_code == 403  # a secret for someone else is an admin's to hand out
    admin = await api.login("admin")
    phone = (await api.http.post(f"/api/v1/residents/{rid}/credentials", headers=admin,
                                 json={"label": "Cai's phone"})).json()
    assert api.access.decide("elev-b1-1", "qr", qr(phone)).floors == (1, 6)
    assert api.access.decide("gate-north", "card", "G-CAI").granted
    profile = (await api.http.get(f"/api/v1/residents/{rid}", headers=staff)).json()
    assert {c["card_number"] for c in profile["cards"]} == {"G-CAI", "E-CAI"}
    assert profile["unit"]["floor"] == 6
    assert phone["secret_hex"] not in str(profile) and "secret" not in str(profile)

    lost = await api.http.post("/api/v1/cards/gate/G-CAI/revoke", headers=staff)
    assert lost.status_code == 200 and lost.json()["revoked_at"] is not None
    assert api.access.decide("gate-north", "card", "G-CAI").reason == Reason.REVOKED
    assert api.access.decide("elev-b1-1", "card", "E-CAI").granted

    moved = await api.http.patch(f"/api/v1/residents/{rid}", headers=staff,
                                 json={"unit_id": "b1-0501"})
    assert moved.status_code == 200
    assert api.access.decide("elev-b1-1", "qr", qr(phone)).floors == (1, 5)

    gone = await api.http.post(f"/api/v1/residents/{rid}/move-out", headers=staff)
    assert gone.status_code == 200 and gone.json()["moved_out_at"] is not None
    assert api.access.decide("elev-b1-1", "card", "E-CAI").reason == Reason.REVOKED
    assert api.access.decide("gate-north", "qr", qr(phone)).reason == Reason.REVOKED
    listed = (await api.http.get("/api/v1/residents", headers=staff)).json()
    assert rid not in {r["resident_id"] for r in listed}
    buildings = (await api.http.get("/api/v1/buildings", headers=staff)).json()
    assert [(f["number"], f["public"]) for f in buildings[0]["floors"]][:2] == [
        (1, True), (2, False)]
    units = (await api.http.get("/api/v1/units?building_id=b1", headers=staff)).json()
    assert {u["unit_id"] for u in units} == {"b1-0201", "b1-0501", "b1-0601"}
    now = time.time()
    visit = await api.http.post("/api/v1/visitor-passes", headers=admin, json={
        "issued_by": "r-2", "visitor_name": "Plumber", "valid_from": now,
        "valid_until": now + 600, "gate_ids": ["gate-north"]})
    assert visit.status_code == 201 and len(visit.json()["secret_hex"]) == 64
    passes = (await api.http.get("/api/v1/visitor-passes?issued_by=r-2", headers=staff)).json()
    assert [p["visitor_name"] for p in passes] == ["Plumber"] and "secret_hex" not in passes[0]
    assert (await api.http.post(f"/api/v1/visitor-passes/{passes[0]['pass_id']}/revoke",
                                headers=staff)).json()["revoked_at"] is not None


async def test_access_groups_through_the_api(api: Api) -> None:
    staff = await api.login("admin")
    ann = (await api.http.post("/api/v1/residents/r-1/credentials", headers=staff,
                               json={})).json()
    assert api.access.decide("gym", "qr", qr(ann)).reason == Reason.NOT_PERMITTED
    group = await api.http.post("/api/v1/access-groups", headers=staff, json={
        "name": "gym", "gate_ids": ["gym"], "floors": [{"building_id": "b1", "floor": 4}],
        "windows": [{"weekday": day, "start_minute": 0, "end_minute": 1440}
                    for day in range(7)]})
    assert group.status_code == 201, group.text
    gid = group.json()["group_id"]
    member = await api.http.put(f"/api/v1/access-groups/{gid}/members/r-1", headers=staff)
    assert member.json()["member_ids"] == ["r-1"]
    assert api.access.decide("gym", "qr", qr(ann)).granted
    assert api.access.decide("elev-b1-1", "qr", qr(ann)).floors == (1, 2, 4)
    patched = await api.http.patch(f"/api/v1/access-groups/{gid}", headers=staff,
                                   json={"floors": []})
    assert patched.json()["floors"] == [] and patched.json()["gate_ids"] == ["gym"]
    assert api.access.decide("elev-b1-1", "qr", qr(ann)).floors == (1, 2)
    assert (await api.http.delete(f"/api/v1/access-groups/{gid}", headers=staff)
            ).status_code == 204
    assert api.access.decide("gym", "qr", qr(ann)).reason == Reason.NOT_PERMITTED
    assert (await api.http.get("/api/v1/access-groups", headers=staff)).json() == []


async def test_roles(api: Api) -> None:
    assert (await api.http.get("/api/v1/residents")).status_code == 401
    for who in ("ann", "engineer"):
        headers = await api.login(who)
        for method, path in (("GET", "/api/v1/residents"), ("GET", "/api/v1/residents/r-1"),
                             ("POST", "/api/v1/cards/gate/X/revoke"),
                             ("POST", "/api/v1/residents/r-2/credentials"),
                             ("GET", "/api/v1/visitor-passes")):
            answer = await api.http.request(method, path, headers=headers, json={})
            assert answer.status_code == 403, (who, path)
    engineer = await api.login("engineer")
    assert (await api.http.get("/api/v1/me", headers=engineer)).status_code == 403


async def test_a_resident_sees_and_changes_only_their_own(api: Api) -> None:
    ann, bob = await api.login("ann"), await api.login("bob")
    mine = await api.http.post("/api/v1/me/credentials", headers=ann, json={"label": "phone"})
    assert mine.status_code == 201
    bobs = (await api.http.post("/api/v1/me/credentials", headers=bob, json={})).json()
    listed = (await api.http.get("/api/v1/me/credentials", headers=ann)).json()
    assert [p["credential_id"] for p in listed] == [mine.json()["credential_id"]]
    assert "secret_hex" not in listed[0]
    profile = (await api.http.get("/api/v1/me", headers=ann)).json()
    assert profile["resident"]["resident_id"] == "r-1" and bobs["credential_id"] not in str(
        profile)

    stolen = await api.http.post(f"/api/v1/me/credentials/{bobs['credential_id']}/revoke",
                                 headers=ann)
    assert stolen.status_code == 404
    assert api.access.decide("gate-north", "qr", qr(bobs)).granted

    now = time.time()
    visit = await api.http.post("/api/v1/me/visitor-passes", headers=bob, json={
        "visitor_name": "Dana", "valid_from": now - 60, "valid_until": now + 3600})
    assert visit.status_code == 201, visit.text
    pass_id = visit.json()["pass_id"]
    assert (visit.json()["building_id"], visit.json()["floor"]) == ("b1", 5)
    for path in (f"/api/v1/me/visitor-passes/{pass_id}/revoke",
                 f"/api/v1/me/visitor-passes/{pass_id}/qr"):
        assert (await api.http.post(path, headers=ann)).status_code == 404
    assert (await api.http.get("/api/v1/me/visitor-passes", headers=ann)).json() == []
    shared = await api.http.post(f"/api/v1/me/visitor-passes/{pass_id}/qr", headers=bob)
    assert shared.status_code == 200
    decision = api.access.decide("elev-b1-1", "qr", shared.json()["qr"])
    assert decision.floors == (1, 5) and decision.visitor_pass_id == pass_id
    revoked = await api.http.post(f"/api/v1/me/visitor-passes/{pass_id}/revoke", headers=bob)
    assert revoked.status_code == 200
    assert (await api.http.post(f"/api/v1/me/visitor-passes/{pass_id}/qr", headers=bob)
            ).status_code == 409

    own = await api.http.post(f"/api/v1/me/credentials/{bobs['credential_id']}/revoke",
                              headers=bob)
    assert own.status_code == 200
    assert api.access.decide("gate-north", "qr", qr(bobs)).reason == Reason.REVOKED


async def test_bad_input_is_a_4xx(api: Api) -> None:
    staff = await api.login("admin")  # admin reaches every route, staff most
    now = time.time()
    cases = [
        ("POST", "/api/v1/residents", {"unit_id": "b1-0201", "name": "X", "role": "boss"}, 422),
        ("POST", "/api/v1/residents", {"unit_id": "nowhere", "name": "X", "role": "owner"}, 404),
        ("POST", "/api/v1/residents", {"unit_id": "b1-0201", "name": "Bob", "role": "owner",
                                       "resident_id": "r-2"}, 409),
        ("POST", "/api/v1/units", {"unit_id": "b1-9901", "building_id": "b1", "floor": 99}, 404),
        ("POST", "/api/v1/units", {"unit_id": "bad id", "building_id": "b1", "floor": 2}, 422),
        ("POST", "/api/v1/residents/r-1/cards", {"kind": "gate", "card_number": "a b"}, 422),
        ("POST", "/api/v1/residents/r-1/cards", {"kind": "boat", "card_number": "B1"}, 422),
        ("POST", "/api/v1/residents/r-9/cards", {"kind": "gate", "card_number": "B1"}, 404),
        ("POST", "/api/v1/cards/gate/never/revoke", None, 404),
        ("POST", "/api/v1/credentials/0000000000000000/revoke", None, 404),
        ("POST", "/api/v1/access-groups", {"name": "x", "windows": [
            {"weekday": 0, "start_minute": 600, "end_minute": 500}]}, 422),
        ("POST", "/api/v1/access-groups", {"name": "x", "floors": [
            {"building_id": "b1", "floor": 42}]}, 404),
        ("POST", "/api/v1/visitor-passes", {"issued_by": "r-1", "visitor_name": "V",
                                            "valid_from": now, "valid_until": now - 1}, 422),
        ("PATCH", "/api/v1/access-groups/nope", {"name": "y"}, 404),
        ("POST", "/api/v1/residents", "not json", 422),
    ]
    for method, path, body, expected in cases:
        answer = await api.http.request(method, path, headers=staff, json=body)
        assert answer.status_code == expected, (path, body, answer.text)
        assert "detail" in answer.json()
    unknown = await api.http.post("/api/v1/residents/r-9/cards", headers=staff,
                                  json={"kind": "gate", "card_number": "B1"})
    assert unknown.json() == {"detail": "resident 'r-9' does not exist"}  # says what is missing
    with_card = await api.http.post("/api/v1/residents/r-1/cards", headers=staff,
                                    json={"kind": "gate", "card_number": "G-1"})
    assert with_card.status_code == 201
    taken = await api.http.post("/api/v1/residents/r-2/cards", headers=staff,
                                json={"kind": "gate", "card_number": "G-1"})
    assert taken.status_code == 409


async def test_card_enrolment_by_staff_is_audited_and_shown_on_the_residents_page(
    api: Api,
) -> None:
    staff = await api.login("staff")
    enrolled = await api.http.post("/api/v1/residents/r-1/cards", headers=staff,
                                   json={"kind": "canteen", "card_number": "C-ANN"})
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["issued_by"] == "staff"
    again = await api.http.post("/api/v1/residents/r-1/cards", headers=staff,
                                json={"kind": "canteen", "card_number": "C-ANN"})
    assert again.status_code == 201 and again.json()["issued_by"] == "staff"
    # Another resident's card number, of the same kind or another: refused, and said why.
    for kind in ("canteen", "gate"):
        stolen = await api.http.post("/api/v1/residents/r-2/cards", headers=staff,
                                     json={"kind": kind, "card_number": "C-ANN"})
        assert stolen.status_code == 409, stolen.text
        assert "belongs to another resident" in stolen.json()["detail"]
    assert api.access.decide("canteen-1", "card", "C-ANN").resident_id == "r-1"

    for headers, path in ((staff, "/api/v1/residents/r-1"),
                          (await api.login("ann"), "/api/v1/me")):
        profile = (await api.http.get(path, headers=headers)).json()
        assert [(c["card_number"], c["issued_by"]) for c in profile["cards"]] == [
            ("C-ANN", "staff")]
        assert [(e["kind"], e["card_number"], e["actor"]) for e in profile["enrolments"]] == [
            ("canteen", "C-ANN", "staff")]
        assert abs(profile["enrolments"][0]["ts"] - time.time()) < 600
    bob = (await api.http.get("/api/v1/residents/r-2", headers=staff)).json()
    assert bob["cards"] == [] and bob["enrolments"] == []
    with api.engine.connect() as conn:  # once, in the hash chain, with the actor
        rows = conn.execute(select(audit_log.c.actor, audit_log.c.action,
                                   audit_log.c.resident_id, audit_log.c.credential_ref)).all()
        assert verify(conn).ok
    assert rows == [("staff", "enrol_card", "r-1", "C-ANN")]
