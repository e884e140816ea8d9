"""The directory repository on SQLite and PostgreSQL: writes, refusals, the change log."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, select

from gateway.store import db
from gateway.store import directory as d
from gateway.store.metadata import metadata

DIRECTORY_TABLES = {
    "buildings", "floors", "units", "residents", "cards", "phone_credentials", "access_groups",
    "access_group_gates", "access_group_floors", "access_group_windows",
    "access_group_members", "visitor_passes", "visitor_pass_gates", "directory_changes",
}
NOW = 1_780_000_000.0


def seed_site(conn: Connection) -> None:
    """Two buildings with different floors; Alice (A 12), Bob (A 5), Carol (B 8)."""
    d.upsert_building(conn, d.Building("a", "Building A"),
                      [d.Floor("a", -1, "garage", True), d.Floor("a", 1, "lobby", True),
                       *(d.Floor("a", n) for n in range(2, 13))])
    d.upsert_building(conn, d.Building("b", "Building B"),
                      [d.Floor("b", 1, "lobby", True), *(d.Floor("b", n) for n in range(2, 21))])
    for unit_id, building, floor in (("a-1201", "a", 12), ("a-0501", "a", 5), ("b-0801", "b", 8)):
        d.create_unit(conn, unit_id, building, floor)
    d.create_resident(conn, "a-1201", "Alice", "owner", resident_id="r-alice", now=NOW)
    d.create_resident(conn, "a-0501", "Bob", "tenant", resident_id="r-bob", now=NOW)
    d.create_resident(conn, "b-0801", "Carol", "family", resident_id="r-carol", now=NOW)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        seed_site(conn)
    try:
        yield engine
    finally:
        engine.dispose()


def version(engine: Engine) -> int:
    with engine.connect() as conn:
        return d.directory_version(conn)


def test_migration_creates_exactly_the_directory_tables(engine: Engine) -> None:
    def ours(name: str | None, type_: str, *_: object) -> bool:
        return type_ != "table" or name in DIRECTORY_TABLES

    # include_name filters what is reflected, include_object what the metadata holds (the
    # other tracks' tables are on the same metadata once their modules are imported).
    opts = {"compare_type": True, "include_name": ours,
            "include_object": lambda obj, name, type_, *rest: ours(name, type_)}
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts=opts), metadata) == []
        tables = set(conn.dialect.get_table_names(conn))
    assert tables >= DIRECTORY_TABLES and set(metadata.tables) >= DIRECTORY_TABLES


def test_units_and_residents_are_idempotent_and_refuse_contradictions(engine: Engine) -> None:
    before = version(engine)
    with engine.begin() as conn:
        seed_site(conn)  # a re-import of the same site changes nothing
    assert version(engine) == before
    with engine.begin() as conn, pytest.raises(d.Conflict):
        d.create_unit(conn, "a-1201", "a", 11)
    with engine.begin() as conn, pytest.raises(d.Conflict):
        d.create_resident(conn, "a-1201", "Alicia", "owner", resident_id="r-alice")
    with engine.begin() as conn:
        with pytest.raises(d.NotFound, match="no floor 40"):
            d.create_unit(conn, "a-4001", "a", 40)
        with pytest.raises(d.DirectoryError, match="role"):
            d.create_resident(conn, "a-1201", "Eve", "landlord")
        with pytest.raises(d.DirectoryError, match="resident_id"):
            d.create_resident(conn, "a-1201", "Eve", "owner", resident_id="bad id!")
        with pytest.raises(d.DirectoryError, match="name"):
            d.create_resident(conn, "a-1201", " ", "owner")
        with pytest.raises(d.NotFound):
            d.create_resident(conn, "nowhere", "Eve", "owner")
        generated = d.create_resident(conn, "a-1201", "Dan", "family")
    assert generated.resident_id.startswith("r-")
    with engine.connect() as conn:
        assert {r.name for r in d.list_residents(conn, "a-1201")} == {"Alice", "Dan"}
        assert {u.unit_id for u in d.list_units(conn, "a")} == {"a-1201", "a-0501"}
        assert [f.number for f in d.list_floors(conn, "b") if f.public] == [1]


def test_every_write_bumps_the_version_and_reads_do_not(engine: Engine) -> None:
    seen = [version(engine)]
    writes: list[Callable[[Connection], object]] = [
        lambda c: d.issue_card(c, "r-alice", "gate", "G-1"),
        lambda c: d.enrol_phone_credential(c, "r-alice", "phone"),
        lambda c: d.update_resident(c, "r-alice", name="Alice W"),
        lambda c: d.move_resident(c, "r-bob", "b-0801"),
        lambda c: d.revoke_card(c, "gate", "G-1"),
        lambda c: d.create_access_group(c, "night", gate_ids=["gym"]),
        lambda c: d.issue_visitor_pass(c, "r-carol", "Dana", NOW, NOW + 3600),
        lambda c: d.upsert_building(c, d.Building("a", "Tower A"), []),
        lambda c: d.move_out(c, "r-carol"),
    ]
    for write in writes:
        with engine.begin() as conn:
            write(conn)
        seen.append(version(engine))
        with engine.connect() as conn:
            d.load_snapshot(conn)
            d.list_residents(conn)
        assert version(engine) == seen[-1]
    assert seen == sorted(set(seen))
    with engine.begin() as conn:
        assert d.update_resident(conn, "r-alice", name="Alice W").name == "Alice W"  # no-op
    assert version(engine) == seen[-1]


def test_lost_card_revokes_only_that_card(engine: Engine) -> None:
    with engine.begin() as conn:
        for kind, number in (("gate", "G-A"), ("elevator", "E-A"), ("canteen", "C-A")):
            d.issue_card(conn, "r-alice", kind, number, now=NOW)
        assert d.issue_card(conn, "r-alice", "gate", "G-A").issued_at == NOW  # idempotent
        revoked = d.revoke_card(conn, "gate", "G-A", now=NOW + 1)
        assert d.revoke_card(conn, "gate", "G-A", now=NOW + 2).revoked_at == NOW + 1
    assert revoked.revoked_at == NOW + 1
    with engine.connect() as conn:
        cards = {c.card_number: c.revoked_at for c in d.list_cards(conn, "r-alice")}
    assert cards == {"G-A": NOW + 1, "E-A": None, "C-A": None}
    with engine.begin() as conn:
        with pytest.raises(d.Conflict, match="never reissued"):
            d.issue_card(conn, "r-alice", "gate", "G-A")
        with pytest.raises(d.Conflict, match="another resident"):
            d.issue_card(conn, "r-bob", "elevator", "E-A")
        with pytest.raises(d.DirectoryError, match="kind"):
            d.issue_card(conn, "r-bob", "parking", "P-1")
        with pytest.raises(d.DirectoryError, match="card number"):
            d.issue_card(conn, "r-bob", "gate", "with space")
        with pytest.raises(d.NotFound):
            d.revoke_card(conn, "gate", "never-issued")
        # The same number may exist once per kind (separate systems).
        d.issue_card(conn, "r-bob", "canteen", "G-A")


def test_lost_phone_revokes_only_that_credential(engine: Engine) -> None:
    with engine.begin() as conn:
        phone = d.enrol_phone_credential(conn, "r-alice", "phone", now=NOW)
        watch = d.enrol_phone_credential(conn, "r-alice", "watch", now=NOW + 1)
        d.revoke_phone_credential(conn, phone.credential.credential_id, now=NOW + 2)
    assert len(phone.secret) == 32 and phone.secret != watch.secret
    assert len(phone.credential.credential_id) == 16
    assert phone.secret.hex() not in repr(phone)
    with engine.connect() as conn:
        listed = d.list_phone_credentials(conn, "r-alice")
        snap = d.load_snapshot(conn)
    assert [(p.label, p.revoked_at) for p in listed] == [("phone", NOW + 2), ("watch", None)]
    assert not any(isinstance(v, bytes) for p in listed for v in vars_of(p))
    assert snap.secrets[watch.credential.credential_id] == watch.secret
    with engine.begin() as conn, pytest.raises(d.DirectoryError, match="label"):
        d.enrol_phone_credential(conn, "r-alice", "x" * 65)


def vars_of(obj: object) -> list[object]:
    return [getattr(obj, name) for name in obj.__slots__]  # type: ignore[attr-defined]


def test_move_out_revokes_everything_at_once(engine: Engine) -> None:
    with engine.begin() as conn:
        d.issue_card(conn, "r-bob", "gate", "G-B")
        d.issue_card(conn, "r-bob", "elevator", "E-B")
        d.enrol_phone_credential(conn, "r-bob", "phone")
        d.enrol_phone_credential(conn, "r-bob", "tablet")
        visit = d.issue_visitor_pass(conn, "r-bob", "Dana", NOW, NOW + 3600, building_id="a",
                                     floor=5)
        group = d.create_access_group(conn, "gym", gate_ids=["gym"])
        d.add_group_member(conn, group.group_id, "r-bob")
        d.issue_card(conn, "r-alice", "gate", "G-A")
        gone = d.move_out(conn, "r-bob", now=NOW + 10)
    assert gone.moved_out_at == NOW + 10
    with engine.connect() as conn:
        assert {c.revoked_at for c in d.list_cards(conn, "r-bob")} == {NOW + 10}
        assert {p.revoked_at for p in d.list_phone_credentials(conn, "r-bob")} == {NOW + 10}
        assert d.get_visitor_pass(conn, visit.visitor_pass.pass_id).revoked_at == NOW + 10
        assert d.get_access_group(conn, group.group_id).member_ids == ()
        assert d.get_card(conn, "gate", "G-A").revoked_at is None  # neighbours untouched
        assert [r.resident_id for r in d.list_residents(conn)] == ["r-alice", "r-carol"]
        assert len(d.list_residents(conn, include_moved_out=True)) == 3
    with engine.begin() as conn:
        for write in (lambda: d.issue_card(conn, "r-bob", "gate", "G-B2"),
                      lambda: d.enrol_phone_credential(conn, "r-bob"),
                      lambda: d.move_out(conn, "r-bob"),
                      lambda: d.add_group_member(conn, group.group_id, "r-bob"),
                      lambda: d.issue_visitor_pass(conn, "r-bob", "X", NOW, NOW + 60)):
            with pytest.raises(d.Conflict, match="moved out"):
                write()


def test_access_groups(engine: Engine) -> None:
    window = d.ScheduleWindow(0, 8 * 60, 18 * 60)
    with engine.begin() as conn:
        group = d.create_access_group(conn, "gym", gate_ids=["gym", "gym"],
                                      floors=[("a", 3), ("b", 20)], windows=[window],
                                      group_id="g-gym")
        d.add_group_member(conn, "g-gym", "r-alice")
        d.add_group_member(conn, "g-gym", "r-alice")
        d.add_group_member(conn, "g-gym", "r-carol")
    assert (group.gate_ids, group.floors, group.windows) == (
        ("gym",), (("a", 3), ("b", 20)), (window,))
    with engine.begin() as conn:
        updated = d.update_access_group(conn, "g-gym", floors=[("a", 4)], windows=[])
        d.remove_group_member(conn, "g-gym", "r-carol")
    assert (updated.gate_ids, updated.floors, updated.windows) == (("gym",), (("a", 4),), ())
    with engine.connect() as conn:
        assert d.get_access_group(conn, "g-gym").member_ids == ("r-alice",)
        assert [g.group_id for g in d.list_access_groups(conn, "r-alice")] == ["g-gym"]
        assert d.list_access_groups(conn, "r-bob") == []
    with engine.begin() as conn:
        with pytest.raises(d.Conflict, match="named 'gym'"):
            d.create_access_group(conn, "gym")
        with pytest.raises(d.NotFound, match="no floor 99"):
            d.update_access_group(conn, "g-gym", floors=[("a", 99)])
        with pytest.raises(d.DirectoryError, match="same weekday"):
            d.update_access_group(conn, "g-gym", windows=[window, d.ScheduleWindow(0, 480, 500)])
        with pytest.raises(d.NotFound):
            d.add_group_member(conn, "g-none", "r-alice")
    for bad in ((7, 0, 60), (0, 60, 60), (0, -1, 60), (0, 0, 1441)):
        with pytest.raises(d.DirectoryError, match=r"weekday|window"):
            d.ScheduleWindow(*bad)
    with engine.begin() as conn:
        d.delete_access_group(conn, "g-gym")
    with engine.connect() as conn:
        assert d.list_access_groups(conn) == []


def test_visitor_passes(engine: Engine) -> None:
    with engine.begin() as conn:
        issued = d.issue_visitor_pass(conn, "r-alice", "Dana", NOW, NOW + 3600,
                                      gate_ids=["gate-north"], building_id="a", floor=12,
                                      max_uses=3)
        gates_only = d.issue_visitor_pass(conn, "r-alice", "Eli", NOW, NOW + 60)
    visit = issued.visitor_pass
    assert (visit.gate_ids, visit.floor, visit.uses, visit.max_uses) == (("gate-north",), 12, 0, 3)
    assert gates_only.visitor_pass.floor is None and gates_only.visitor_pass.gate_ids == ()
    assert issued.secret.hex() not in repr(issued)
    before = version(engine)
    with engine.begin() as conn:
        d.record_visitor_pass_uses(conn, {visit.pass_id: 2})
        d.record_visitor_pass_uses(conn, {visit.pass_id: 1})  # late, smaller count: ignored
    assert version(engine) == before  # a use is not a rights change
    with engine.connect() as conn:
        assert d.get_visitor_pass(conn, visit.pass_id).uses == 2
        assert len(d.list_visitor_passes(conn, "r-alice")) == 2
        assert d.list_visitor_passes(conn, "r-bob") == []
    with engine.begin() as conn:
        assert d.revoke_visitor_pass(conn, visit.pass_id, now=NOW + 5).revoked_at == NOW + 5
        for kwargs, match in (
            ({"valid_until": NOW}, "valid_from < valid_until"),
            ({"valid_until": NOW + 8 * 86400}, "7 days"),
            ({"max_uses": 0}, "max_uses"),
            ({"floor": 5}, "both building_id and floor"),
            ({"building_id": "a", "floor": 77}, "no floor 77"),
            ({"gate_ids": ["bad gate"]}, "gate_id"),
        ):
            args = {"valid_until": NOW + 60, **kwargs}
            with pytest.raises(d.DirectoryError, match=match):
                d.issue_visitor_pass(conn, "r-alice", "Fay", NOW, **args)  # type: ignore[arg-type]


def test_snapshot_holds_the_whole_directory(engine: Engine) -> None:
    with engine.begin() as conn:
        d.issue_card(conn, "r-alice", "gate", "G-A")
        enrolled = d.enrol_phone_credential(conn, "r-carol")
        visit = d.issue_visitor_pass(conn, "r-carol", "Dana", NOW, NOW + 60)
        d.create_access_group(conn, "staff", gate_ids=["back"], windows=[
            d.ScheduleWindow(1, 0, 60)], group_id="g-staff")
        d.add_group_member(conn, "g-staff", "r-bob")
    with engine.connect() as conn:
        snap = d.load_snapshot(conn)
        assert snap.version == d.directory_version(conn)
    assert [b.building_id for b in snap.buildings] == ["a", "b"]
    assert len(snap.floors) == 13 + 20 and len(snap.units) == 3 and len(snap.residents) == 3
    assert [c.card_number for c in snap.cards] == ["G-A"]
    assert [p.credential_id for p in snap.phone_credentials] == [
        enrolled.credential.credential_id]
    assert snap.access_groups[0].member_ids == ("r-bob",)
    assert snap.visitor_passes[0].pass_id == visit.visitor_pass.pass_id
    assert snap.secrets == {enrolled.credential.credential_id: enrolled.secret,
                            visit.visitor_pass.credential_id: visit.secret}
    assert enrolled.secret.hex() not in repr(snap)


def test_upsert_building_mirrors_config(engine: Engine) -> None:
    with engine.begin() as conn:
        assert not d.upsert_building(conn, d.Building("b", "Building B"), [d.Floor("b", 1, "lobby",
                                                                                   True)])
        assert d.upsert_building(conn, d.Building("b", "Building B"), [
            d.Floor("b", 20, "gym", True), d.Floor("b", 21)])
        with pytest.raises(d.DirectoryError):
            d.upsert_building(conn, d.Building("b", "B"), [d.Floor("a", 1)])
    with engine.connect() as conn:
        floors = {f.number: f for f in d.list_floors(conn, "b")}
        assert floors[20].public and floors[20].label == "gym" and 21 in floors
        assert len(conn.execute(select(d.buildings)).all()) == 2


def test_changes_name_what_they_touch(engine: Engine) -> None:
    """A gateway reloads only this, so a wrong name here would hide a revocation."""
    with engine.begin() as conn:
        d.issue_card(conn, "r-alice", "gate", "G-A")
        phone = d.enrol_phone_credential(conn, "r-alice").credential.credential_id
        visit = d.issue_visitor_pass(conn, "r-alice", "Dana", NOW, NOW + 60).visitor_pass.pass_id
    cases: list[tuple[Callable[[Connection], object], d.ChangeSet]] = [
        (lambda c: d.upsert_building(c, d.Building("b", "B2"), []), d.ChangeSet(
            frozenset({"places"}))),
        (lambda c: d.create_unit(c, "b-0101", "b", 1), d.ChangeSet(frozenset({"people"}))),
        (lambda c: d.create_resident(c, "b-0101", "Dan", "owner"), d.ChangeSet(
            frozenset({"people"}))),
        (lambda c: d.update_resident(c, "r-bob", unit_id="b-0801"), d.ChangeSet(
            frozenset({"people"}))),
        (lambda c: d.create_access_group(c, "gym", group_id="g"), d.ChangeSet(
            frozenset({"people"}))),
        (lambda c: d.add_group_member(c, "g", "r-bob"), d.ChangeSet(frozenset({"people"}))),
        (lambda c: d.issue_card(c, "r-bob", "gate", "G:B"), d.ChangeSet(
            frozenset(), cards=frozenset({("gate", "G:B")}))),
        (lambda c: d.revoke_card(c, "gate", "G-A"), d.ChangeSet(
            frozenset(), cards=frozenset({("gate", "G-A")}))),
        (lambda c: d.revoke_phone_credential(c, phone), d.ChangeSet(
            frozenset(), phones=frozenset({phone}))),
        (lambda c: d.revoke_visitor_pass(c, visit), d.ChangeSet(frozenset({"passes"}))),
        (lambda c: d.move_out(c, "r-alice"), d.ChangeSet(
            frozenset({"people", "passes"}), residents=frozenset({"r-alice"}))),
    ]
    for write, expected in cases:
        since = version(engine)
        with engine.begin() as conn:
            write(conn)
        with engine.connect() as conn:
            changes = d.pending_changes(conn, since)
            assert changes == expected
            partial = d.load_snapshot(conn, changes.parts)
            delta = d.load_delta(conn, changes)
        assert partial.parts == changes.parts
        assert bool(partial.residents) == bool(partial.units) == ("people" in changes.parts)
        assert {(c.kind, c.card_number) for c in delta.cards} >= changes.cards
    assert {(c.card_number, c.revoked_at is not None) for c in delta.cards} == {
        ("G-A", True)}  # the moved-out resident's cards, re-read
    assert {p.credential_id for p in delta.phone_credentials} == {phone}
    latest = version(engine)
    with engine.connect() as conn:
        assert d.pending_changes(conn, 0) == d.ChangeSet(d.ALL_PARTS)
        assert d.pending_changes(conn, latest) == d.ChangeSet(frozenset())
        assert d.load_delta(conn, d.ChangeSet(frozenset())) == d.DirectoryDelta()
    with engine.begin() as conn:
        with pytest.raises(ValueError, match="unknown directory change"):
            d.bump(conn, "card.lost")
        with pytest.raises(ValueError, match="parts"):
            d.load_snapshot(conn, ["cards", "pets"])
        for n in range(d.MAX_ROW_CHANGES + 1):
            d.bump(conn, "card.issue", f"gate:N{n}")
        assert d.pending_changes(conn, latest) == d.ChangeSet(frozenset({"cards"}))  # an import
        conn.execute(d.directory_changes.delete().where(d.directory_changes.c.change_id < latest))
        assert d.pending_changes(conn, latest - 2) == d.ChangeSet(d.ALL_PARTS)  # log pruned
