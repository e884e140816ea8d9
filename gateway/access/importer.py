"""Residents CSV import: units, residents and their cards, all or nothing.

The file is checked in two passes before anything is kept. The first is pure: every row's
fields and the rows' agreement with each other (a unit or resident described twice must be
described the same way; a card cannot go to two people). The second applies the rows through
the directory repository inside one transaction, so the store's own
refusals (an unknown floor, a card held by someone else, a revoked card, a moved-out
resident) are reported with their line too. Any error rolls everything back; a dry run rolls
back a valid file as well and reports what would have changed.

Re-importing a file changes nothing: units are keyed by unit_id, residents by resident_id
(or, without one, by unit and name), cards by kind and number. Cards and residents missing
from the file are left alone; the import never revokes. Column reference: docs/import.md.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, select

from gateway.config import SiteConfig
from gateway.store import directory as d
from gateway.store.directory_schema import CARD_NUMBER_PATTERN, valid_id, valid_text

COLUMNS = ("unit_id", "building_id", "floor", "unit_label", "resident_id", "name", "role",
           "gate_card", "elevator_card", "canteen_card")
REQUIRED_COLUMNS = ("unit_id", "building_id", "floor")
CARD_COLUMNS = {f"{kind}_card": kind for kind in d.CARD_KINDS}
MAX_ROWS = 200_000


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class UnitRow:
    line: int
    unit_id: str
    building_id: str
    floor: int
    label: str


@dataclass(frozen=True, slots=True)
class ResidentRow:
    line: int
    unit_id: str
    name: str
    role: str
    resident_id: str | None  # None: the resident is found by unit and name

    @property
    def key(self) -> str:
        return self.resident_id or f"{self.unit_id}\x00{self.name}"


@dataclass(frozen=True, slots=True)
class CardRow:
    line: int
    resident_key: str
    kind: str
    card_number: str


@dataclass(frozen=True, slots=True)
class ImportPlan:
    units: tuple[UnitRow, ...]
    residents: tuple[ResidentRow, ...]
    cards: tuple[CardRow, ...]
    rows: int


@dataclass
class ImportReport:
    rows: int = 0
    errors: list[RowError] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # "line 3: create unit ..." per write
    counts: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    committed: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


# --- pass 1: the file on its own (pure) -----------------------------------------------------


def parse_csv(text: str) -> tuple[ImportPlan, list[RowError]]:
    """Check every row and the rows against each other; collect every problem."""
    errors: list[RowError] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    units: dict[str, UnitRow] = {}
    residents: dict[str, ResidentRow] = {}
    cards: dict[tuple[str, str], CardRow] = {}
    rows = 0
    line = 1
    try:
        for record in reader:
            start, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in record) or record[0].lstrip().startswith("#"):
                continue
            if header is None:
                header, header_line = [c.strip().lower() for c in record], start
                errors += _check_header(header, start)
                if errors:
                    return ImportPlan((), (), (), 0), errors
                continue
            rows += 1
            if rows > MAX_ROWS:
                errors.append(RowError(start, f"more than {MAX_ROWS} rows; split the file"))
                break
            if len(record) != len(header):
                errors.append(RowError(start, f"{len(record)} fields, the header has "
                                              f"{len(header)}"))
                continue
            cells = {name: value.strip() for name, value in zip(header, record, strict=True)}
            errors += _parse_row(start, cells, units, residents, cards)
    except csv.Error as exc:
        errors.append(RowError(reader.line_num, f"not valid CSV: {exc}"))
    if header is None:
        errors.append(RowError(header_line or 1, "no header row; expected columns "
                                                 + ", ".join(COLUMNS)))
    plan = ImportPlan(tuple(units.values()), tuple(residents.values()), tuple(cards.values()),
                      rows)
    return plan, errors


def _check_header(header: list[str], line: int) -> list[RowError]:
    errors = []
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        errors.append(RowError(line, f"unknown column(s) {', '.join(map(repr, unknown))}; "
                                     f"known: {', '.join(COLUMNS)}"))
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        errors.append(RowError(line, f"missing column(s) {', '.join(missing)}"))
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        errors.append(RowError(line, f"column(s) repeated: {', '.join(repeated)}"))
    return errors


def _parse_row(
    line: int, cells: dict[str, str], units: dict[str, UnitRow],
    residents: dict[str, ResidentRow], cards: dict[tuple[str, str], CardRow],
) -> list[RowError]:
    problems: list[str] = []

    def field_ok(check: Callable[[], Any]) -> bool:
        try:
            check()
        except d.DirectoryError as exc:
            problems.append(str(exc))
            return False
        return True

    unit_id, building_id = cells.get("unit_id", ""), cells.get("building_id", "")
    field_ok(lambda: valid_id("unit_id", unit_id))
    field_ok(lambda: valid_id("building_id", building_id))
    floor_text = cells.get("floor", "")
    floor = int(floor_text) if re.fullmatch(r"-?\d{1,4}", floor_text) else None
    if floor is None:
        problems.append(f"floor must be a whole number, got {floor_text!r}")
    label = cells.get("unit_label", "")
    field_ok(lambda: valid_text("unit_label", label, 64, allow_empty=True))
    name, role = cells.get("name", ""), cells.get("role", "")
    resident_id = cells.get("resident_id", "") or None
    card_cells = {kind: cells.get(column, "") for column, kind in CARD_COLUMNS.items()}
    has_resident = bool(name or role or resident_id or any(card_cells.values()))
    if has_resident:
        field_ok(lambda: valid_text("name", name, 128))
        if role not in d.RESIDENT_ROLES:
            problems.append(f"role must be one of {', '.join(d.RESIDENT_ROLES)}, got {role!r}")
        if resident_id is not None:
            field_ok(lambda: valid_id("resident_id", resident_id))
    for kind, number in card_cells.items():
        if number and not CARD_NUMBER_PATTERN.match(number):
            problems.append(f"{kind}_card must be 1-64 printable characters without spaces, "
                            f"got {number!r}")
    if problems or floor is None:
        return [RowError(line, "; ".join(problems))]

    unit = UnitRow(line, unit_id, building_id, floor, label)
    earlier = units.setdefault(unit_id, unit)
    if (earlier.building_id, earlier.floor, earlier.label) != (building_id, floor, label):
        problems.append(f"unit {unit_id!r} is described differently on line {earlier.line}")
    if not has_resident:
        return [RowError(line, "; ".join(problems))] if problems else []
    resident = ResidentRow(line, unit_id, name, role, resident_id)
    known = residents.setdefault(resident.key, resident)
    if (known.unit_id, known.name, known.role) != (unit_id, name, role):
        problems.append(f"resident {resident_id or name!r} is described differently on line "
                        f"{known.line}")
    for kind, number in card_cells.items():
        if not number:
            continue
        card = CardRow(line, resident.key, kind, number)
        holder = cards.setdefault((kind, number), card)
        if holder.resident_key != resident.key:
            problems.append(f"{kind} card {number!r} is also given to another resident on line "
                            f"{holder.line}")
    return [RowError(line, "; ".join(problems))] if problems else []


# --- pass 2: the file against the store (one transaction) -----------------------------------


def apply_plan(conn: Connection, plan: ImportPlan, report: ImportReport) -> None:
    """Apply inside the caller's transaction; errors and changes go to the report.

    What is stored is read up front in three queries, so rows that change nothing cost no
    statement at all; rows that do change go through the repository, which validates them.
    The repository refuses before it writes, and any refusal rolls the whole transaction
    back, so a refused row needs no savepoint of its own.
    """
    store = _Stored.load(conn)

    def step(line: int, action: Callable[[], None]) -> bool:
        try:
            action()
        except d.DirectoryError as exc:
            report.errors.append(RowError(line, str(exc)))
            return False
        return True

    # A refused unit or resident is reported once, not again for everything that needs it.
    good_units = {u.unit_id for u in plan.units
                  if step(u.line, partial(_apply_unit, conn, store, u, report))}
    for resident in plan.residents:
        if resident.unit_id in good_units:
            step(resident.line, partial(_apply_resident, conn, store, resident, report))
    for card in plan.cards:
        if card.resident_key in store.ids:  # else its resident's row already failed
            step(card.line, partial(_apply_card, conn, store, card, report))


@dataclass
class _Stored:
    units: dict[str, d.Unit]
    residents: dict[str, d.Resident]
    active_by_name: dict[tuple[str, str], list[d.Resident]]
    cards: dict[tuple[str, str], tuple[str, bool]]  # (kind, number) -> (holder, revoked)
    ids: dict[str, str] = field(default_factory=dict)  # plan resident key -> resident id

    @classmethod
    def load(cls, conn: Connection) -> _Stored:
        residents = {r.resident_id: r for r in d.list_residents(conn, include_moved_out=True)}
        by_name: dict[tuple[str, str], list[d.Resident]] = {}
        for r in residents.values():
            if r.moved_out_at is None:
                by_name.setdefault((r.unit_id, r.name), []).append(r)
        card_rows = conn.execute(select(d.cards.c.kind, d.cards.c.card_number,
                                        d.cards.c.resident_id, d.cards.c.revoked_at))
        return cls(
            units={u.unit_id: u for u in d.list_units(conn)},
            residents=residents,
            active_by_name=by_name,
            cards={(c.kind, c.card_number): (c.resident_id, c.revoked_at is not None)
                   for c in card_rows},
        )

    def find(self, row: ResidentRow) -> d.Resident | None:
        if row.resident_id is not None:
            return self.residents.get(row.resident_id)
        same_name = self.active_by_name.get((row.unit_id, row.name), [])
        if len(same_name) > 1:
            raise d.Conflict(f"{len(same_name)} residents of unit {row.unit_id!r} are named "
                             f"{row.name!r}; give a resident_id")
        return same_name[0] if same_name else None


def _apply_unit(conn: Connection, store: _Stored, unit: UnitRow, report: ImportReport) -> None:
    stored = store.units.get(unit.unit_id)
    if stored == d.Unit(unit.unit_id, unit.building_id, unit.floor, unit.label):
        return
    # New, or stored with other details: the repository creates it or says how it differs.
    store.units[unit.unit_id] = d.create_unit(conn, unit.unit_id, unit.building_id, unit.floor,
                                              unit.label)
    report.changes.append(f"line {unit.line}: create unit {unit.unit_id} "
                          f"({unit.building_id} floor {unit.floor})")
    report.count("units_created")


def _apply_resident(conn: Connection, store: _Stored, row: ResidentRow,
                    report: ImportReport) -> None:
    stored = store.find(row)
    if stored is None:
        created = d.create_resident(conn, row.unit_id, row.name, row.role,
                                    resident_id=row.resident_id)
        store.ids[row.key] = created.resident_id
        report.changes.append(f"line {row.line}: create resident {created.resident_id} "
                              f"({row.name}, {row.role}, unit {row.unit_id})")
        report.count("residents_created")
        return
    if stored.moved_out_at is not None:
        raise d.Conflict(f"resident {stored.resident_id!r} has moved out; give a new resident_id")
    store.ids[row.key] = stored.resident_id
    if (stored.unit_id, stored.name, stored.role) == (row.unit_id, row.name, row.role):
        return
    d.update_resident(conn, stored.resident_id, name=row.name, role=row.role,
                      unit_id=row.unit_id)
    moved = f", moves {stored.unit_id} -> {row.unit_id}" if stored.unit_id != row.unit_id else ""
    report.changes.append(f"line {row.line}: update resident {stored.resident_id} "
                          f"({row.name}, {row.role}{moved})")
    report.count("residents_updated")


def _apply_card(conn: Connection, store: _Stored, row: CardRow, report: ImportReport) -> None:
    resident_id = store.ids[row.resident_key]
    stored = store.cards.get((row.kind, row.card_number))
    if stored == (resident_id, False):
        return
    # New, or someone else's or revoked: the repository issues it or refuses with the reason.
    d.issue_card(conn, resident_id, row.kind, row.card_number)
    report.changes.append(f"line {row.line}: issue {row.kind} card {row.card_number} "
                          f"to {resident_id}")
    report.count("cards_issued")


def sync_buildings(conn: Connection, config: SiteConfig, report: ImportReport) -> None:
    """Mirror the site file's buildings and floors, which units refer to."""
    for building in config.buildings:
        changed = d.upsert_building(
            conn, d.Building(building.id, building.name),
            [d.Floor(building.id, f.number, f.name, f.public) for f in building.floors])
        if changed:
            report.changes.append(f"site file: building {building.id} and its floors")
            report.count("buildings_synced")


def import_residents(
    engine: Engine, text: str, *, dry_run: bool = False, config: SiteConfig | None = None,
) -> ImportReport:
    """Validate the whole file, then write it in one transaction unless anything is wrong."""
    report = ImportReport(dry_run=dry_run)
    plan, errors = parse_csv(text)
    report.rows = plan.rows
    report.errors.extend(errors)
    if errors:
        return report
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            if config is not None:
                sync_buildings(conn, config, report)
            apply_plan(conn, plan, report)
            report.errors.sort(key=lambda e: e.line)
            report.changes.sort(key=_change_line)
            if report.errors or dry_run:
                transaction.rollback()
            else:
                transaction.commit()
                report.committed = True
        except BaseException:
            transaction.rollback()
            raise
    return report


def _change_line(change: str) -> int:
    """Changes are listed in file order; site-file changes (no line) come first."""
    match = re.match(r"line (\d+):", change)
    return int(match.group(1)) if match else 0


def read_csv_file(data: bytes) -> str:
    """Decode as UTF-8, dropping the byte-order mark spreadsheet programs write."""
    return data.decode("utf-8-sig")


def summary(report: ImportReport) -> Iterable[str]:
    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(report.counts.items()))
    yield f"{report.rows} rows, {counts or 'no changes'}"
