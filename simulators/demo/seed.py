"""The demo community's people: two buildings, residents on different floors, one login per
role, cards and phones. Passwords are random per run; nothing here is a default password.

`seed_community` adds the residents of a simulation scenario (simulators.simulate): their
units, their gate, elevator and canteen cards, an enrolled phone each and the opening
balance of their canteen purse, so the simulated crowd can use the gateway at once.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from gateway.canteen.ledger import Ledger
from gateway.config import SiteConfig
from gateway.store import directory as d
from gateway.store.directory import units
from gateway.store.users import Role, create_user
from simulators.phone import SimulatedPhone
from simulators.simulate.site import Resident


@dataclass(frozen=True)
class DemoResident:
    resident_id: str
    name: str
    building: str
    floor: int
    username: str
    password: str = field(repr=False)
    credential_id: str
    secret: bytes = field(repr=False)
    cards: dict[str, str]  # kind -> card number


@dataclass(frozen=True)
class DemoPeople:
    residents: list[DemoResident]
    logins: list[dict[str, Any]]  # demo.json "users"


_PEOPLE = [
    # (resident id, name, building, floor, unit, role, card serial)
    ("r-alice", "Alice Wang", "b1", 12, "b1-1201", "owner", "0001"),
    ("r-bob", "Bob Li", "b2", 7, "b2-0702", "tenant", "0002"),
    ("r-chen", "Chen Jie", "b1", 3, "b1-0301", "family", "0003"),
]


def sync_buildings(engine: Engine, config: SiteConfig) -> None:
    """The site file is the source of truth for buildings and floors."""
    with engine.begin() as conn:
        for building in config.buildings:
            d.upsert_building(
                conn,
                d.Building(building.id, building.name),
                [d.Floor(building.id, f.number, f.name, f.public) for f in building.floors],
            )


def _password() -> str:
    return secrets.token_urlsafe(12)


def seed_demo(engine: Engine, config: SiteConfig) -> DemoPeople:
    sync_buildings(engine, config)
    residents: list[DemoResident] = []
    logins: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for rid, name, building, floor, unit, role, serial in _PEOPLE:
            d.create_unit(conn, unit, building, floor)
            d.create_resident(conn, unit, name, role, resident_id=rid)
            cards = {kind: f"{kind[0].upper()}{building.upper()}{serial}" for kind in d.CARD_KINDS}
            for kind, number in cards.items():
                d.issue_card(conn, rid, kind, number)
            enrolled = d.enrol_phone_credential(conn, rid, label="demo phone")
            username = name.split()[0].lower()
            password = _password()
            create_user(conn, username, password, Role.RESIDENT, resident_id=rid)
            residents.append(
                DemoResident(
                    rid, name, building, floor, username, password,
                    enrolled.credential.credential_id, enrolled.secret, cards,
                )
            )
            logins.append(
                {"username": username, "password": password, "role": "resident",
                 "resident_id": rid}
            )
        for username, role in (("staff", Role.STAFF), ("engineer", Role.ENGINEER),
                               ("admin", Role.ADMIN)):
            password = _password()
            create_user(conn, username, password, role)
            logins.append({"username": username, "password": password, "role": role.value})
    return DemoPeople(residents, logins)


def seed_community(engine: Engine, config: SiteConfig, crowd: list[Resident],
                   opening_balance_cents: int) -> dict[str, SimulatedPhone]:
    """The scenario's residents in the store; returns each one's phone (resident id ->
    the phone app holding the enrolled credential)."""
    sync_buildings(engine, config)
    phones: dict[str, SimulatedPhone] = {}
    with engine.connect() as conn:
        existing = set(conn.execute(select(units.c.unit_id)).scalars())
    # a few residents per transaction: a running gateway writes to the same database, and
    # SQLite has one writer at a time
    for first in range(0, len(crowd), 8):
        with engine.begin() as conn:
            for r in crowd[first:first + 8]:
                if r.unit_id not in existing:
                    d.create_unit(conn, r.unit_id, r.building, r.floor)
                    existing.add(r.unit_id)
                d.create_resident(conn, r.unit_id, r.name, r.role, resident_id=r.resident_id)
                for kind, number in r.cards.items():
                    d.issue_card(conn, r.resident_id, kind, number)
                enrolled = d.enrol_phone_credential(conn, r.resident_id,
                                                    label="simulated phone")
                phones[r.resident_id] = SimulatedPhone(enrolled.credential.credential_id,
                                                       enrolled.secret)
    if opening_balance_cents > 0:
        ledger = Ledger(engine)
        for r in crowd:
            ledger.topup(r.resident_id, opening_balance_cents, f"opening-{r.resident_id}")
    return phones
