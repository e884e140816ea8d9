"""Users for a real site (issue 12 point 5): `scgw users` makes the first admin and manages
logins; the API manages users and roles, passwords and resident invitations; a password
change, a reset or disabling ends the user's sessions at once; the last admin stays."""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from typer.testing import CliRunner

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import users as users_router
from gateway.app.cli_users import app as users_cli
from gateway.config import SiteConfig
from gateway.metrics import Registry
from gateway.store import directory as d
from gateway.store import users as u
from gateway.store.db import make_engine, upgrade
from gateway.store.invitations import user_invitations

PASSWORD = "correct horse battery"
CONFIG = SiteConfig.model_validate({
    "site": {"id": "test"},
    "api": {"login_attempts_per_username": 4, "login_attempts_per_client": 30},
})
USER_KEYS = {"user_id", "username", "role", "resident_id", "disabled", "created_at"}


def _seed_directory(url: str) -> None:
    """Residents r-1..r-4 with no login (as imported), r-gone moved out, bob (r-2) a login."""
    engine = make_engine(url)
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "One"), [d.Floor("b1", 1), d.Floor("b1", 2)])
        d.create_unit(conn, "b1-0201", "b1", 2)
        for rid, name in (("r-1", "Ann"), ("r-2", "Bob"), ("r-3", "Cy"), ("r-4", "Di"),
                          ("r-gone", "Ed")):
            d.create_resident(conn, "b1-0201", name, "owner", resident_id=rid)
        d.move_out(conn, "r-gone")
    engine.dispose()


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Path:
    url = f"sqlite:///{tmp_path / 'site.db'}"
    upgrade(url)
    _seed_directory(url)
    config = tmp_path / "site.yaml"
    config.write_text(f"site: {{id: s}}\ndatabase: {{url: '{url}'}}\n")
    return config


def _cli(site: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(users_cli, [*args, "--config", str(site)], input=stdin,
                                env={"SCGW__DATABASE__URL": None})
    return result.exit_code, result.output


def _url(site: Path) -> str:
    return f"sqlite:///{site.parent / 'site.db'}"


def test_the_first_admin_comes_from_the_command_line(site: Path) -> None:
    code, out = _cli(site, "list")
    assert code == 0 and "no users yet" in out
    code, out = _cli(site, "add", "admin", "--role", "admin",
                     stdin="an admin password\nan admin password\n")
    assert code == 0, out
    assert "added admin (admin)" in out and "an admin password" not in out
    code, out = _cli(site, "list")
    assert code == 0 and out.startswith("admin\tadmin\t-\tenabled\t")
    engine = make_engine(_url(site))
    try:
        with engine.connect() as conn:
            assert u.authenticate(conn, "admin", "an admin password") is not None
    finally:
        engine.dispose()
    # Never on the command line: there is no option to put it there.
    code, out = _cli(site, "add", "eve", "--role", "staff", "--password", "a password here")
    assert code == 2 and "No such option" in out


def test_users_cli_refuses_clearly(site: Path) -> None:
    assert _cli(site, "add", "admin", "--role", "admin", "--generate")[0] == 0
    refusals = [
        (("add", "admin", "--role", "staff", "--generate"), "username 'admin' is taken"),
        (("add", "ADMIN", "--role", "staff", "--generate"), "taken (as 'admin')"),
        (("add", "x", "--role", "wizard", "--generate"), "role must be one of"),
        (("add", "ann", "--role", "resident", "--resident-id", "nope", "--generate"),
         "resident 'nope' does not exist"),
        (("add", "ed", "--role", "resident", "--resident-id", "r-gone", "--generate"),
         "resident 'r-gone' has moved out"),
        (("add", "ann", "--role", "resident", "--generate"), "a resident user needs a "
         "resident_id"),
        (("add", "sam", "--role", "staff", "--resident-id", "r-1", "--generate"),
         "a staff user has no resident_id"),
        (("add", "sam", "--role", "staff", "--generate", "--password-stdin"), "not both"),
        (("disable", "admin"), "'admin' is the last enabled admin"),
        (("disable", "nobody"), "user 'nobody' does not exist"),
        (("reset-password", "nobody", "--generate"), "user 'nobody' does not exist"),
    ]
    for args, message in refusals:
        code, out = _cli(site, *args)
        assert (code, message in out) == (2, True), (args, out)
    for password, message in (("too short", "at least 10 characters"),
                              ("samuel-the-staff", "must not be the username")):
        code, out = _cli(site, "add", "samuel-the-staff", "--role", "staff",
                         "--password-stdin", stdin=password + "\n")
        assert (code, message in out) == (2, True), out
    missing = CliRunner().invoke(users_cli, ["list", "--config", str(site.parent / "no.yaml")])
    assert missing.exit_code == 2 and "no.yaml" in missing.output


def test_resident_logins_resets_and_disabling_end_sessions(site: Path) -> None:
    code, out = _cli(site, "add", "ann", "--role", "resident", "--resident-id", "r-1",
                     "--generate")
    assert code == 0, out
    generated = out.split("password: ", 1)[1].split()[0]
    assert len(generated) >= 20
    code, out = _cli(site, "add", "ann2", "--role", "resident", "--resident-id", "r-1",
                     "--generate")
    assert code == 2 and "already has the login 'ann'" in out
    engine = make_engine(_url(site))
    try:
        with engine.connect() as conn:
            ann = u.authenticate(conn, "ann", generated)
            assert ann is not None and ann.resident_id == "r-1"
        code, out = _cli(site, "reset-password", "ann", "--password-stdin",
                         stdin="a brand new password\n")
        assert code == 0, out
        with engine.connect() as conn:
            assert u.authenticate(conn, "ann", generated) is None
            after = u.authenticate(conn, "ann", "a brand new password")
            assert after is not None
            # A session begun before the reset is over; one begun after it lives.
            assert u.get_user(conn, ann.user_id, ann.session_epoch) is None
            assert u.get_user(conn, ann.user_id, after.session_epoch) == after
        assert _cli(site, "disable", "ann")[0] == 0
        with engine.connect() as conn:
            assert u.get_user(conn, ann.user_id, after.session_epoch) is None
            assert u.authenticate(conn, "ann", "a brand new password") is None
        code, out = _cli(site, "enable", "ann")
        assert code == 0 and "ann enabled" in out
        with engine.connect() as conn:
            assert u.get_user(conn, ann.user_id, after.session_epoch) is None  # stays ended
            again = u.authenticate(conn, "ann", "a brand new password")
            assert again is not None and u.get_user(conn, ann.user_id,
                                                  again.session_epoch) == again
            assert u.find_user(conn, "ann").disabled is False
    finally:
        engine.dispose()


# --- the API ------------------------------------------------------------------------------


@dataclass
class Api:
    http: httpx.AsyncClient
    ctx: ApiContext
    app: FastAPI

    async def login(self, username: str, password: str = PASSWORD) -> httpx.Response:
        return await self.http.post("/api/v1/auth/token",
                                    data={"username": username, "password": password})

    async def accept(self, invitation: str, username: str, password: str = "a resident pw",
                     http: httpx.AsyncClient | None = None) -> httpx.Response:
        return await (http or self.http).post("/api/v1/invitations/accept", json={
            "invitation": invitation, "username": username, "password": password})

    async def headers(self, username: str, password: str = PASSWORD) -> dict[str, str]:
        answer = await self.login(username, password)
        assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {answer.json()['access_token']}"}


@functools.cache
def _password_hash() -> str:
    """One argon2 hash for every fixture user: each costs ~0.2 s of a loaded machine."""
    return u.hash_password(PASSWORD)


async def _no_publish(topic: str, payload: bytes) -> None:
    raise AssertionError("nothing here publishes")


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    upgrade(database_url)
    _seed_directory(database_url)
    engine = make_engine(database_url)
    hashed = _password_hash()
    with engine.begin() as conn:
        u.create_user(conn, "bob", PASSWORD, u.Role.RESIDENT, resident_id="r-2",
                    password_hash=hashed)
        for role in (u.Role.STAFF, u.Role.ENGINEER, u.Role.ADMIN):
            u.create_user(conn, role.value, PASSWORD, role, password_hash=hashed)
    ctx = ApiContext(config=CONFIG, engine=engine,
                     jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
                     metrics=Registry(), publish=_no_publish)
    app = create_app(ctx, [users_router.router])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://api") as http:
        yield Api(http, ctx, app)
    engine.dispose()


async def test_admin_manages_users_and_roles(api: Api) -> None:
    spec = api.app.openapi()  # every route of ours declares its answers
    ours = [(path, method, op) for path, ops in spec["paths"].items()
            for method, op in ops.items() if "users" in op.get("tags", [])]
    assert len(ours) == 7
    for path, method, op in ours:
        codes = set(op["responses"])
        assert "403" in codes and ("422" in codes) == (method != "get"), (method, path)
        assert ("401" in codes) == (path != "/api/v1/invitations/accept"), (method, path)
    admin, staff = await api.headers("admin"), await api.headers("staff")
    listed = await api.http.get("/api/v1/users", headers=admin)
    assert listed.status_code == 200
    assert {x["username"]: x["role"] for x in listed.json()} == {
        "admin": "admin", "bob": "resident", "engineer": "engineer", "staff": "staff"}
    assert all(set(x) == USER_KEYS for x in listed.json())
    assert (await api.http.get("/api/v1/users", headers=staff)).status_code == 403
    assert (await api.http.get("/api/v1/users")).status_code == 401

    new = {"username": "carol", "password": "carol's password", "role": "engineer"}
    created = await api.http.post("/api/v1/users", headers=admin, json=new)
    assert created.status_code == 201, created.text
    carol = created.json()
    assert set(carol) == USER_KEYS
    assert (carol["role"], carol["resident_id"], carol["disabled"]) == ("engineer", None, False)
    assert (await api.login("carol", "carol's password")).status_code == 200
    refused = [
        (new, 409, "username 'carol' is taken"),
        ({**new, "username": "dan", "password": "short"}, 422, "at least 10 characters"),
        ({**new, "username": "dan", "password": "DAN"}, 422, "at least 10"),
        ({**new, "username": "danny-boy-1", "password": "danny-boy-1"}, 422, "not be the"),
        ({**new, "username": "dan", "role": "resident"}, 422, "needs a resident_id"),
        ({**new, "username": "dan", "role": "resident", "resident_id": "r-404"}, 404,
         "resident 'r-404' does not exist"),
        ({**new, "username": "dan", "role": "resident", "resident_id": "r-gone"}, 409,
         "has moved out"),
        ({**new, "username": "dan", "role": "resident", "resident_id": "r-2"}, 409,
         "already has the login 'bob'"),
    ]
    for body, code, message in refused:
        answer = await api.http.post("/api/v1/users", headers=admin, json=body)
        assert (answer.status_code, message in answer.text) == (code, True), (body, answer.text)
    for body in ({**new, "role": "wizard"}, {**new, "username": "bad name"}):
        assert (await api.http.post("/api/v1/users", headers=admin, json=body)
                ).status_code == 422
    assert (await api.http.post("/api/v1/users", headers=staff, json=new)).status_code == 403

    path = f"/api/v1/users/{carol['user_id']}"
    promoted = await api.http.patch(path, headers=admin, json={"role": "staff"})
    assert promoted.status_code == 200 and promoted.json()["role"] == "staff"
    bob_id = next(x["user_id"] for x in listed.json() if x["username"] == "bob")
    assert (await api.http.patch(f"/api/v1/users/{bob_id}", headers=admin,
                                 json={"role": "staff"})).status_code == 422
    assert (await api.http.patch("/api/v1/users/u-nobody", headers=admin, json={})
            ).status_code == 404
    assert (await api.http.patch(path, headers=staff, json={"role": "admin"})
            ).status_code == 403


async def test_the_last_enabled_admin_stays(api: Api) -> None:
    admin = await api.headers("admin")
    me = next(x for x in (await api.http.get("/api/v1/users", headers=admin)).json()
              if x["username"] == "admin")
    path = f"/api/v1/users/{me['user_id']}"
    for change in ({"disabled": True}, {"role": "staff"}, {"role": "engineer",
                                                            "disabled": True}):
        answer = await api.http.patch(path, headers=admin, json=change)
        assert answer.status_code == 409, change
        assert answer.json() == {"detail": "'admin' is the last enabled admin; make another "
                                           "admin first"}
    other = await api.http.post("/api/v1/users", headers=admin, json={
        "username": "root2", "password": "another admin pw", "role": "admin"})
    assert other.status_code == 201
    demoted = await api.http.patch(path, headers=admin, json={"role": "staff"})
    assert demoted.status_code == 200 and demoted.json()["role"] == "staff"
    assert (await api.http.get("/api/v1/users", headers=admin)).status_code == 403
    root2 = await api.headers("root2", "another admin pw")
    answer = await api.http.patch(f"/api/v1/users/{other.json()['user_id']}", headers=root2,
                                  json={"disabled": True})
    assert answer.status_code == 409


async def test_password_changes_and_disabling_end_sessions_at_once(api: Api) -> None:
    admin, staff = await api.headers("admin"), await api.headers("staff")
    staff_id = next(x["user_id"] for x in (await api.http.get(
        "/api/v1/users", headers=admin)).json() if x["username"] == "staff")
    reset = await api.http.post(f"/api/v1/users/{staff_id}/password", headers=admin,
                                json={"password": "reset by admin"})
    assert reset.status_code == 204, reset.text
    me_password = "/api/v1/me/password"
    assert (await api.http.post(me_password, headers=staff, json={
        "current_password": "reset by admin", "new_password": "whatever else"})
            ).status_code == 401  # the session from before the reset is over
    assert (await api.login("staff")).status_code == 401
    staff = await api.headers("staff", "reset by admin")
    for body, code, message in (
        ({"current_password": "reset by admin", "new_password": "short"}, 422, "at least 10"),
        ({"current_password": "reset by admin", "new_password": "reset by admin"}, 422,
         "is the current one"),
        ({"current_password": "not my password", "new_password": "a new password"}, 403,
         "the current password is wrong"),
    ):
        answer = await api.http.post(me_password, headers=staff, json=body)
        assert (answer.status_code, message in answer.text) == (code, True), answer.text
    changed = await api.http.post(me_password, headers=staff, json={
        "current_password": "reset by admin", "new_password": "my own password"})
    assert changed.status_code == 204, changed.text
    assert (await api.http.post(me_password, headers=staff, json={
        "current_password": "my own password", "new_password": "yet another one"})
            ).status_code == 401  # this very session ended too
    staff = await api.headers("staff", "my own password")
    assert (await api.http.post(f"/api/v1/users/{staff_id}/password", headers=staff,
                                json={"password": "x" * 12})).status_code == 403

    disabled = await api.http.patch(f"/api/v1/users/{staff_id}", headers=admin,
                                    json={"disabled": True})
    assert disabled.status_code == 200 and disabled.json()["disabled"] is True
    assert (await api.http.post(me_password, headers=staff, json={})).status_code == 401
    assert (await api.login("staff", "my own password")).status_code == 401
    enabled = await api.http.patch(f"/api/v1/users/{staff_id}", headers=admin,
                                   json={"disabled": False})
    assert enabled.status_code == 200 and enabled.json()["disabled"] is False
    assert (await api.http.post(me_password, headers=staff, json={})).status_code == 401
    fresh = await api.headers("staff", "my own password")
    assert (await api.http.post(me_password, headers=fresh, json={})).status_code == 422


async def test_wrong_current_passwords_meet_the_sign_in_limits(api: Api) -> None:
    engineer = await api.headers("engineer")
    wrong = {"current_password": "not the password", "new_password": "a new password!"}
    codes = [(await api.http.post("/api/v1/me/password", headers=engineer, json=wrong)
              ).status_code for _ in range(5)]
    # 4 attempts per user name in the window (the successful sign-in cleared it).
    assert codes == [403, 403, 403, 403, 429]
    limited = await api.http.post("/api/v1/me/password", headers=engineer, json=wrong)
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await api.login("engineer")).status_code == 429  # the same user name's window


async def test_invitations_make_resident_logins_once(api: Api) -> None:
    staff, engineer = await api.headers("staff"), await api.headers("engineer")
    bob = await api.headers("bob")
    before = time.time()
    made = await api.http.post("/api/v1/residents/r-1/invitations", headers=staff)
    assert made.status_code == 201, made.text
    invitation = made.json()
    assert set(invitation) == {"invitation", "resident_id", "expires_at"}
    assert invitation["resident_id"] == "r-1"
    assert before + 72 * 3600 <= invitation["expires_at"] <= time.time() + 72 * 3600
    with api.ctx.engine.connect() as conn:  # only a hash of the secret is stored
        stored = [str(v) for row in conn.execute(select(user_invitations)) for v in row]
    secret = invitation["invitation"].split(".", 1)[1]
    assert not any(secret in value for value in stored)

    for headers, code in ((engineer, 403), (bob, 403), ({}, 401)):
        assert (await api.http.post("/api/v1/residents/r-1/invitations", headers=headers,
                                    json={})).status_code == code
    for path, body, code in (("r-404", {}, 404), ("r-gone", {}, 409), ("r-2", {}, 409),
                             ("r-1", {"ttl_s": 31 * 24 * 3600}, 422),
                             ("r-1", {"ttl_s": 0}, 422), ("bad id!", {}, 422)):
        answer = await api.http.post(f"/api/v1/residents/{path}/invitations", headers=staff,
                                     json=body)
        assert answer.status_code == code, (path, body, answer.text)

    text = invitation["invitation"]
    wrong = await api.accept(text[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB"),
                             "ann")
    assert (wrong.status_code, wrong.json()) == (403, {"detail": "the invitation is not valid"})
    taken = await api.accept(text, "Bob")
    assert taken.status_code == 409  # and the invitation is not spent by that
    ok = await api.accept(text, "ann")
    assert ok.status_code == 201, ok.text
    assert ok.json() == {"user_id": ok.json()["user_id"], "username": "ann",
                         "role": "resident", "resident_id": "r-1"}
    assert (await api.login("ann", "a resident pw")).status_code == 200
    again = await api.accept(text, "ann-again")
    assert (again.status_code, again.json()["detail"]) == (
        403, "the invitation has already been used")
    assert (await api.http.post("/api/v1/residents/r-1/invitations", headers=staff)
            ).status_code == 409  # r-1 has a login now


async def test_invitations_expire_and_die_with_a_move_out(api: Api) -> None:
    staff = await api.headers("staff")
    short = await api.http.post("/api/v1/residents/r-3/invitations", headers=staff,
                                json={"ttl_s": 60})
    assert short.status_code == 201 and short.json()["expires_at"] <= time.time() + 60
    with api.ctx.engine.begin() as conn:  # its minute has passed
        conn.execute(update(user_invitations).where(
            user_invitations.c.resident_id == "r-3").values(expires_at=time.time() - 1))
    expired = await api.accept(short.json()["invitation"], "cy")
    assert expired.status_code == 403
    assert expired.json()["detail"] == "the invitation has expired; ask the office for a new one"

    leaving = await api.http.post("/api/v1/residents/r-4/invitations", headers=staff)
    assert leaving.status_code == 201
    with api.ctx.engine.begin() as conn:
        d.move_out(conn, "r-4")
    moved = await api.accept(leaving.json()["invitation"], "di")
    assert (moved.status_code, moved.json()["detail"]) == (
        403, "the invitation is for a resident who has moved out")


async def test_an_invitation_works_once_under_concurrency(api: Api) -> None:
    staff = await api.headers("staff")
    made = await api.http.post("/api/v1/residents/r-3/invitations", headers=staff)
    text = made.json()["invitation"]
    answers = await asyncio.gather(*(api.accept(text, f"cy{i}") for i in range(3)))
    assert sorted(a.status_code for a in answers) == [201, 403, 403], [a.text for a in answers]


async def test_invitation_guesses_are_rate_limited_per_client(api: Api) -> None:
    def client(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://api")

    async with client("10.0.0.9") as guesser:
        codes = [(await api.accept(f"{secrets.token_hex(8)}.{secrets.token_urlsafe(24)}",
                                   "mallory", http=guesser)).status_code for _ in range(32)]
    assert codes == [403] * 30 + [429] * 2  # 30 attempts per client address
    async with client("10.0.0.10") as other:  # another address is not affected
        assert (await api.accept("junk", "mallory", http=other)).status_code == 403
