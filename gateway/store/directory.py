"""The directory: who lives where, which cards and phones they carry, what they may open.

This is the one module other code imports; the tables and types are in
`directory_schema`, groups and visitor passes in `directory_grants`, the snapshot and change
sets gateways read in `directory_snapshot`, all re-exported here.

Residents are never deleted (audit entries refer to them); they move out, which revokes
every card, phone credential and visitor pass they hold in the same transaction. Revoking
is final: a revoked card number or credential id never becomes valid again, so a lost card
that turns up cannot silently come back. Every write also appends to `directory_changes`,
whose growing id is what gateways poll to notice that their access index is stale, also
when another process wrote.

Repository functions run inside the caller's transaction, validate their input, and raise
`NotFound` / `Conflict` / `DirectoryError` (a ValueError) so the API can answer 404 / 409 /
422 and the importer can report the row. Creating something that already exists with the
same content returns it unchanged (no write), so a re-import changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from device_drivers.tokens import new_credential_id, new_secret
from gateway.store.directory_grants import (
    MAX_PASS_USES,
    MAX_VISIT_S,
    add_group_member,
    create_access_group,
    delete_access_group,
    get_access_group,
    get_visitor_pass,
    issue_visitor_pass,
    list_access_groups,
    list_visitor_passes,
    load_access_groups,
    load_visitor_passes,
    record_visitor_pass_uses,
    remove_group_member,
    revoke_visitor_pass,
    update_access_group,
)
from gateway.store.directory_schema import (
    ALL_PARTS,
    CARD_KINDS,
    CHANGE_PARTS,
    RESIDENT_ROLES,
    AccessGroup,
    Building,
    Card,
    CardKind,
    Conflict,
    DirectoryError,
    EnrolledCredential,
    Floor,
    IssuedVisitorPass,
    NotFound,
    PhoneCredential,
    Resident,
    ResidentRole,
    ScheduleWindow,
    SnapshotPart,
    Unit,
    VisitorPass,
    access_group_floors,
    access_group_gates,
    access_group_members,
    access_group_windows,
    access_groups,
    buildings,
    bump,
    cards,
    directory_changes,
    directory_version,
    fetch_one,
    floors,
    new_id,
    phone_credentials,
    require_active_resident,
    require_floors,
    residents,
    units,
    valid_id,
    valid_text,
    visitor_pass_gates,
    visitor_passes,
)
from gateway.store.directory_schema import CARD_NUMBER_PATTERN as _CARD_NUMBER_PATTERN
from gateway.store.directory_snapshot import (
    MAX_ROW_CHANGES,
    ChangeSet,
    DirectoryDelta,
    DirectorySnapshot,
    load_delta,
    load_snapshot,
    pending_changes,
)

__all__ = [
    "ALL_PARTS",
    "CARD_KINDS",
    "CHANGE_PARTS",
    "MAX_PASS_USES",
    "MAX_ROW_CHANGES",
    "MAX_VISIT_S",
    "RESIDENT_ROLES",
    "AccessGroup",
    "Building",
    "Card",
    "CardKind",
    "ChangeSet",
    "Conflict",
    "DirectoryDelta",
    "DirectoryError",
    "DirectorySnapshot",
    "EnrolledCredential",
    "Floor",
    "IssuedVisitorPass",
    "NotFound",
    "PhoneCredential",
    "Resident",
    "ResidentRole",
    "ScheduleWindow",
    "SnapshotPart",
    "Unit",
    "VisitorPass",
    "access_group_floors",
    "access_group_gates",
    "access_group_members",
    "access_group_windows",
    "access_groups",
    "add_group_member",
    "buildings",
    "bump",
    "cards",
    "create_access_group",
    "create_resident",
    "create_unit",
    "delete_access_group",
    "directory_changes",
    "directory_version",
    "enrol_phone_credential",
    "floors",
    "get_access_group",
    "get_card",
    "get_phone_credential",
    "get_resident",
    "get_unit",
    "get_visitor_pass",
    "issue_card",
    "issue_visitor_pass",
    "list_access_groups",
    "list_buildings",
    "list_cards",
    "list_floors",
    "list_phone_credentials",
    "list_residents",
    "list_units",
    "list_visitor_passes",
    "load_access_groups",
    "load_delta",
    "load_snapshot",
    "load_visitor_passes",
    "move_out",
    "move_resident",
    "pending_changes",
    "phone_credentials",
    "record_visitor_pass_uses",
    "remove_group_member",
    "residents",
    "revoke_card",
    "revoke_phone_credential",
    "revoke_visitor_pass",
    "units",
    "update_access_group",
    "update_resident",
    "upsert_building",
    "visitor_pass_gates",
    "visitor_passes",
]


# --- buildings, floors, units -------------------------------------------------------------


def upsert_building(conn: Connection, building: Building, building_floors: Iterable[Floor]) -> bool:
    """Make the building and these floors exist as given; floors not listed are kept.

    Used to mirror the site configuration at start-up; True when anything changed.
    """
    valid_id("building_id", building.building_id)
    valid_text("building name", building.name, 128, allow_empty=True)
    changed = False
    stored = conn.execute(select(buildings).where(buildings.c.building_id == building.building_id)
                          ).mappings().first()
    if stored is None:
        conn.execute(insert(buildings).values(building_id=building.building_id, name=building.name))
        changed = True
    elif stored["name"] != building.name:
        conn.execute(update(buildings).where(buildings.c.building_id == building.building_id)
                     .values(name=building.name))
        changed = True
    existing = {f.number: f for f in list_floors(conn, building.building_id)}
    for floor in building_floors:
        if floor.building_id != building.building_id:
            raise DirectoryError(f"floor {floor.number} names building {floor.building_id!r}")
        valid_text("floor label", floor.label, 64, allow_empty=True)
        if floor.number not in existing:
            conn.execute(insert(floors).values(building_id=floor.building_id, number=floor.number,
                                               label=floor.label, public=floor.public))
            changed = True
        elif existing[floor.number] != floor:
            conn.execute(update(floors).where(floors.c.building_id == floor.building_id,
                                              floors.c.number == floor.number)
                         .values(label=floor.label, public=floor.public))
            changed = True
    if changed:
        bump(conn, "building.upsert")
    return changed


def list_buildings(conn: Connection) -> list[Building]:
    rows = conn.execute(select(buildings).order_by(buildings.c.building_id)).mappings()
    return [Building(**row) for row in rows]


def list_floors(conn: Connection, building_id: str | None = None) -> list[Floor]:
    query = select(floors).order_by(floors.c.building_id, floors.c.number)
    if building_id is not None:
        query = query.where(floors.c.building_id == building_id)
    return [Floor(**row) for row in conn.execute(query).mappings()]


def create_unit(conn: Connection, unit_id: str, building_id: str, floor: int,
                label: str = "") -> Unit:
    unit = Unit(valid_id("unit_id", unit_id), building_id, floor,
                valid_text("unit label", label, 64, allow_empty=True))
    try:
        stored = get_unit(conn, unit_id)
    except NotFound:
        require_floors(conn, [(building_id, floor)])
        conn.execute(insert(units).values(unit_id=unit_id, building_id=building_id, floor=floor,
                                          label=unit.label))
        bump(conn, "unit.create")
        return unit
    if stored != unit:
        raise Conflict(f"unit {unit_id!r} exists with different details: {stored}")
    return stored


def get_unit(conn: Connection, unit_id: str) -> Unit:
    return fetch_one(conn, units, Unit, "unit", unit_id=unit_id)


def list_units(conn: Connection, building_id: str | None = None) -> list[Unit]:
    query = select(units).order_by(units.c.unit_id)
    if building_id is not None:
        query = query.where(units.c.building_id == building_id)
    return [Unit(**row) for row in conn.execute(query).mappings()]


# --- residents ------------------------------------------------------------------------------


def create_resident(conn: Connection, unit_id: str, name: str, role: str,
                    resident_id: str | None = None, now: float | None = None) -> Resident:
    if role not in RESIDENT_ROLES:
        raise DirectoryError(f"role must be one of {', '.join(RESIDENT_ROLES)}, got {role!r}")
    name = valid_text("name", name, 128)
    get_unit(conn, unit_id)
    if resident_id is not None:
        valid_id("resident_id", resident_id)
        try:
            stored = get_resident(conn, resident_id)
        except NotFound:
            pass
        else:
            if (stored.unit_id, stored.name, stored.role) != (unit_id, name, role):
                raise Conflict(f"resident {resident_id!r} exists with different details")
            return stored
    resident = Resident(resident_id or new_id("r"), unit_id, name, role,
                        time.time() if now is None else now)
    conn.execute(insert(residents).values(
        resident_id=resident.resident_id, unit_id=unit_id, name=name, role=role,
        created_at=resident.created_at, moved_out_at=None))
    bump(conn, "resident.create")
    return resident


def get_resident(conn: Connection, resident_id: str) -> Resident:
    return fetch_one(conn, residents, Resident, "resident", resident_id=resident_id)


def list_residents(conn: Connection, unit_id: str | None = None,
                   include_moved_out: bool = False) -> list[Resident]:
    query = select(residents).order_by(residents.c.resident_id)
    if unit_id is not None:
        query = query.where(residents.c.unit_id == unit_id)
    if not include_moved_out:
        query = query.where(residents.c.moved_out_at.is_(None))
    return [Resident(**row) for row in conn.execute(query).mappings()]


def update_resident(conn: Connection, resident_id: str, *, name: str | None = None,
                    role: str | None = None, unit_id: str | None = None) -> Resident:
    """Change details; a new unit_id is a move within the site (new home floor at once)."""
    resident = require_active_resident(conn, resident_id)
    values: dict[str, Any] = {}
    if name is not None and name != resident.name:
        values["name"] = valid_text("name", name, 128)
    if role is not None and role != resident.role:
        if role not in RESIDENT_ROLES:
            raise DirectoryError(f"role must be one of {', '.join(RESIDENT_ROLES)}, got {role!r}")
        values["role"] = role
    if unit_id is not None and unit_id != resident.unit_id:
        values["unit_id"] = get_unit(conn, unit_id).unit_id
    if not values:
        return resident
    conn.execute(update(residents).where(residents.c.resident_id == resident_id).values(**values))
    bump(conn, "resident.update")
    return get_resident(conn, resident_id)


def move_resident(conn: Connection, resident_id: str, unit_id: str) -> Resident:
    return update_resident(conn, resident_id, unit_id=unit_id)


def move_out(conn: Connection, resident_id: str, now: float | None = None) -> Resident:
    """Revoke everything the resident holds at once: cards, phones, passes they issued."""
    require_active_resident(conn, resident_id)
    now = time.time() if now is None else now
    conn.execute(update(residents).where(residents.c.resident_id == resident_id)
                 .values(moved_out_at=now))
    for table, owner in ((cards, cards.c.resident_id),
                         (phone_credentials, phone_credentials.c.resident_id),
                         (visitor_passes, visitor_passes.c.issued_by)):
        conn.execute(update(table).where(owner == resident_id, table.c.revoked_at.is_(None))
                     .values(revoked_at=now))
    conn.execute(delete(access_group_members)
                 .where(access_group_members.c.resident_id == resident_id))
    bump(conn, "resident.move_out", resident_id)
    return get_resident(conn, resident_id)


# --- cards and phone credentials ----------------------------------------------------------


def issue_card(conn: Connection, resident_id: str, kind: str, card_number: str,
               now: float | None = None) -> Card:
    if kind not in CARD_KINDS:
        raise DirectoryError(f"card kind must be one of {', '.join(CARD_KINDS)}, got {kind!r}")
    if not isinstance(card_number, str) or not _CARD_NUMBER_PATTERN.match(card_number):
        raise DirectoryError(f"card number must be 1-64 printable characters, got {card_number!r}")
    require_active_resident(conn, resident_id)
    try:
        stored = get_card(conn, kind, card_number)
    except NotFound:
        card = Card(kind, card_number, resident_id, time.time() if now is None else now)
        conn.execute(insert(cards).values(kind=kind, card_number=card_number,
                                          resident_id=resident_id, issued_at=card.issued_at,
                                          revoked_at=None))
        bump(conn, "card.issue", f"{kind}:{card_number}")
        return card
    if stored.revoked_at is not None:
        raise Conflict(f"{kind} card {card_number!r} was revoked; a revoked card is never reissued")
    if stored.resident_id != resident_id:
        raise Conflict(f"{kind} card {card_number!r} belongs to another resident")
    return stored


def get_card(conn: Connection, kind: str, card_number: str) -> Card:
    return fetch_one(conn, cards, Card, f"{kind} card", kind=kind, card_number=card_number)


def list_cards(conn: Connection, resident_id: str) -> list[Card]:
    query = select(cards).where(cards.c.resident_id == resident_id).order_by(
        cards.c.kind, cards.c.card_number)
    return [Card(**row) for row in conn.execute(query).mappings()]


def revoke_card(conn: Connection, kind: str, card_number: str, now: float | None = None) -> Card:
    """A lost card: only this card stops working; revoking twice keeps the first time."""
    card = get_card(conn, kind, card_number)
    if card.revoked_at is not None:
        return card
    conn.execute(update(cards).where(cards.c.kind == kind, cards.c.card_number == card_number)
                 .values(revoked_at=time.time() if now is None else now))
    bump(conn, "card.revoke", f"{kind}:{card_number}")
    return get_card(conn, kind, card_number)


def enrol_phone_credential(conn: Connection, resident_id: str, label: str = "phone",
                           now: float | None = None) -> EnrolledCredential:
    require_active_resident(conn, resident_id)
    credential = PhoneCredential(new_credential_id(), resident_id,
                                 valid_text("label", label, 64),
                                 time.time() if now is None else now)
    secret = new_secret()
    conn.execute(insert(phone_credentials).values(
        credential_id=credential.credential_id, resident_id=resident_id, secret=secret,
        label=credential.label, enrolled_at=credential.enrolled_at, revoked_at=None))
    bump(conn, "credential.enrol", credential.credential_id)
    return EnrolledCredential(credential, secret)


def get_phone_credential(conn: Connection, credential_id: str) -> PhoneCredential:
    return fetch_one(conn, phone_credentials, PhoneCredential, "credential",
                credential_id=credential_id)


def list_phone_credentials(conn: Connection, resident_id: str) -> list[PhoneCredential]:
    query = select(*[c for c in phone_credentials.c if c.name != "secret"]).where(
        phone_credentials.c.resident_id == resident_id).order_by(phone_credentials.c.enrolled_at)
    return [PhoneCredential(**row) for row in conn.execute(query).mappings()]


def revoke_phone_credential(conn: Connection, credential_id: str,
                            now: float | None = None) -> PhoneCredential:
    """A lost phone: only this credential stops working; the resident's others keep going."""
    credential = get_phone_credential(conn, credential_id)
    if credential.revoked_at is not None:
        return credential
    conn.execute(update(phone_credentials)
                 .where(phone_credentials.c.credential_id == credential_id)
                 .values(revoked_at=time.time() if now is None else now))
    bump(conn, "credential.revoke", credential_id)
    return get_phone_credential(conn, credential_id)
