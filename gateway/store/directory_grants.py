"""Directory rights beyond a resident's home: access groups and visitor passes.

Import these through `gateway.store.directory`; they live here to keep files short.
A group's rights apply only during its weekly windows (no windows = always). A visitor
pass is a delegation: the decision never lets it exceed what its issuer holds at that
moment, so the repository only checks that what it names exists.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Connection, delete, insert, select, update

from device_drivers.tokens import new_credential_id, new_secret
from gateway.store.directory_schema import (
    AccessGroup,
    Conflict,
    DirectoryError,
    IssuedVisitorPass,
    NotFound,
    ScheduleWindow,
    VisitorPass,
    access_group_floors,
    access_group_gates,
    access_group_members,
    access_group_windows,
    access_groups,
    bump,
    new_id,
    require_active_resident,
    require_floors,
    valid_id,
    valid_text,
    visitor_pass_gates,
    visitor_passes,
)

MAX_VISIT_S = 7 * 24 * 3600
MAX_PASS_USES = 100


# --- access groups ------------------------------------------------------------------------


def load_access_groups(conn: Connection, group_id: str | None = None) -> list[AccessGroup]:
    """Groups with their gates, floors, windows and members, in five queries in all."""
    only: dict[str, Any] = {} if group_id is None else {"group_id": group_id}

    def rows(table: Any, *cols: Any) -> dict[str, list[Any]]:
        query = select(table.c.group_id, *cols).order_by(table.c.group_id, *cols)
        for name, value in only.items():
            query = query.where(table.c[name] == value)
        grouped: dict[str, list[Any]] = defaultdict(list)
        for row in conn.execute(query):
            grouped[row[0]].append(tuple(row[1:]) if len(row) > 2 else row[1])
        return grouped

    gates = rows(access_group_gates, access_group_gates.c.gate_id)
    group_floors = rows(access_group_floors, access_group_floors.c.building_id,
                        access_group_floors.c.floor)
    windows = rows(access_group_windows, access_group_windows.c.weekday,
                   access_group_windows.c.start_minute, access_group_windows.c.end_minute)
    members = rows(access_group_members, access_group_members.c.resident_id)
    query = select(access_groups).order_by(access_groups.c.group_id)
    if group_id is not None:
        query = query.where(access_groups.c.group_id == group_id)
    return [
        AccessGroup(
            group_id=row.group_id,
            name=row.name,
            gate_ids=tuple(gates.get(row.group_id, ())),
            floors=tuple(group_floors.get(row.group_id, ())),
            windows=tuple(ScheduleWindow(*w) for w in windows.get(row.group_id, ())),
            member_ids=tuple(members.get(row.group_id, ())),
        )
        for row in conn.execute(query)
    ]


def get_access_group(conn: Connection, group_id: str) -> AccessGroup:
    found = load_access_groups(conn, group_id)
    if not found:
        raise NotFound(f"access group {group_id!r} does not exist")
    return found[0]


def list_access_groups(conn: Connection, resident_id: str | None = None) -> list[AccessGroup]:
    groups = load_access_groups(conn)
    if resident_id is None:
        return groups
    return [g for g in groups if resident_id in g.member_ids]


def _replace_rights(conn: Connection, group_id: str, gate_ids: Iterable[str] | None,
                    group_floors: Iterable[tuple[str, int]] | None,
                    windows: Iterable[ScheduleWindow] | None) -> None:
    if gate_ids is not None:
        wanted_gates = sorted({valid_id("gate_id", g) for g in gate_ids})
        conn.execute(delete(access_group_gates).where(access_group_gates.c.group_id == group_id))
        if wanted_gates:
            conn.execute(insert(access_group_gates),
                         [{"group_id": group_id, "gate_id": g} for g in wanted_gates])
    if group_floors is not None:
        wanted_floors = sorted({(b, int(n)) for b, n in group_floors})
        require_floors(conn, wanted_floors)
        conn.execute(delete(access_group_floors).where(access_group_floors.c.group_id == group_id))
        if wanted_floors:
            conn.execute(insert(access_group_floors), [
                {"group_id": group_id, "building_id": b, "floor": n} for b, n in wanted_floors])
    if windows is not None:
        wanted_windows = sorted(set(windows), key=lambda w: (w.weekday, w.start_minute))
        starts = [(w.weekday, w.start_minute) for w in wanted_windows]
        if len(starts) != len(set(starts)):
            raise DirectoryError("two windows start at the same weekday and minute")
        conn.execute(delete(access_group_windows)
                     .where(access_group_windows.c.group_id == group_id))
        if wanted_windows:
            conn.execute(insert(access_group_windows), [
                {"group_id": group_id, "weekday": w.weekday, "start_minute": w.start_minute,
                 "end_minute": w.end_minute} for w in wanted_windows])


def create_access_group(
    conn: Connection,
    name: str,
    *,
    gate_ids: Iterable[str] = (),
    floors: Iterable[tuple[str, int]] = (),
    windows: Iterable[ScheduleWindow] = (),
    group_id: str | None = None,
) -> AccessGroup:
    name = valid_text("group name", name, 128)
    group_id = valid_id("group_id", group_id) if group_id is not None else new_id("g")
    taken = conn.execute(select(access_groups.c.group_id)
                         .where(access_groups.c.name == name)).first()
    if taken is not None:
        raise Conflict(f"an access group named {name!r} exists ({taken.group_id})")
    if conn.execute(select(access_groups.c.group_id)
                    .where(access_groups.c.group_id == group_id)).first() is not None:
        raise Conflict(f"access group {group_id!r} exists")
    conn.execute(insert(access_groups).values(group_id=group_id, name=name))
    _replace_rights(conn, group_id, gate_ids, floors, windows)
    bump(conn, "group.create")
    return get_access_group(conn, group_id)


def update_access_group(
    conn: Connection,
    group_id: str,
    *,
    name: str | None = None,
    gate_ids: Iterable[str] | None = None,
    floors: Iterable[tuple[str, int]] | None = None,
    windows: Iterable[ScheduleWindow] | None = None,
) -> AccessGroup:
    """Replace the given parts (None keeps a part as it is)."""
    get_access_group(conn, group_id)
    if name is not None:
        name = valid_text("group name", name, 128)
        taken = conn.execute(select(access_groups.c.group_id).where(
            access_groups.c.name == name, access_groups.c.group_id != group_id)).first()
        if taken is not None:
            raise Conflict(f"an access group named {name!r} exists ({taken.group_id})")
        conn.execute(update(access_groups).where(access_groups.c.group_id == group_id)
                     .values(name=name))
    _replace_rights(conn, group_id, gate_ids, floors, windows)
    bump(conn, "group.update")
    return get_access_group(conn, group_id)


def delete_access_group(conn: Connection, group_id: str) -> None:
    get_access_group(conn, group_id)
    for table in (access_group_gates, access_group_floors, access_group_windows,
                  access_group_members, access_groups):
        conn.execute(delete(table).where(table.c.group_id == group_id))
    bump(conn, "group.delete")


def add_group_member(conn: Connection, group_id: str, resident_id: str) -> AccessGroup:
    group = get_access_group(conn, group_id)
    require_active_resident(conn, resident_id)
    if resident_id in group.member_ids:
        return group
    conn.execute(insert(access_group_members).values(group_id=group_id, resident_id=resident_id))
    bump(conn, "group.add_member")
    return get_access_group(conn, group_id)


def remove_group_member(conn: Connection, group_id: str, resident_id: str) -> AccessGroup:
    group = get_access_group(conn, group_id)
    if resident_id not in group.member_ids:
        return group
    conn.execute(delete(access_group_members).where(
        access_group_members.c.group_id == group_id,
        access_group_members.c.resident_id == resident_id))
    bump(conn, "group.remove_member")
    return get_access_group(conn, group_id)


# --- visitor passes -----------------------------------------------------------------------


def load_visitor_passes(conn: Connection, *where: ColumnElement[bool]) -> list[VisitorPass]:
    gates: dict[str, list[str]] = defaultdict(list)
    gate_query = select(visitor_pass_gates).order_by(visitor_pass_gates.c.gate_id)
    if where:
        gate_query = gate_query.where(visitor_pass_gates.c.pass_id.in_(
            select(visitor_passes.c.pass_id).where(*where)))
    for pass_id, gate_id in conn.execute(gate_query):
        gates[pass_id].append(gate_id)
    columns = [c for c in visitor_passes.c if c.name != "secret"]
    query = select(*columns).where(*where).order_by(visitor_passes.c.created_at,
                                                    visitor_passes.c.pass_id)
    return [VisitorPass(**row, gate_ids=tuple(gates.get(row["pass_id"], ())))
            for row in conn.execute(query).mappings()]


def get_visitor_pass(conn: Connection, pass_id: str) -> VisitorPass:
    found = load_visitor_passes(conn, visitor_passes.c.pass_id == pass_id)
    if not found:
        raise NotFound(f"visitor pass {pass_id!r} does not exist")
    return found[0]


def list_visitor_passes(conn: Connection, issued_by: str | None = None) -> list[VisitorPass]:
    if issued_by is None:
        return load_visitor_passes(conn)
    return load_visitor_passes(conn, visitor_passes.c.issued_by == issued_by)


def issue_visitor_pass(
    conn: Connection,
    issued_by: str,
    visitor_name: str,
    valid_from: float,
    valid_until: float,
    *,
    gate_ids: Iterable[str] = (),
    building_id: str | None = None,
    floor: int | None = None,
    max_uses: int = 4,
    now: float | None = None,
) -> IssuedVisitorPass:
    """A pass for one visit; the secret is returned once, to mint the visitor's QR codes."""
    require_active_resident(conn, issued_by)
    visitor_name = valid_text("visitor name", visitor_name, 128)
    if not valid_from < valid_until <= valid_from + MAX_VISIT_S:
        raise DirectoryError("a pass needs valid_from < valid_until, at most 7 days apart")
    if not 1 <= max_uses <= MAX_PASS_USES:
        raise DirectoryError(f"max_uses must be 1 to {MAX_PASS_USES}, got {max_uses}")
    if (building_id is None) != (floor is None):
        raise DirectoryError("give both building_id and floor, or neither (gates only)")
    if building_id is not None and floor is not None:
        require_floors(conn, [(building_id, floor)])
    gates = sorted({valid_id("gate_id", g) for g in gate_ids})
    secret = new_secret()
    visitor_pass = VisitorPass(
        pass_id=new_id("v"), issued_by=issued_by, visitor_name=visitor_name,
        credential_id=new_credential_id(), building_id=building_id, floor=floor,
        valid_from=float(valid_from), valid_until=float(valid_until), max_uses=max_uses, uses=0,
        created_at=time.time() if now is None else now, gate_ids=tuple(gates))
    values = {c.name: getattr(visitor_pass, c.name) for c in visitor_passes.c
              if c.name != "secret"}
    conn.execute(insert(visitor_passes).values(**values, secret=secret))
    if gates:
        conn.execute(insert(visitor_pass_gates),
                     [{"pass_id": visitor_pass.pass_id, "gate_id": g} for g in gates])
    bump(conn, "visitor_pass.issue")
    return IssuedVisitorPass(visitor_pass, secret)


def revoke_visitor_pass(conn: Connection, pass_id: str, now: float | None = None) -> VisitorPass:
    visitor_pass = get_visitor_pass(conn, pass_id)
    if visitor_pass.revoked_at is not None:
        return visitor_pass
    conn.execute(update(visitor_passes).where(visitor_passes.c.pass_id == pass_id)
                 .values(revoked_at=time.time() if now is None else now))
    bump(conn, "visitor_pass.revoke")
    return get_visitor_pass(conn, pass_id)


def record_visitor_pass_uses(conn: Connection, uses: Mapping[str, int]) -> None:
    """Persist use counts counted by a gateway; counts only grow, so replays are harmless.

    No directory change is recorded: a use is not a rights change, and a rebuild per
    visitor at the gate would waste the gateway's CPU.
    """
    for pass_id, count in uses.items():
        conn.execute(update(visitor_passes).where(
            visitor_passes.c.pass_id == pass_id, visitor_passes.c.uses < count)
            .values(uses=count))
