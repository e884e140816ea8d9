"""The authorization walk (issue 12): every operation of /openapi.json, against the running
gateway, with no token, with each role's token, and with a resident's token against another
resident's ids.

`ACCESS` is the allow-list: every operation names the roles it admits. An operation the
document has and the list does not (a new route) fails the test, as does a stale entry, so
a route cannot be added without someone deciding who may call it; and the walk checks that
the route enforces exactly that: 401 without a token, 403 for every other role, neither for
the roles admitted.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx

from simulators.demo.broker import Mosquitto
from tests.community import Running, running_gateway

R, S, E, A = "resident", "staff", "engineer", "admin"
ROLES = (R, S, E, A)
PUBLIC = "public"  # no token needed (sign-in, health, invitations carry their own secret)
ALL = frozenset(ROLES)
STAFF = frozenset({S, A})
ENGINEER = frozenset({E, A})
RESIDENT = frozenset({R})  # "me" routes: a resident record is needed, admins have none
ADMIN = frozenset({A})

ACCESS: dict[tuple[str, str], frozenset[str] | str] = {
    ("post", "/api/v1/auth/token"): PUBLIC,
    ("get", "/healthz"): PUBLIC,
    ("get", "/readyz"): PUBLIC,
    ("get", "/metrics"): PUBLIC,  # its own token, or loopback (this walk is on loopback)
    ("get", "/api/v1/devices"): frozenset({S, E, A}),
    ("get", "/api/v1/devices/{device_id}/latest"): frozenset({S, E, A}),
    ("post", "/api/v1/me/access-token"): RESIDENT,
    ("get", "/api/v1/me/devices"): RESIDENT,
    ("post", "/api/v1/gates/{device_id}/unlock"): RESIDENT,
    ("post", "/api/v1/elevators/{device_id}/call"): RESIDENT,
    ("get", "/api/v1/buildings"): STAFF,
    ("get", "/api/v1/units"): STAFF,
    ("post", "/api/v1/units"): STAFF,
    ("get", "/api/v1/residents"): STAFF,
    ("post", "/api/v1/residents"): STAFF,
    ("get", "/api/v1/residents/{resident_id}"): STAFF,
    ("patch", "/api/v1/residents/{resident_id}"): STAFF,
    ("post", "/api/v1/residents/{resident_id}/move-out"): STAFF,
    ("post", "/api/v1/residents/{resident_id}/cards"): STAFF,
    ("post", "/api/v1/cards/{kind}/{card_number}/revoke"): STAFF,
    ("post", "/api/v1/residents/{resident_id}/credentials"): ADMIN,
    ("post", "/api/v1/credentials/{credential_id}/revoke"): STAFF,
    ("get", "/api/v1/access-groups"): STAFF,
    ("post", "/api/v1/access-groups"): STAFF,
    ("patch", "/api/v1/access-groups/{group_id}"): STAFF,
    ("delete", "/api/v1/access-groups/{group_id}"): STAFF,
    ("put", "/api/v1/access-groups/{group_id}/members/{resident_id}"): STAFF,
    ("delete", "/api/v1/access-groups/{group_id}/members/{resident_id}"): STAFF,
    ("get", "/api/v1/visitor-passes"): STAFF,
    ("post", "/api/v1/visitor-passes"): ADMIN,
    ("post", "/api/v1/visitor-passes/{pass_id}/revoke"): STAFF,
    ("get", "/api/v1/me"): RESIDENT,
    ("get", "/api/v1/me/credentials"): RESIDENT,
    ("post", "/api/v1/me/credentials"): RESIDENT,
    ("post", "/api/v1/me/credentials/{credential_id}/revoke"): RESIDENT,
    ("get", "/api/v1/me/visitor-passes"): RESIDENT,
    ("post", "/api/v1/me/visitor-passes"): RESIDENT,
    ("post", "/api/v1/me/visitor-passes/{pass_id}/revoke"): RESIDENT,
    ("post", "/api/v1/me/visitor-passes/{pass_id}/qr"): RESIDENT,
    ("get", "/api/v1/me/canteen"): RESIDENT,
    ("get", "/api/v1/canteen/accounts/{resident_id}"): STAFF,
    ("post", "/api/v1/canteen/accounts/{resident_id}/topup"): STAFF,
    ("post", "/api/v1/canteen/accounts/{resident_id}/refunds"): STAFF,
    ("get", "/api/v1/canteen/reconciliation"): STAFF,
    ("get", "/api/v1/canteen/settlement"): STAFF,
    ("post", "/api/v1/devices/{device_id}/set"): ENGINEER,
    ("get", "/api/v1/devices/{device_id}/registers"): ENGINEER,
    ("get", "/api/v1/energy/series"): ENGINEER,
    ("get", "/api/v1/alerts"): ENGINEER,
    ("post", "/api/v1/alerts/{alert_id}/ack"): ENGINEER,
    ("get", "/api/v1/events"): ALL,  # what each role sees is tested in test_api_events
    ("get", "/api/v1/access/log"): STAFF,
    ("get", "/api/v1/users"): ADMIN,
    ("post", "/api/v1/users"): ADMIN,
    ("patch", "/api/v1/users/{user_id}"): ADMIN,
    ("post", "/api/v1/users/{user_id}/password"): ADMIN,
    ("post", "/api/v1/me/password"): ALL,
    ("post", "/api/v1/residents/{resident_id}/invitations"): STAFF,
    ("post", "/api/v1/invitations/accept"): PUBLIC,
}
NOBODY = "zz-nobody"


def _fill(template: str, ids: dict[str, str] | None = None) -> str:
    ids = ids or {}
    return re.sub(r"\{([^}]+)\}", lambda m: ids.get(m.group(1), NOBODY), template)


async def _status(http: httpx.AsyncClient, method: str, path: str,
                  headers: dict[str, str]) -> int:
    """The status only; a stream (the events route) is closed as soon as it answers."""
    body: dict[str, Any] | None = None if method in ("get", "delete") else {}
    async with http.stream(method.upper(), path, headers=headers, json=body) as answer:
        return answer.status_code


async def _token(http: httpx.AsyncClient, login: dict[str, Any]) -> dict[str, str]:
    answer = await http.post("/api/v1/auth/token", data={
        "username": login["username"], "password": login["password"]})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


async def _others_ids(http: httpx.AsyncClient, run: Running, admin: dict[str, str],
                      other: dict[str, str]) -> dict[str, str]:
    """Ids that belong to the other resident: its record, phone, a visitor pass, its user."""
    bob = run.people.residents[1]
    now = time.time()
    made = await http.post("/api/v1/me/visitor-passes", headers=other, json={
        "visitor_name": "Guest", "valid_from": now, "valid_until": now + 3600})
    assert made.status_code == 201, made.text
    ids = {"resident_id": bob.resident_id, "credential_id": bob.credential_id,
           "pass_id": made.json()["pass_id"]}
    users = await http.get("/api/v1/users", headers=admin)
    if users.status_code == 200:
        ids["user_id"] = next(u["user_id"] for u in users.json()
                              if u.get("resident_id") == bob.resident_id)
    return ids


async def test_every_route_admits_exactly_the_roles_its_entry_names(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with (
        running_gateway(mosquitto, tmp_path) as run,
        httpx.AsyncClient(base_url=run.api, timeout=30) as http,
    ):
        spec = (await http.get("/openapi.json")).json()
        operations = {(method, template) for template, ops in spec["paths"].items()
                      for method in ops}
        unlisted = sorted(operations - set(ACCESS))
        assert not unlisted, f"routes without an ACCESS entry (decide who may call them): " \
                             f"{unlisted}"
        stale = sorted(set(ACCESS) - operations)
        assert not stale, f"ACCESS entries for routes that are gone: {stale}"
        residents = [u for u in run.people.logins if u["role"] == R]
        tokens = {role: await _token(http, run.login(role)) for role in ROLES}
        found: list[str] = []
        for (method, template), allowed in sorted(ACCESS.items()):
            path = _fill(template)
            if allowed == PUBLIC:
                continue
            code = await _status(http, method, path, {})
            if code != 401:
                found.append(f"{method.upper()} {template} without a token: {code}")
            for role in ROLES:
                code = await _status(http, method, path, tokens[role])
                if role in allowed and code in (401, 403):
                    found.append(f"{method.upper()} {template} refused {role}: {code}")
                elif role not in allowed and code != 403:
                    found.append(f"{method.upper()} {template} let {role} through: {code}")
                elif code >= 500:
                    found.append(f"{method.upper()} {template} as {role}: {code}")

        # A resident's token against another resident's ids: refused or not found, never
        # served, and nothing of the other's is changed.
        alice = await _token(http, residents[0])
        bob = await _token(http, residents[1])
        theirs = await _others_ids(http, run, tokens[A], bob)
        for (method, template), _allowed in sorted(ACCESS.items()):
            names = set(re.findall(r"\{([^}]+)\}", template))
            if not names & set(theirs):
                continue
            code = await _status(http, method, _fill(template, theirs), alice)
            if code not in (403, 404):
                found.append(f"{method.upper()} {template} with another resident's ids: {code}")
        assert not found, "\n".join(found)
        phones = await http.get("/api/v1/me/credentials", headers=bob)
        assert any(c["credential_id"] == theirs["credential_id"] and c.get("revoked_at") is None
                   for c in phones.json()), phones.text
        passes = await http.get("/api/v1/me/visitor-passes", headers=bob)
        assert any(p["pass_id"] == theirs["pass_id"] and p.get("revoked_at") is None
                   for p in passes.json()), passes.text
