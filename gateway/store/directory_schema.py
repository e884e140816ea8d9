"""Directory tables and the plain types the repository hands out.

Split from `gateway.store.directory` (the entry point other code imports) only to keep each
file readable; nothing outside the directory modules needs to import this one directly.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    func,
    insert,
    select,
    text,
)

from device_drivers.tokens import SECRET_BYTES
from gateway.store.metadata import metadata

ResidentRole = Literal["owner", "tenant", "family"]
CardKind = Literal["gate", "elevator", "canteen"]
RESIDENT_ROLES: tuple[str, ...] = get_args(ResidentRole)
CARD_KINDS: tuple[str, ...] = get_args(CardKind)

# The snapshot is read in parts so that a gateway reloads only what a change touched, and
# cards and phones even row by row: a lost card reloads that card, not 60,000. Every `bump`
# names its change, and CHANGE_PARTS says which parts it may have touched (those changes
# whose subject is given reload their rows instead); anything unlisted reloads everything.
SnapshotPart = Literal["places", "people", "cards", "phones", "passes"]
ALL_PARTS: frozenset[str] = frozenset(get_args(SnapshotPart))
CHANGE_PARTS: Mapping[str, frozenset[str]] = {
    "building.upsert": frozenset({"places"}),  # buildings, floors
    "unit.create": frozenset({"people"}),  # units, residents, access groups
    "resident.create": frozenset({"people"}),
    "resident.update": frozenset({"people"}),
    "resident.move_out": ALL_PARTS,
    "card.issue": frozenset({"cards"}),
    "card.revoke": frozenset({"cards"}),
    "credential.enrol": frozenset({"phones"}),
    "credential.revoke": frozenset({"phones"}),
    "group.create": frozenset({"people"}),
    "group.update": frozenset({"people"}),
    "group.delete": frozenset({"people"}),
    "group.add_member": frozenset({"people"}),
    "group.remove_member": frozenset({"people"}),
    "visitor_pass.issue": frozenset({"passes"}),
    "visitor_pass.revoke": frozenset({"passes"}),
    "bulk": ALL_PARTS,  # for loaders that write the tables directly
}

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
CARD_NUMBER_PATTERN = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable ASCII, no spaces

buildings = Table(
    "buildings",
    metadata,
    Column("building_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
)

floors = Table(
    "floors",
    metadata,
    Column("building_id", String(64), ForeignKey("buildings.building_id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("label", String(64), nullable=False),
    Column("public", Boolean, nullable=False),
    PrimaryKeyConstraint("building_id", "number"),
)

units = Table(
    "units",
    metadata,
    Column("unit_id", String(64), primary_key=True),
    Column("building_id", String(64), nullable=False),
    Column("floor", Integer, nullable=False),
    Column("label", String(64), nullable=False),
    ForeignKeyConstraint(["building_id", "floor"], ["floors.building_id", "floors.number"]),
)

residents = Table(
    "residents",
    metadata,
    Column("resident_id", String(64), primary_key=True),
    Column("unit_id", String(64), ForeignKey("units.unit_id"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("moved_out_at", Float, nullable=True),
)

cards = Table(
    "cards",
    metadata,
    Column("kind", String(16), nullable=False),
    Column("card_number", String(64), nullable=False),
    Column("resident_id", String(64), ForeignKey("residents.resident_id"), nullable=False,
           index=True),
    Column("issued_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    PrimaryKeyConstraint("kind", "card_number"),
)

phone_credentials = Table(
    "phone_credentials",
    metadata,
    Column("credential_id", String(16), primary_key=True),
    Column("resident_id", String(64), ForeignKey("residents.resident_id"), nullable=False,
           index=True),
    Column("secret", LargeBinary(SECRET_BYTES), nullable=False),
    Column("label", String(64), nullable=False),
    Column("enrolled_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

access_groups = Table(
    "access_groups",
    metadata,
    Column("group_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
)

access_group_gates = Table(
    "access_group_gates",
    metadata,
    Column("group_id", String(64), ForeignKey("access_groups.group_id"), primary_key=True),
    Column("gate_id", String(64), primary_key=True),
)

access_group_floors = Table(
    "access_group_floors",
    metadata,
    Column("group_id", String(64), ForeignKey("access_groups.group_id"), nullable=False),
    Column("building_id", String(64), nullable=False),
    Column("floor", Integer, nullable=False),
    PrimaryKeyConstraint("group_id", "building_id", "floor"),
    ForeignKeyConstraint(["building_id", "floor"], ["floors.building_id", "floors.number"]),
)

access_group_windows = Table(
    "access_group_windows",
    metadata,
    Column("group_id", String(64), ForeignKey("access_groups.group_id"), primary_key=True),
    Column("weekday", Integer, primary_key=True),  # 0 = Monday, in the site's time zone
    Column("start_minute", Integer, primary_key=True),  # minutes after local midnight
    Column("end_minute", Integer, nullable=False),  # exclusive; 1440 = midnight
)

access_group_members = Table(
    "access_group_members",
    metadata,
    Column("group_id", String(64), ForeignKey("access_groups.group_id"), primary_key=True),
    Column("resident_id", String(64), ForeignKey("residents.resident_id"), primary_key=True,
           index=True),
)

visitor_passes = Table(
    "visitor_passes",
    metadata,
    Column("pass_id", String(64), primary_key=True),
    Column("issued_by", String(64), ForeignKey("residents.resident_id"), nullable=False,
           index=True),
    Column("visitor_name", String(128), nullable=False),
    Column("credential_id", String(16), nullable=False, unique=True),
    Column("secret", LargeBinary(SECRET_BYTES), nullable=False),
    Column("building_id", String(64), nullable=True),
    Column("floor", Integer, nullable=True),
    Column("valid_from", Float, nullable=False),
    Column("valid_until", Float, nullable=False),
    Column("max_uses", Integer, nullable=False),
    Column("uses", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    ForeignKeyConstraint(["building_id", "floor"], ["floors.building_id", "floors.number"]),
)

visitor_pass_gates = Table(
    "visitor_pass_gates",
    metadata,
    Column("pass_id", String(64), ForeignKey("visitor_passes.pass_id"), primary_key=True),
    Column("gate_id", String(64), primary_key=True),
)

directory_changes = Table(
    "directory_changes",
    metadata,
    Column("change_id", Integer, primary_key=True, autoincrement=True),
    Column("changed_at", Float, nullable=False),
    Column("what", String(64), nullable=False),
    # What exactly changed, where a gateway can reload just that: "kind:number" for a card,
    # the credential id for a phone, the resident id for a move-out.
    Column("subject", String(128), nullable=True),
)


class DirectoryError(ValueError):
    """Input the directory refuses; the message is safe to show to the person who sent it."""


class NotFound(DirectoryError, LookupError):
    pass


class Conflict(DirectoryError):
    """The request contradicts what is stored (a card held by someone else, a revoked id)."""


@dataclass(frozen=True, slots=True)
class Building:
    building_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Floor:
    building_id: str
    number: int
    label: str = ""
    public: bool = False


@dataclass(frozen=True, slots=True)
class Unit:
    unit_id: str
    building_id: str
    floor: int
    label: str = ""


@dataclass(frozen=True, slots=True)
class Resident:
    resident_id: str
    unit_id: str
    name: str
    role: str
    created_at: float
    moved_out_at: float | None = None


@dataclass(frozen=True, slots=True)
class Card:
    kind: str
    card_number: str
    resident_id: str
    issued_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class PhoneCredential:
    """A phone's enrolment, without its secret: safe to list and to log."""

    credential_id: str
    resident_id: str
    label: str
    enrolled_at: float
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class EnrolledCredential:
    """Returned once at enrolment: the only time the secret leaves the store."""

    credential: PhoneCredential
    secret: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ScheduleWindow:
    """A weekly window in site-local time; a window across midnight is two windows."""

    weekday: int
    start_minute: int
    end_minute: int

    def __post_init__(self) -> None:
        if not 0 <= self.weekday <= 6:
            raise DirectoryError(f"weekday must be 0 (Monday) to 6, got {self.weekday}")
        if not 0 <= self.start_minute < self.end_minute <= 1440:
            raise DirectoryError(
                f"window must satisfy 0 <= start < end <= 1440 minutes, got "
                f"{self.start_minute}-{self.end_minute}"
            )


@dataclass(frozen=True, slots=True)
class AccessGroup:
    """Extra rights for its members: gates and floors, during its windows (none = always)."""

    group_id: str
    name: str
    gate_ids: tuple[str, ...] = ()
    floors: tuple[tuple[str, int], ...] = ()
    windows: tuple[ScheduleWindow, ...] = ()
    member_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VisitorPass:
    """One visit delegated by a resident; it never grants more than its issuer holds.

    No gate ids means the gates the issuer passes by default; no floor means gates only.
    """

    pass_id: str
    issued_by: str
    visitor_name: str
    credential_id: str
    building_id: str | None
    floor: int | None
    valid_from: float
    valid_until: float
    max_uses: int
    uses: int
    created_at: float
    revoked_at: float | None = None
    gate_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IssuedVisitorPass:
    visitor_pass: VisitorPass
    secret: bytes = field(repr=False)


T = TypeVar("T")


def valid_id(what: str, value: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise DirectoryError(
            f"{what} must be 1-64 letters, digits or '_.:-' starting with a letter or digit, "
            f"got {value!r}"
        )
    return value


def valid_text(what: str, value: str, max_len: int, *, allow_empty: bool = False) -> str:
    value = value.strip() if isinstance(value, str) else value
    if not isinstance(value, str) or len(value) > max_len or (not value and not allow_empty):
        raise DirectoryError(f"{what} must be text of 1-{max_len} characters, got {value!r}")
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def bump(conn: Connection, what: str, subject: str | None = None) -> None:
    """Record a directory change (a key of CHANGE_PARTS) so every gateway reloads its index.

    On PostgreSQL the table lock makes change ids commit in id order; otherwise a watcher
    could see id 6 before a slower transaction commits id 5 and never notice id 5.
    SQLite writers are already serialized by BEGIN IMMEDIATE.
    """
    if what not in CHANGE_PARTS:
        raise ValueError(f"unknown directory change {what!r}; add it to CHANGE_PARTS")
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE directory_changes IN SHARE ROW EXCLUSIVE MODE"))
    conn.execute(insert(directory_changes).values(changed_at=time.time(), what=what,
                                                  subject=subject))


def directory_version(conn: Connection) -> int:
    """The id of the latest change; it only grows, so any difference means rebuild."""
    return int(conn.execute(select(func.coalesce(func.max(directory_changes.c.change_id), 0)))
               .scalar_one())


def fetch_one(conn: Connection, table: Table, cls: type[T], what: str, **key: Any) -> T:
    where = [table.c[name] == value for name, value in key.items()]
    row = conn.execute(select(table).where(*where)).mappings().first()
    if row is None:
        raise NotFound(f"{what} {'/'.join(str(v) for v in key.values())!r} does not exist")
    return cls(**{k: row[k] for k in row.keys() if k != "secret"})


def require_floors(conn: Connection, wanted: Iterable[tuple[str, int]]) -> None:
    for building_id, number in wanted:
        found = conn.execute(select(floors.c.number).where(
            floors.c.building_id == building_id, floors.c.number == number)).first()
        if found is None:
            raise NotFound(f"building {building_id!r} has no floor {number}")


def require_active_resident(conn: Connection, resident_id: str) -> Resident:
    resident = fetch_one(conn, residents, Resident, "resident", resident_id=resident_id)
    if resident.moved_out_at is not None:
        raise Conflict(f"resident {resident_id!r} has moved out")
    return resident
