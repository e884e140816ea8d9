"""The read side for gateways: the whole directory as a snapshot, and what changed since.

Import these through `gateway.store.directory`. A snapshot can be read in parts and a
change set names single cards and phones, so that a gateway whose index is at version N
reloads only what the changes after N touched (see CHANGE_PARTS in directory_schema).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from itertools import starmap
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, func, or_, select

from gateway.store.directory_grants import load_access_groups, load_visitor_passes
from gateway.store.directory_schema import (
    ALL_PARTS,
    CHANGE_PARTS,
    AccessGroup,
    Building,
    Card,
    Floor,
    PhoneCredential,
    Resident,
    Unit,
    VisitorPass,
    buildings,
    cards,
    directory_changes,
    directory_version,
    floors,
    phone_credentials,
    residents,
    units,
    visitor_passes,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DirectorySnapshot:
    """Everything the access index is built from, read in one consistent transaction.

    `secrets` maps credential ids (phones and visitor passes) to their HMAC keys; it is kept
    apart from the listed types so that listing or logging those can never leak a secret.
    """

    version: int
    buildings: tuple[Building, ...]
    floors: tuple[Floor, ...]
    units: tuple[Unit, ...]
    residents: tuple[Resident, ...]
    cards: tuple[Card, ...]
    phone_credentials: tuple[PhoneCredential, ...]
    access_groups: tuple[AccessGroup, ...]
    visitor_passes: tuple[VisitorPass, ...]
    secrets: Mapping[str, bytes] = field(repr=False)
    # The parts actually read; the tuples of the other parts are empty, not "no rows".
    parts: frozenset[str] = ALL_PARTS


@dataclass(frozen=True, slots=True)
class DirectoryDelta:
    """Rows re-read one by one: changed cards, and every phone of the residents concerned."""

    cards: tuple[Card, ...] = ()
    phone_residents: frozenset[str] = frozenset()  # all their phones are in phone_credentials
    phone_credentials: tuple[PhoneCredential, ...] = ()
    secrets: Mapping[str, bytes] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """What to reload after a version: whole parts, and single cards and phones.

    `residents` lists moved-out residents whose cards and phones are reloaded row by row.
    """

    parts: frozenset[str]
    cards: frozenset[tuple[str, str]] = frozenset()  # (kind, card number)
    phones: frozenset[str] = frozenset()  # credential ids
    residents: frozenset[str] = frozenset()


MAX_ROW_CHANGES = 1000  # beyond this (an import), whole parts reload faster than rows


def pending_changes(conn: Connection, since: int) -> ChangeSet:
    """What changed after version `since`; everything when the log no longer reaches back
    to it (someone pruned it).
    """
    oldest = conn.execute(select(func.min(directory_changes.c.change_id))).scalar()
    if since <= 0 or oldest is None or oldest > since + 1:
        return ChangeSet(ALL_PARTS)
    rows = conn.execute(select(directory_changes.c.what, directory_changes.c.subject)
                        .where(directory_changes.c.change_id > since)
                        .limit(MAX_ROW_CHANGES + 1)).all()
    if len(rows) > MAX_ROW_CHANGES:
        whats = conn.execute(select(directory_changes.c.what).distinct()
                             .where(directory_changes.c.change_id > since)).scalars()
        return ChangeSet(frozenset().union(*(CHANGE_PARTS.get(w, ALL_PARTS) for w in whats)))
    parts: set[str] = set()
    cards: set[tuple[str, str]] = set()
    phones: set[str] = set()
    moved_out: set[str] = set()
    for what, subject in rows:
        if subject and what in ("card.issue", "card.revoke"):
            kind, _, number = subject.partition(":")
            cards.add((kind, number))
        elif subject and what in ("credential.enrol", "credential.revoke"):
            phones.add(subject)
        elif subject and what == "resident.move_out":
            moved_out.add(subject)
            parts.update(("people", "passes"))
        else:
            parts.update(CHANGE_PARTS.get(what, ALL_PARTS))
    return ChangeSet(
        frozenset(parts),
        frozenset() if "cards" in parts else frozenset(cards),
        frozenset() if "phones" in parts else frozenset(phones),
        frozenset() if {"cards", "phones"} <= parts else frozenset(moved_out),
    )


def load_snapshot(conn: Connection, parts: Iterable[str] = ALL_PARTS) -> DirectorySnapshot:
    """Read the directory, or only some parts of it; run it in one transaction (REPEATABLE
    READ on PostgreSQL) so the parts and the version agree.

    The version is read first: a change committed while the tables are read bumps the
    version past it, so the watcher reloads again rather than keep a torn snapshot.
    """
    wanted = frozenset(parts)
    if not wanted <= ALL_PARTS:
        raise ValueError(f"unknown snapshot parts {sorted(wanted - ALL_PARTS)}")
    version = directory_version(conn)

    def rows_of(part: str, cls: type[T], table: Table, *order: Any) -> tuple[T, ...]:
        if part not in wanted:
            return ()
        # Positional rows in dataclass field order: 60,000 cards in ~0.1 s, where mappings
        # and keyword construction took three times as long.
        columns = [table.c[f.name] for f in fields(cls)]  # type: ignore[arg-type]
        return tuple(starmap(cls, conn.execute(select(*columns).order_by(*order)).all()))

    secrets: dict[str, bytes] = {}
    for part, table in (("phones", phone_credentials), ("passes", visitor_passes)):
        if part in wanted:
            secrets.update((cid, bytes(secret)) for cid, secret in conn.execute(
                select(table.c.credential_id, table.c.secret)).all())
    people = "people" in wanted
    return DirectorySnapshot(
        version=version,
        buildings=rows_of("places", Building, buildings, buildings.c.building_id),
        floors=rows_of("places", Floor, floors, floors.c.building_id, floors.c.number),
        units=rows_of("people", Unit, units),
        residents=rows_of("people", Resident, residents),
        cards=rows_of("cards", Card, cards),
        phone_credentials=rows_of("phones", PhoneCredential, phone_credentials),
        access_groups=tuple(load_access_groups(conn)) if people else (),
        visitor_passes=tuple(load_visitor_passes(conn)) if "passes" in wanted else (),
        secrets=secrets,
        parts=wanted,
    )


def load_delta(conn: Connection, changes: ChangeSet) -> DirectoryDelta:
    """The current rows of the cards and phones `changes` names, for an incremental index."""
    card_rows: tuple[Card, ...] = ()
    if changes.cards or changes.residents:
        numbers = sorted({number for _, number in changes.cards})
        query = select(*[cards.c[f.name] for f in fields(Card)]).where(or_(
            cards.c.card_number.in_(numbers), cards.c.resident_id.in_(sorted(changes.residents))))
        card_rows = tuple(card for card in starmap(Card, conn.execute(query).all())
                          if (card.kind, card.card_number) in changes.cards
                          or card.resident_id in changes.residents)
    owners = set(changes.residents)
    if changes.phones:
        owners.update(conn.execute(select(phone_credentials.c.resident_id).where(
            phone_credentials.c.credential_id.in_(sorted(changes.phones)))).scalars())
    phones: list[PhoneCredential] = []
    secrets: dict[str, bytes] = {}
    if owners:
        columns = [phone_credentials.c[f.name] for f in fields(PhoneCredential)]
        query = select(*columns, phone_credentials.c.secret).where(
            phone_credentials.c.resident_id.in_(sorted(owners)))
        for *row, secret in conn.execute(query).all():
            phones.append(PhoneCredential(*row))
            secrets[phones[-1].credential_id] = bytes(secret)
    return DirectoryDelta(card_rows, frozenset(owners), tuple(phones), secrets)
