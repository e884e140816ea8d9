"""Issue 11: a remote unlock or elevator call from the app is in the audit log before its
command leaves the gateway, on both databases, so no door opens that the log does not hold.

The API's publish callback stands in for the broker: at the moment the command would go
out, it reads the audit log through a connection of its own (what any other process, or
the gateway after a kill -9, would find).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from api.app import create_app
from api.context import ApiContext, JwtSettings
from api.routers import access as access_routes
from api.services import ApiServices
from gateway.access.audit import AuditLog, audit_log, verify
from gateway.access.decision import Reader
from gateway.access.service import AccessService
from gateway.config import SiteConfig
from gateway.metrics import Registry
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade
from gateway.store.users import Role, create_user

PASSWORD = "correct horse battery"
CONFIG = SiteConfig.model_validate({
    "site": {"id": "test"},
    "buildings": [{"id": "b1", "floors": [{"number": 1, "public": True}, {"number": 2},
                                          {"number": 5}]}],
    "devices": [{"device_id": "gate-north", "kind": "gate"},
                {"device_id": "elev-b1-1", "kind": "elevator", "building": "b1"}],
})
READERS = [Reader("gate-north", "gate"), Reader("elev-b1-1", "elevator", building_id="b1")]


@dataclass
class Sent:
    """What the broker was handed, each with the audit rows present at that moment."""

    engine: Engine
    commands: list[tuple[str, dict[str, object], list[tuple[str | None, bool, str]]]] = field(
        default_factory=list)

    async def publish(self, topic: str, payload: bytes) -> None:
        with self.engine.connect() as conn:
            rows = [(r.request_id, r.granted, r.action) for r in conn.execute(
                select(audit_log.c.request_id, audit_log.c.granted, audit_log.c.action)
                .order_by(audit_log.c.id))]
        self.commands.append((topic, json.loads(payload), rows))


@dataclass
class Api:
    http: httpx.AsyncClient
    sent: Sent
    audit: AuditLog
    engine: Engine


@pytest.fixture
async def api(database_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "One"), [
            d.Floor("b1", 1, "lobby", True), d.Floor("b1", 2), d.Floor("b1", 5)])
        d.create_unit(conn, "b1-0201", "b1", 2)
        d.create_resident(conn, "b1-0201", "Ann", "owner", resident_id="r-1")
        create_user(conn, "ann", PASSWORD, Role.RESIDENT, resident_id="r-1")
    observer = make_engine(database_url)  # another process's view of the store
    sent = Sent(observer)
    async with (
        AuditLog(engine, spill_dir=tmp_path / "spill", commit_timeout_s=30.0) as audit,
        AccessService(engine, READERS, poll_interval_s=60) as access,
    ):
        ctx = ApiContext(config=CONFIG, engine=engine,
                         jwt=JwtSettings(secrets.token_hex(32), "scgw-api", 600),
                         metrics=Registry(), publish=sent.publish,
                         services=ApiServices(access=access, audit=audit))
        transport = httpx.ASGITransport(app=create_app(ctx, [access_routes.router]))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield Api(http, sent, audit, engine)
    observer.dispose()
    engine.dispose()


async def test_remote_opens_are_in_the_audit_log_before_their_command_is_sent(api: Api) -> None:
    login = await api.http.post("/api/v1/auth/token",
                                data={"username": "ann", "password": PASSWORD})
    ann = {"Authorization": f"Bearer {login.json()['access_token']}"}
    unlock = await api.http.post("/api/v1/gates/gate-north/unlock", headers=ann)
    assert unlock.status_code == 202, unlock.text
    call = await api.http.post("/api/v1/elevators/elev-b1-1/call", headers=ann,
                               json={"floor": 2})
    assert call.status_code == 202, call.text
    refused = await api.http.post("/api/v1/elevators/elev-b1-1/call", headers=ann,
                                  json={"floor": 5})  # not her floor: nothing is sent
    assert refused.status_code == 403

    gate_id, lift_id = unlock.json()["command_id"], call.json()["command_id"]
    assert [(topic, body["command_id"], body["action"])
            for topic, body, _ in api.sent.commands] == [
        ("scgw/devices/gate-north/command", gate_id, "unlock"),
        ("scgw/devices/elev-b1-1/command", lift_id, "call_floor")]
    # When each command went out, its grant was already committed, seen from outside.
    (_, _, at_unlock), (_, _, at_call) = api.sent.commands
    assert (gate_id, True, "unlock") in at_unlock
    assert (lift_id, True, "enable_floors") in at_call

    await api.audit.flush()
    with api.engine.connect() as conn:
        rows = conn.execute(select(audit_log.c.device_id, audit_log.c.granted,
                                   audit_log.c.reason, audit_log.c.floors)
                            .order_by(audit_log.c.id)).all()
        assert verify(conn).ok
    assert rows == [("gate-north", True, None, None), ("elev-b1-1", True, None, "[2]"),
                    ("elev-b1-1", False, "not_permitted", None)]
