"""docs/app-integration.md, followed step by step against a running gateway and a real
Mosquitto: an imported resident is invited, creates a login, signs in, enrols the phone,
opens a gate with a QR computed by the document's own snippet (executed from the page, so
the page cannot drift from what the gateway accepts), unlocks remotely, reads the canteen
purse and changes the password."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiomqtt
import httpx

from simulators.demo.broker import Mosquitto
from simulators.readers import ReaderSimulator
from tests.community import running_gateway

DOC = Path(__file__).parents[1] / "docs" / "app-integration.md"
QrToken = Callable[..., str]


def _snippet() -> QrToken:
    """The phone-side reference code of the document, run as written."""
    found = re.search(r"```python\n(# scgw phone-side QR reference.*?)```", DOC.read_text(),
                      re.DOTALL)
    assert found is not None, "the QR snippet is missing from docs/app-integration.md"
    namespace: dict[str, Any] = {}
    exec(compile(found.group(1), str(DOC), "exec"), namespace)  # our own page
    return cast(QrToken, namespace["qr_token"])


def test_the_snippet_matches_the_published_test_vector() -> None:
    """docs/credentials.md's vector: the snippet computes the gateway's exact bytes."""
    qr_token = _snippet()
    secret_hex = bytes(range(32)).hex()
    assert qr_token("0123456789abcdef", secret_hex, now=1763800000.0,
                    nonce=bytes.fromhex("a1b2c3d4")) == (
        "SC1.AQEjRWeJq83vA4EddaGyw9TOG2sB3WEVaouR9_svkU76")
    assert qr_token("0123456789abcdef", secret_hex, now=1763800029.9,
                    nonce=bytes.fromhex("a1b2c3d4")) == (
        "SC1.AQEjRWeJq83vA4EddqGyw9Rk5xdfbAofw-aY2U5B54MJ")


def _ok(answer: httpx.Response, code: int) -> Any:
    assert answer.status_code == code, (answer.request.method, answer.request.url, answer.text)
    return answer.json() if answer.content else None


async def test_the_documented_phone_flow_opens_a_gate(mosquitto: Mosquitto,
                                                      tmp_path: Path) -> None:
    qr_token = _snippet()
    async with running_gateway(mosquitto, tmp_path) as run, httpx.AsyncClient(
            base_url=run.api, timeout=30) as http:
        staff_login = run.login("staff")
        staff_token = _ok(await http.post("/api/v1/auth/token", data={
            "username": staff_login["username"], "password": staff_login["password"]}), 200)
        staff = {"Authorization": f"Bearer {staff_token['access_token']}"}
        # The office: a resident imported without a login, and an invitation for them.
        resident = _ok(await http.post("/api/v1/residents", headers=staff, json={
            "unit_id": "b1-1201", "name": "Dora Fang", "role": "family"}), 201)
        rid = resident["resident_id"]
        invited = _ok(await http.post(f"/api/v1/residents/{rid}/invitations", headers=staff,
                                      json={"ttl_s": 72 * 3600}), 201)
        assert invited["resident_id"] == rid

        # 1. The app accepts the invitation.
        accepted = _ok(await http.post("/api/v1/invitations/accept", json={
            "invitation": invited["invitation"], "username": "dora",
            "password": "tea-garden-42"}), 201)
        assert accepted == {"user_id": accepted["user_id"], "username": "dora",
                            "role": "resident", "resident_id": rid}
        # 2. Sign in.
        token = _ok(await http.post("/api/v1/auth/token", data={
            "username": "dora", "password": "tea-garden-42"}), 200)
        assert (token["token_type"], token["role"]) == ("bearer", "resident")
        me = {"Authorization": f"Bearer {token['access_token']}"}
        # 3. Enrol the phone: id and secret go to the keystore.
        enrolled = _ok(await http.post("/api/v1/me/credentials", headers=me,
                                       json={"label": "Dora's phone"}), 201)
        assert re.fullmatch(r"[0-9a-f]{16}", enrolled["credential_id"])
        assert re.fullmatch(r"[0-9a-f]{64}", enrolled["secret_hex"])
        listed = _ok(await http.get("/api/v1/me/credentials", headers=me), 200)
        assert [c["credential_id"] for c in listed] == [enrolled["credential_id"]]
        assert "secret_hex" not in listed[0]

        # 4. The first QR, computed on the phone, offline; a gate reader presents it.
        qr = qr_token(enrolled["credential_id"], enrolled["secret_hex"])
        async with (
            ReaderSimulator(mosquitto.host, mosquitto.port, "gate-north", "gate",
                            run.root) as gate,
            aiomqtt.Client(mosquitto.host, mosquitto.port) as observer,
        ):
            decision = await gate.present("qr", qr)
            assert (decision["granted"], decision["action"], decision["reason"]) == (
                True, "unlock", None)
            assert [a.action for a in gate.actuations] == ["unlock"]
            again = await gate.present("qr", qr)  # single use
            assert (again["granted"], again["reason"]) == (False, "replayed_token")

            # 5. Remote unlock from the app.
            await observer.subscribe(f"{run.root}/devices/gate-south/command")
            unlock = _ok(await http.post("/api/v1/gates/gate-south/unlock", headers=me), 202)
            async with asyncio.timeout(20):
                async for message in observer.messages:
                    assert isinstance(message.payload, bytes)
                    command = json.loads(message.payload)
                    assert (command["action"], command["command_id"]) == (
                        "unlock", unlock["command_id"])
                    break

        # 6. The canteen purse, after the office took 50.00 in cash.
        _ok(await http.post(f"/api/v1/canteen/accounts/{rid}/topup", headers=staff, json={
            "amount_cents": 5000, "idempotency_key": "dora-first-topup"}), 201)
        purse = _ok(await http.get("/api/v1/me/canteen", headers=me), 200)
        assert purse["balance_cents"] == 5000
        assert [(t["kind"], t["amount_cents"]) for t in purse["transactions"]] == [
            ("topup", 5000)]

        # 7. Change the password: every session ends, this one too; sign in again.
        _ok(await http.post("/api/v1/me/password", headers=me, json={
            "current_password": "tea-garden-42", "new_password": "plum-rain-1987"}), 204)
        assert (await http.get("/api/v1/me/canteen", headers=me)).status_code == 401
        assert (await http.post("/api/v1/auth/token", data={
            "username": "dora", "password": "tea-garden-42"})).status_code == 401
        _ok(await http.post("/api/v1/auth/token", data={
            "username": "dora", "password": "plum-rain-1987"}), 200)
