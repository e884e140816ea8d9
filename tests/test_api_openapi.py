"""/openapi.json tells the truth (issue 11): against the running gateway with its real
services, every answer a route gives has a status the document declares for that route and
a body that matches the declared schema.

Two passes: a walk over every operation of the document that provokes each status it
declares (witnessed requests), and a bounded schemathesis pass (when schemathesis is
installed) that throws generated input at every operation.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiomqtt import MqttError

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import all_extra_routers
from gateway.canteen.ledger import Ledger
from gateway.metrics import Registry
from gateway.store import db
from gateway.store import directory as d
from gateway.store.invitations import create_invitation
from gateway.telemetry.alert_log import AlertLog
from gateway.telemetry.local_db import LocalDb
from rules.model import Transition
from simulators.canteen import CanteenTerminal, card_credential
from simulators.demo.broker import Mosquitto, free_port
from simulators.modbus_units import SimulatedUnits, UnitSpec
from tests.community import Running, running_gateway

# --- a small JSON-schema check for what this API declares (OpenAPI 3.1 subset) -----------


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


def problems(spec: dict[str, Any], schema: dict[str, Any], value: Any,
             where: str = "$") -> Iterator[str]:
    """What is wrong with `value` against `schema`; nothing when it conforms."""
    schema = _resolve(spec, schema)
    if "anyOf" in schema:
        if not any(not list(problems(spec, s, value, where)) for s in schema["anyOf"]):
            yield f"{where}: {value!r} matches none of {schema['anyOf']}"
        return
    kind = schema.get("type")
    if kind is not None:
        allowed = _TYPES[kind]
        if not isinstance(value, allowed) or (kind in ("integer", "number")
                                              and isinstance(value, bool)):
            yield f"{where}: expected {kind}, got {value!r}"
            return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where}: {value!r} not in {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        yield f"{where}: {value!r} is not {schema['const']!r}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                yield f"{where}: missing {name!r}"
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                yield from problems(spec, properties[name], item, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                yield f"{where}: undeclared {name!r}"
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from problems(spec, schema["additionalProperties"], item,
                                    f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from problems(spec, schema["items"], item, f"{where}[{i}]")


def check_answer(spec: dict[str, Any], method: str, template: str,
                 response: httpx.Response) -> list[str]:
    """Problems of one answer against what the document declares for the operation."""
    where = f"{method.upper()} {template} -> {response.status_code}"
    declared = spec["paths"][template][method]["responses"]
    code = str(response.status_code)
    if code not in declared:
        return [f"{where}: undeclared status (declared {sorted(declared)}): {response.text}"]
    content = declared[code].get("content")
    if not content:
        return [] if not response.content else [f"{where}: a body where none is declared"]
    media = response.headers.get("content-type", "").split(";")[0].strip()
    declared_media = {m.split(";")[0].strip(): body for m, body in content.items()}
    if media not in declared_media:
        return [f"{where}: content type {media!r}, declared {sorted(declared_media)}"]
    if media != "application/json":
        return []
    return [f"{where}: {p}" for p in problems(spec, declared_media[media]["schema"],
                                               response.json())]


# --- the walk: every declared status of every operation, provoked -------------------------

Made = dict[str, Any]  # answers of earlier witnesses, by the name they were saved under


@dataclass
class Witness:
    """A request meant to produce `status` on the operation `method template`."""

    method: str
    template: str
    status: int
    path: str | Callable[[Made], str] | None = None  # default: the template, ids unknown
    role: str | None = "admin"  # whose token; None: no token
    json: Any = None
    data: dict[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)
    save: str | None = None  # keep the answer's JSON under this name


ROLES = ("resident", "staff", "engineer", "admin")
NOBODY = "zz-nobody"


def _fill(template: str, value: str = NOBODY) -> str:
    return re.sub(r"\{[^}]+\}", value, template)


def _bad_input(spec: dict[str, Any], method: str, template: str
               ) -> tuple[str, dict[str, str], Any] | None:
    """A request to `template` that fails validation: a body of the wrong shape, else a
    query or path value that breaks its declared constraint; None when nothing can."""
    operation = spec["paths"][template][method]
    if "requestBody" in operation:
        return _fill(template), {}, ["not", "an", "object"]
    for parameter in operation.get("parameters", []):
        schema = _resolve(spec, parameter["schema"])
        kinds = {o.get("type") for o in schema.get("anyOf", [schema])}
        bad = "not-a-number" if kinds & {"integer", "number"} else "x" * 300
        if parameter["in"] == "query":
            return _fill(template), {parameter["name"]: bad}, None
        if parameter["in"] == "path" and (
                "pattern" in schema or "maxLength" in schema or "enum" in schema
                or kinds & {"integer", "number"}):
            return template.replace("{" + parameter["name"] + "}", bad), {}, None
    return None


async def _tokens(http: httpx.AsyncClient, logins: dict[str, dict[str, Any]]
                  ) -> dict[str, dict[str, str]]:
    out = {}
    for role, login in logins.items():
        answer = await http.post("/api/v1/auth/token", data={
            "username": login["username"], "password": login["password"]})
        assert answer.status_code == 200, answer.text
        out[role] = {"Authorization": f"Bearer {answer.json()['access_token']}"}
    return out


def _logins(run: Running) -> dict[str, dict[str, Any]]:
    residents = [u for u in run.people.logins if u["role"] == "resident"]
    return {**{role: run.login(role) for role in ROLES}, "phoneless": residents[2]}


def _an_invitation(run: Running, resident_id: str) -> str:
    """A resident without a login (as imported) and an invitation for them."""
    engine = db.make_engine(run.config.database.url)
    try:
        with engine.begin() as conn:
            d.create_resident(conn, "b1-1201", "Walk Invitee", "family", resident_id=resident_id)
            return create_invitation(conn, resident_id, ttl_s=3600, now=time.time()).text
    finally:
        engine.dispose()


WALK_PASSWORD = "walk password 1"


def _specific(run: Running) -> list[Witness]:
    """Witnesses of the statuses a generic request cannot provoke, in order (later ones use
    what earlier ones made)."""
    now = time.time()
    rid = run.people.residents[0].resident_id
    phoneless = run.people.residents[2]
    visit = {"visitor_name": "V", "valid_from": now, "valid_until": now + 3600}
    caps = run.config.api
    day = time.strftime("%Y-%m-%d")
    W = Witness
    staff = run.login("staff")
    topup = f"/api/v1/canteen/accounts/{rid}/topup"
    refunds = f"/api/v1/canteen/accounts/{rid}/refunds"
    refund = {"amount_cents": 100, "idempotency_key": "walk-refund-0001",
              "terminal_id": "canteen-1"}
    invitation = _an_invitation(run, "r-walk-invitee")
    engineer = {"username": "walk-eng", "password": WALK_PASSWORD, "role": "engineer"}
    accept = {"invitation": invitation, "username": "walk-invitee", "password": WALK_PASSWORD}
    return [
        W("post", "/api/v1/auth/token", 200, role=None,
          data={"username": staff["username"], "password": staff["password"]}),
        W("post", "/api/v1/auth/token", 401, role=None,
          data={"username": "nobody", "password": "x" * 12}),
        W("get", "/healthz", 200, role=None),
        W("get", "/readyz", 200, role=None),
        W("get", "/metrics", 200, role=None),
        W("get", "/api/v1/devices", 200),
        W("get", "/api/v1/devices/{device_id}/latest", 200, "/api/v1/devices/erv-1/latest"),
        W("get", "/api/v1/devices/{device_id}/latest", 404, "/api/v1/devices/gate-north/latest"),
        W("get", "/api/v1/devices/{device_id}/registers", 200,
          "/api/v1/devices/erv-1/registers", role="engineer"),
        W("get", "/api/v1/devices/{device_id}/registers", 404, role="engineer"),
        W("post", "/api/v1/devices/{device_id}/set", 200, "/api/v1/devices/erv-1/set",
          role="engineer", json={"values": {"fan_speed_pct": 40}}),
        W("post", "/api/v1/devices/{device_id}/set", 404, role="engineer",
          json={"values": {"fan_speed_pct": 40}}),
        W("post", "/api/v1/devices/{device_id}/set", 502, "/api/v1/devices/erv-dead/set",
          role="engineer", json={"values": {"fan_speed_pct": 40}}),
        W("get", "/api/v1/energy/series", 200, params={"device_id": "site:test",
                                                       "metric": "power_w"}),
        W("get", "/api/v1/energy/series", 404, params={"device_id": NOBODY,
                                                       "metric": "power_w"}),
        W("get", "/api/v1/alerts", 200, role="engineer"),
        W("post", "/api/v1/alerts/{alert_id}/ack", 200, "/api/v1/alerts/walk-alert-1/ack",
          role="engineer"),
        W("post", "/api/v1/alerts/{alert_id}/ack", 404, role="engineer"),
        # the directory
        W("get", "/api/v1/buildings", 200),
        W("get", "/api/v1/units", 200),
        W("post", "/api/v1/units", 201, json={"unit_id": "b1-0901", "building_id": "b1",
                                             "floor": 9}),
        W("post", "/api/v1/units", 404, json={"unit_id": "zz-0901", "building_id": NOBODY,
                                             "floor": 9}),
        W("post", "/api/v1/units", 409, json={"unit_id": "b1-0901", "building_id": "b1",
                                             "floor": 8}),
        W("get", "/api/v1/residents", 200),
        W("post", "/api/v1/residents", 201, json={"unit_id": "b1-0901", "name": "Wu",
                                                 "role": "owner", "resident_id": "r-wu"}),
        W("post", "/api/v1/residents", 404, json={"unit_id": NOBODY, "name": "Wu",
                                                 "role": "owner"}),
        W("post", "/api/v1/residents", 409, json={"unit_id": "b1-0901", "name": "Other",
                                                 "role": "owner", "resident_id": "r-wu"}),
        W("get", "/api/v1/residents/{resident_id}", 200, f"/api/v1/residents/{rid}"),
        W("get", "/api/v1/residents/{resident_id}", 404),
        W("patch", "/api/v1/residents/{resident_id}", 200, "/api/v1/residents/r-wu",
          json={"name": "Wu Fang"}),
        W("patch", "/api/v1/residents/{resident_id}", 404, json={"name": "X"}),
        W("post", "/api/v1/residents/{resident_id}/cards", 201, "/api/v1/residents/r-wu/cards",
          json={"kind": "gate", "card_number": "G-WU"}),
        W("post", "/api/v1/residents/{resident_id}/cards", 404,
          json={"kind": "gate", "card_number": "G-NOBODY"}),
        W("post", "/api/v1/residents/{resident_id}/cards", 409,
          f"/api/v1/residents/{rid}/cards", json={"kind": "gate", "card_number": "G-WU"}),
        W("post", "/api/v1/cards/{kind}/{card_number}/revoke", 200,
          "/api/v1/cards/gate/G-WU/revoke"),
        W("post", "/api/v1/cards/{kind}/{card_number}/revoke", 404,
          "/api/v1/cards/gate/G-NOBODY/revoke"),
        W("post", "/api/v1/residents/{resident_id}/credentials", 201,
          "/api/v1/residents/r-wu/credentials", json={}, save="wu-phone"),
        W("post", "/api/v1/residents/{resident_id}/credentials", 404, json={}),
        W("post", "/api/v1/credentials/{credential_id}/revoke", 200,
          lambda made: f"/api/v1/credentials/{made['wu-phone']['credential_id']}/revoke"),
        W("post", "/api/v1/credentials/{credential_id}/revoke", 404),
        W("get", "/api/v1/access-groups", 200),
        W("post", "/api/v1/access-groups", 201, json={"name": "gym", "gate_ids": ["gate-north"]},
          save="gym"),
        W("post", "/api/v1/access-groups", 201, json={"name": "pool"}, save="pool"),
        W("post", "/api/v1/access-groups", 404, json={
            "name": "roof", "floors": [{"building_id": "b1", "floor": 99}]}),
        W("post", "/api/v1/access-groups", 409, json={"name": "gym"}),
        W("patch", "/api/v1/access-groups/{group_id}", 200,
          lambda made: f"/api/v1/access-groups/{made['gym']['group_id']}", json={"name": "Gym"}),
        W("patch", "/api/v1/access-groups/{group_id}", 404, json={"name": "x"}),
        W("patch", "/api/v1/access-groups/{group_id}", 409,
          lambda made: f"/api/v1/access-groups/{made['gym']['group_id']}", json={"name": "pool"}),
        W("put", "/api/v1/access-groups/{group_id}/members/{resident_id}", 200,
          lambda made: f"/api/v1/access-groups/{made['gym']['group_id']}/members/r-wu"),
        W("put", "/api/v1/access-groups/{group_id}/members/{resident_id}", 404),
        W("delete", "/api/v1/access-groups/{group_id}/members/{resident_id}", 200,
          lambda made: f"/api/v1/access-groups/{made['gym']['group_id']}/members/r-wu"),
        W("delete", "/api/v1/access-groups/{group_id}/members/{resident_id}", 404),
        W("delete", "/api/v1/access-groups/{group_id}", 204,
          lambda made: f"/api/v1/access-groups/{made['pool']['group_id']}"),
        W("delete", "/api/v1/access-groups/{group_id}", 404),
        W("get", "/api/v1/visitor-passes", 200),
        W("post", "/api/v1/visitor-passes", 201, json={**visit, "issued_by": "r-wu"},
          save="wu-pass"),
        W("post", "/api/v1/visitor-passes", 404, json={**visit, "issued_by": NOBODY}),
        W("post", "/api/v1/visitor-passes/{pass_id}/revoke", 200,
          lambda made: f"/api/v1/visitor-passes/{made['wu-pass']['pass_id']}/revoke"),
        W("post", "/api/v1/visitor-passes/{pass_id}/revoke", 404),
        W("post", "/api/v1/residents/{resident_id}/move-out", 200,
          "/api/v1/residents/r-wu/move-out"),
        W("post", "/api/v1/residents/{resident_id}/move-out", 404),
        W("post", "/api/v1/residents/{resident_id}/move-out", 409,
          "/api/v1/residents/r-wu/move-out"),
        W("patch", "/api/v1/residents/{resident_id}", 409, "/api/v1/residents/r-wu",
          json={"name": "Gone"}),
        W("post", "/api/v1/residents/{resident_id}/cards", 409, "/api/v1/residents/r-wu/cards",
          json={"kind": "gate", "card_number": "G-WU2"}),
        W("post", "/api/v1/residents/{resident_id}/credentials", 409,
          "/api/v1/residents/r-wu/credentials", json={}),
        W("post", "/api/v1/visitor-passes", 409, json={**visit, "issued_by": "r-wu"}),
        W("put", "/api/v1/access-groups/{group_id}/members/{resident_id}", 409,
          lambda made: f"/api/v1/access-groups/{made['gym']['group_id']}/members/r-wu"),
        # a resident's own
        W("get", "/api/v1/me", 200, role="resident"),
        W("get", "/api/v1/me/credentials", 200, role="resident"),
        W("post", "/api/v1/me/credentials", 201, role="resident", json={"label": "tablet"},
          save="tablet"),
        W("post", "/api/v1/me/credentials/{credential_id}/revoke", 200,
          lambda made: f"/api/v1/me/credentials/{made['tablet']['credential_id']}/revoke",
          role="resident"),
        W("post", "/api/v1/me/credentials/{credential_id}/revoke", 404, role="resident"),
        *[W("post", "/api/v1/me/credentials", 201, role="resident", json={})
          for _ in range(caps.phone_credentials_per_resident - 1)],  # the seeded phone + these
        W("post", "/api/v1/me/credentials", 409, role="resident", json={}),
        W("get", "/api/v1/me/visitor-passes", 200, role="resident"),
        W("post", "/api/v1/me/visitor-passes", 201, role="resident", json=visit,
          save="my-pass"),
        W("post", "/api/v1/me/visitor-passes/{pass_id}/qr", 200,
          lambda made: f"/api/v1/me/visitor-passes/{made['my-pass']['pass_id']}/qr",
          role="resident"),
        W("post", "/api/v1/me/visitor-passes/{pass_id}/revoke", 200,
          lambda made: f"/api/v1/me/visitor-passes/{made['my-pass']['pass_id']}/revoke",
          role="resident"),
        W("post", "/api/v1/me/visitor-passes/{pass_id}/qr", 409,
          lambda made: f"/api/v1/me/visitor-passes/{made['my-pass']['pass_id']}/qr",
          role="resident"),
        W("post", "/api/v1/me/visitor-passes/{pass_id}/revoke", 404, role="resident"),
        W("post", "/api/v1/me/visitor-passes/{pass_id}/qr", 404, role="resident"),
        *[W("post", "/api/v1/me/visitor-passes", 201, role="resident", json=visit)
          for _ in range(caps.visitor_passes_per_resident)],
        W("post", "/api/v1/me/visitor-passes", 409, role="resident", json=visit),
        W("post", "/api/v1/me/access-token", 200, role="resident"),
        W("get", "/api/v1/me/devices", 200, role="resident"),
        W("post", "/api/v1/credentials/{credential_id}/revoke", 200,
          f"/api/v1/credentials/{phoneless.credential_id}/revoke"),
        W("post", "/api/v1/me/access-token", 409, role="phoneless"),
        W("post", "/api/v1/gates/{device_id}/unlock", 202, "/api/v1/gates/gate-north/unlock",
          role="resident"),
        W("post", "/api/v1/gates/{device_id}/unlock", 404, role="resident"),
        W("post", "/api/v1/elevators/{device_id}/call", 202, "/api/v1/elevators/elev-b1-1/call",
          role="resident", json={"floor": run.people.residents[0].floor}),
        W("post", "/api/v1/elevators/{device_id}/call", 404, role="resident",
          json={"floor": 1}),
        # canteen (one payment made over MQTT beforehand: txn "walk-t-1" of 900 cents)
        W("get", "/api/v1/me/canteen", 200, role="resident"),
        W("get", "/api/v1/canteen/accounts/{resident_id}", 200,
          f"/api/v1/canteen/accounts/{rid}"),
        W("post", "/api/v1/canteen/accounts/{resident_id}/topup", 201, topup,
          json={"amount_cents": 500, "idempotency_key": "walk-topup-0001"}),
        W("post", "/api/v1/canteen/accounts/{resident_id}/topup", 200, topup,
          json={"amount_cents": 500, "idempotency_key": "walk-topup-0001"}),
        W("post", "/api/v1/canteen/accounts/{resident_id}/topup", 409, topup,
          json={"amount_cents": 700, "idempotency_key": "walk-topup-0001"}),
        W("post", "/api/v1/canteen/accounts/{resident_id}/topup", 404,
          json={"amount_cents": 500, "idempotency_key": "walk-topup-0002"}),
        W("post", "/api/v1/canteen/accounts/{resident_id}/refunds", 201, refunds,
          json={**refund, "txn_id": "walk-t-1"}),
        W("post", "/api/v1/canteen/accounts/{resident_id}/refunds", 200, refunds,
          json={**refund, "txn_id": "walk-t-1"}),
        W("post", "/api/v1/canteen/accounts/{resident_id}/refunds", 409, refunds,
          json={**refund, "txn_id": "walk-t-1", "amount_cents": 5000,
                "idempotency_key": "walk-refund-0002"}),
        W("post", "/api/v1/canteen/accounts/{resident_id}/refunds", 404, refunds,
          json={**refund, "txn_id": "never", "idempotency_key": "walk-refund-0003"}),
        W("get", "/api/v1/access/log", 200, role="staff",
          params={"granted": "true", "since": "2020-01-01T00:00:00", "limit": "5"}),
        W("get", "/api/v1/devices/{device_id}/registers", 200,
          "/api/v1/devices/gate-north/registers", role="engineer"),
        W("get", "/api/v1/canteen/reconciliation", 200, params={"date": day}),
        W("get", "/api/v1/canteen/settlement", 200, params={"date": day}),
        # users and invitations
        W("get", "/api/v1/users", 200, save="users"),
        W("post", "/api/v1/users", 201, json=engineer, save="walk-eng"),
        W("post", "/api/v1/users", 409, json=engineer),
        W("post", "/api/v1/users", 404, json={**engineer, "username": "walk-r",
                                             "role": "resident", "resident_id": NOBODY}),
        W("patch", "/api/v1/users/{user_id}", 200,
          lambda made: f"/api/v1/users/{made['walk-eng']['user_id']}", json={"role": "staff"}),
        W("patch", "/api/v1/users/{user_id}", 404, json={}),
        W("patch", "/api/v1/users/{user_id}", 409, lambda made: "/api/v1/users/" + next(
            u["user_id"] for u in made["users"] if u["role"] == "admin"),
          json={"disabled": True}),  # the last enabled admin
        W("post", "/api/v1/users/{user_id}/password", 204,
          lambda made: f"/api/v1/users/{made['walk-eng']['user_id']}/password",
          json={"password": WALK_PASSWORD}),
        W("post", "/api/v1/users/{user_id}/password", 404, json={"password": WALK_PASSWORD}),
        W("post", "/api/v1/residents/{resident_id}/invitations", 201,
          "/api/v1/residents/r-walk-invitee/invitations", json={}),
        W("post", "/api/v1/residents/{resident_id}/invitations", 404, json={}),
        W("post", "/api/v1/residents/{resident_id}/invitations", 409,
          f"/api/v1/residents/{rid}/invitations", json={}),  # has a login
        W("post", "/api/v1/invitations/accept", 403, role=None,
          json={**accept, "invitation": "0123456789abcdef." + "A" * 32}),
        W("post", "/api/v1/invitations/accept", 409, role=None,
          json={**accept, "username": staff["username"]}),
        W("post", "/api/v1/invitations/accept", 201, role=None, json=accept),
    ]


async def _own_password(http: httpx.AsyncClient, walk: Walk) -> None:
    """POST /me/password as a user made for it (the change ends its sessions): 403, 204."""
    signed_in = await http.post("/api/v1/auth/token", data={"username": "walk-eng",
                                                             "password": WALK_PASSWORD})
    assert signed_in.status_code == 200, signed_in.text
    me = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    for current, status in (("not the password", 403), (WALK_PASSWORD, 204)):
        answer = await walk.send(http, "post", "/api/v1/me/password", "/api/v1/me/password",
                                 me, json={"current_password": current,
                                           "new_password": "walk password 2"})
        assert answer.status_code == status, answer.text


@dataclass
class Walk:
    spec: dict[str, Any]
    found: list[str] = field(default_factory=list)  # problems
    witnessed: set[tuple[str, str, int]] = field(default_factory=set)

    async def send(self, http: httpx.AsyncClient, method: str, template: str, path: str,
                   headers: dict[str, str], **kwargs: Any) -> httpx.Response:
        answer = await http.request(method.upper(), path, headers=headers, **kwargs)
        self.found.extend(check_answer(self.spec, method, template, answer))
        self.witnessed.add((method, template, answer.status_code))
        return answer

    async def generic(self, http: httpx.AsyncClient, tokens: dict[str, dict[str, str]]) -> None:
        """401 without a token, 403 for the first role refused, 422 for broken input."""
        for template, operations in self.spec["paths"].items():
            for method, operation in operations.items():
                declared = set(operation["responses"])
                path = _fill(template)
                if "401" in declared and template != "/api/v1/auth/token":
                    await self.send(http, method, template, path, {})
                    await self.send(http, method, template, path,
                                    {"Authorization": "Bearer not-a-token"})
                if "403" in declared:
                    for role in ROLES:
                        answer = await self.send(http, method, template, path, tokens[role],
                                                 json={})
                        if answer.status_code == 403:
                            break
                bad = _bad_input(self.spec, method, template) if "422" in declared else None
                if bad is not None:
                    bad_path, params, body = bad
                    roles = (None, *ROLES) if template == "/api/v1/auth/token" else ROLES
                    for who in roles:
                        headers = tokens[who] if who else {}
                        answer = await self.send(http, method, template, bad_path, headers,
                                                 params=params, json=body)
                        if answer.status_code == 422:
                            break

    def unwitnessed(self) -> list[str]:
        return sorted(f"{method.upper()} {template} {code}"
                      for template, operations in self.spec["paths"].items()
                      for method, operation in operations.items()
                      for code in operation["responses"]
                      if (method, template, int(code)) not in self.witnessed)


async def _pay_once(run: Running, mosquitto: Mosquitto) -> None:
    payer = run.people.residents[0]
    async with CanteenTerminal(mosquitto.host, mosquitto.port, "canteen-1", root=run.root,
                               timeout_s=5.0) as terminal:
        terminal.new_txn_id = lambda: "walk-t-1"  # type: ignore[method-assign]
        ledger = Ledger(db.make_engine(run.config.database.url))
        ledger.topup(payer.resident_id, 5000, "walk-topup-first")
        ledger.engine.dispose()
        sale = await terminal.sell(900, card_credential(payer.cards["canteen"]))
        assert sale.outcome == "approved", sale


def _an_alert(run: Running) -> None:
    alerts = AlertLog(LocalDb(run.config.database.url))
    now = time.time()
    alerts.record([Transition("walk-alert-1", "walk-rule", "erv-1", "power_w", "firing",
                              "warning", 1.0, now - 60, now, "a walk")])
    alerts.db.close()


async def _with_nothing_running(run: Running, walk: Walk) -> None:
    """The same store behind an app whose services are all down, its broker lost, a small
    sign-in queue, seen from outside loopback: every 503, the 429 and /metrics' 401."""
    api = run.config.api.model_copy(update={"login_queue": 1, "login_attempts_per_client": 8})
    ctx = ApiContext(config=run.config.model_copy(update={"api": api}),
                     engine=db.make_engine(run.config.database.url),
                     jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
                     metrics=Registry(), publish=_no_publish, ready=lambda: False)
    app = create_app(ctx, all_extra_routers())
    transport = httpx.ASGITransport(app=app, client=("192.0.2.9", 4000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            tokens = await _tokens(http, _logins(run))
            for template, operations in walk.spec["paths"].items():
                for method, operation in operations.items():
                    if "503" not in operation["responses"] or template == "/api/v1/auth/token":
                        continue
                    for role in ("resident", "engineer", "admin"):
                        answer = await walk.send(http, method, template, _fill(
                            template, "erv-1" if "/devices/" in template else NOBODY),
                            tokens[role], json={"values": {"fan_speed_pct": 1}})
                        if answer.status_code == 503:
                            break
            await walk.send(http, "get", "/metrics", "/metrics", {})
            staff = run.login("staff")
            sign_ins = [walk.send(http, "post", "/api/v1/auth/token", "/api/v1/auth/token", {},
                                  data={"username": staff["username"], "password": "nope" * 4})
                        for _ in range(8)]
            await asyncio.gather(*sign_ins)  # 2 hashed at most, the others 503
            await walk.send(http, "post", "/api/v1/auth/token", "/api/v1/auth/token", {},
                            data={"username": staff["username"], "password": "nope" * 4})
            # This address is beyond its attempts now: the other sign-in-like routes too.
            await walk.send(http, "post", "/api/v1/me/password", "/api/v1/me/password",
                            tokens["engineer"], json={"current_password": "not the password",
                                                      "new_password": "walk password 3"})
            await walk.send(http, "post", "/api/v1/invitations/accept",
                            "/api/v1/invitations/accept", {}, json={
                                "invitation": "0123456789abcdef." + "A" * 32,
                                "username": "walk-late", "password": WALK_PASSWORD})
        await _invitations_busy(app, walk, _an_invitation(run, "r-walk-busy"))
    finally:
        ctx.engine.dispose()


async def _invitations_busy(app: Any, walk: Walk, invitation: str) -> None:
    """Accepting an invitation hashes a password: with the one-place queue of this app,
    several at once are 503 (like sign-ins), from an address with attempts left."""
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        accepts = [walk.send(http, "post", "/api/v1/invitations/accept",
                             "/api/v1/invitations/accept", {}, json={
                                 "invitation": invitation, "username": f"walk-busy-{i}",
                                 "password": WALK_PASSWORD}) for i in range(6)]
        await asyncio.gather(*accepts)  # 2 hashed at most, the others 503


async def _no_publish(topic: str, payload: bytes) -> None:
    raise MqttError("the broker is gone")


STREAMS = {"/api/v1/events"}  # answered with a stream that does not end by itself


async def _stream_answers(http: httpx.AsyncClient, walk: Walk,
                          tokens: dict[str, dict[str, str]]) -> None:
    """A stream's 200: its status and content type, then the stream is closed."""
    for template in STREAMS:
        media = next(iter(walk.spec["paths"][template]["get"]["responses"]["200"]["content"]))
        for role in ROLES:
            async with http.stream("GET", template, headers=tokens[role]) as answer:
                walk.witnessed.add(("get", template, answer.status_code))
                if (answer.status_code != 200
                        or not answer.headers["content-type"].startswith(media)):
                    walk.found.append(f"GET {template} as {role}: {answer.status_code} "
                                      f"{answer.headers.get('content-type')}")


async def test_every_declared_status_of_every_operation_is_what_the_route_answers(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    live, dead = free_port(), free_port()
    units = [{"device_id": "erv-1", "kind": "fresh_air", "host": "127.0.0.1", "port": live,
              "unit_id": 1, "profile": "fresh-air-erv", "poll_interval_s": 0.2},
             {"device_id": "erv-dead", "kind": "fresh_air", "host": "127.0.0.1", "port": dead,
              "unit_id": 1, "profile": "fresh-air-erv", "poll_interval_s": 5}]
    async with (
        SimulatedUnits([UnitSpec("fresh-air-erv", live)]),
        running_gateway(mosquitto, tmp_path, extra_devices=units) as run,
        httpx.AsyncClient(base_url=run.api, timeout=30) as http,
    ):
        walk = Walk((await http.get("/openapi.json")).json())
        tokens = await _tokens(http, _logins(run))
        await _pay_once(run, mosquitto)
        _an_alert(run)
        for _ in range(100):  # the unit's first poll
            if (await http.get("/api/v1/devices/erv-1/latest", headers=tokens["engineer"])
                    ).status_code == 200:
                break
            await asyncio.sleep(0.1)
        made: Made = {}
        for witness in _specific(run):
            path = witness.path(made) if callable(witness.path) else witness.path
            answer = await walk.send(http, witness.method, witness.template,
                                     path or _fill(witness.template),
                                     tokens[witness.role] if witness.role else {},
                                     json=witness.json, data=witness.data,
                                     params=witness.params)
            if answer.status_code != witness.status:
                walk.found.append(f"{witness}: {answer.status_code} {answer.text}")
            elif witness.save:
                made[witness.save] = answer.json()
        await _own_password(http, walk)
        await _stream_answers(http, walk, tokens)
        await walk.generic(http, tokens)
        await _with_nothing_running(run, walk)
        assert not walk.found, "\n".join(walk.found)
        missing = walk.unwitnessed()
        assert not missing, "declared but never answered:\n" + "\n".join(missing)


# --- schemathesis --------------------------------------------------------------------------

# In all, shared by the operations; SCGW_FUZZ_EXAMPLES=5000 for a deeper run by hand.
FUZZ_EXAMPLES = int(os.environ.get("SCGW_FUZZ_EXAMPLES", "200"))
FUZZ_SECONDS = 45.0 * max(1.0, FUZZ_EXAMPLES / 200)


def _fuzz(spec: dict[str, Any], base_url: str, tokens: dict[str, dict[str, str]]
          ) -> tuple[int, list[str]]:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [schemathesis.checks.not_a_server_error, status_code_conformance,
              content_type_conformance, response_schema_conformance, negative_data_rejection]
    schema = schemathesis.openapi.from_dict(spec)
    operations = [operation for result in schema.get_all_operations()
                  if (operation := result.ok()) is not None  # type: ignore[union-attr]
                  and operation.path not in STREAMS]  # a stream never ends: see _stream_answers
    per_operation = max(2, FUZZ_EXAMPLES // len(operations))  # per role, see below
    deadline = time.monotonic() + FUZZ_SECONDS
    failures: list[str] = []
    sent = 0
    def fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=max(1, per_operation // 4), deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            nonlocal sent
            sent += 1
            try:
                case.call_and_validate(base_url=base_url, headers=headers, checks=checks,
                                       timeout=30)
            except (Exception, BaseExceptionGroup) as exc:  # recorded, not shrunk
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:2000])

        try:
            run()
        except Unsatisfiable:  # no input to break (a route without parameters)
            pass

    # Every role's token on every operation (its own routes and the ones it is refused),
    # the modes alternating so the budget covers both; the sign-in with no token.
    for operation in operations:
        roles = (None,) if operation.path == "/api/v1/auth/token" else ROLES
        for i, role in enumerate(roles):
            modes = ((GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if len(roles) == 1
                     else (GenerationMode.POSITIVE if i % 2 == 0 else GenerationMode.NEGATIVE,))
            for mode in modes:
                if time.monotonic() < deadline:
                    fuzz(operation, mode, tokens[role] if role else {})
    return sent, failures


async def test_a_bounded_schemathesis_pass_finds_nothing_undeclared(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    pytest.importorskip("schemathesis")
    async with (
        running_gateway(mosquitto, tmp_path) as run,
        httpx.AsyncClient(base_url=run.api, timeout=30) as http,
    ):
        spec = (await http.get("/openapi.json")).json()
        tokens = await _tokens(http, _logins(run))
        sent, failures = await asyncio.to_thread(_fuzz, spec, run.api, tokens)
        assert sent >= 50
        assert not failures, f"{len(failures)} of {sent}:\n\n" + "\n\n".join(failures[:10])


def test_the_checker_itself() -> None:
    spec: dict[str, Any] = {"components": {"schemas": {"E": {
        "type": "object", "required": ["detail"],
        "properties": {"detail": {"anyOf": [{"type": "string"}, {"type": "array"}]}}}}}}
    ref = {"$ref": "#/components/schemas/E"}
    assert not list(problems(spec, ref, {"detail": "x"}))
    assert not list(problems(spec, ref, {"detail": [{"loc": []}]}))
    assert list(problems(spec, ref, {"detail": 3}))
    assert list(problems(spec, ref, {}))
