"""The in-memory index the access decision reads: every lookup is one or two dict hits.

An index is never mutated. A change in the store produces a new index that replaces the old
one with a single assignment, so a decision always sees one consistent version. The new
index rebuilds only the snapshot parts a change touched and shares the others' dicts with
its predecessor; a changed card or phone only patches a copy of its dict (a lost card costs
a 60,000-entry dict copy, ~2 ms, not a reload). For that, entries refer to each other by
id rather than by object, and revocation through a moved-out holder is checked at decision
time (one more dict hit) instead of being folded into every card at build time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, tzinfo

from gateway.store.directory import ALL_PARTS, DirectoryDelta, DirectorySnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupEntry:
    group_id: str
    gate_ids: frozenset[str]
    floors: Mapping[str, frozenset[int]]  # building id -> floors
    windows: tuple[tuple[int, int, int], ...]  # (weekday, start_minute, end_minute); () = always


@dataclass(frozen=True, slots=True)
class ResidentEntry:
    resident_id: str
    building_id: str | None  # None only for a resident whose unit is missing (never active)
    home_floor: int | None
    active: bool  # False once moved out
    groups: tuple[GroupEntry, ...]


@dataclass(frozen=True, slots=True)
class CardEntry:
    card_number: str
    resident_id: str
    revoked: bool  # the card itself; the holder's move-out is checked at decision time


@dataclass(frozen=True, slots=True)
class PassEntry:
    pass_id: str
    credential_id: str
    issuer_id: str
    gate_ids: frozenset[str]  # empty = the gates the issuer passes by default
    building_id: str | None
    floor: int | None
    valid_from: float
    valid_until: float
    max_uses: int
    uses: int
    revoked: bool


@dataclass(frozen=True, slots=True)
class CredentialEntry:
    """A phone credential or a visitor pass's; `resident_id` is the holder or the issuer."""

    credential_id: str
    secret: bytes = field(repr=False)
    resident_id: str
    revoked: bool
    visitor_pass: PassEntry | None = None


@dataclass(frozen=True, slots=True)
class DirectoryIndex:
    version: int
    timezone: tzinfo
    public_floors: Mapping[str, frozenset[int]]  # part "places": building id -> floors
    residents: Mapping[str, ResidentEntry]  # part "people"
    cards: Mapping[str, Mapping[str, CardEntry]]  # part "cards": kind -> number -> entry
    credentials: Mapping[str, CredentialEntry]  # part "phones"
    # Part "phones": each resident's unrevoked phone credential ids, oldest first.
    phones_of: Mapping[str, tuple[str, ...]]
    visitor_passes: Mapping[str, PassEntry]  # part "passes", by pass id
    visitor_credentials: Mapping[str, CredentialEntry]  # part "passes", by credential id

    def active_resident(self, resident_id: str) -> ResidentEntry | None:
        resident = self.residents.get(resident_id)
        return resident if resident is not None and resident.active else None

    def credential(self, credential_id: str) -> CredentialEntry | None:
        entry = self.credentials.get(credential_id)
        return entry if entry is not None else self.visitor_credentials.get(credential_id)

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "residents": len(self.residents),
            "cards": sum(len(by_number) for by_number in self.cards.values()),
            "credentials": len(self.credentials),
            "visitor_passes": len(self.visitor_passes),
        }


def empty_index(timezone: tzinfo = UTC) -> DirectoryIndex:
    return DirectoryIndex(0, timezone, {}, {}, {}, {}, {}, {}, {})


def _public_floors(snapshot: DirectorySnapshot) -> dict[str, frozenset[int]]:
    public: dict[str, set[int]] = defaultdict(set)
    for floor in snapshot.floors:
        if floor.public:
            public[floor.building_id].add(floor.number)
    return {building: frozenset(numbers) for building, numbers in public.items()}


def _residents(snapshot: DirectorySnapshot) -> dict[str, ResidentEntry]:
    groups_of: dict[str, list[GroupEntry]] = defaultdict(list)
    for group in snapshot.access_groups:
        group_floors: dict[str, set[int]] = defaultdict(set)
        for building_id, number in group.floors:
            group_floors[building_id].add(number)
        entry = GroupEntry(
            group.group_id,
            frozenset(group.gate_ids),
            {b: frozenset(n) for b, n in group_floors.items()},
            tuple((w.weekday, w.start_minute, w.end_minute) for w in group.windows),
        )
        for resident_id in group.member_ids:
            groups_of[resident_id].append(entry)
    homes = {u.unit_id: (u.building_id, u.floor) for u in snapshot.units}
    residents = {}
    for r in snapshot.residents:
        home = homes.get(r.unit_id)
        residents[r.resident_id] = ResidentEntry(
            r.resident_id, home[0] if home else None, home[1] if home else None,
            r.moved_out_at is None and home is not None, tuple(groups_of.get(r.resident_id, ())))
    return residents


def _cards(snapshot: DirectorySnapshot) -> dict[str, dict[str, CardEntry]]:
    cards: dict[str, dict[str, CardEntry]] = defaultdict(dict)
    for card in snapshot.cards:
        cards[card.kind][card.card_number] = CardEntry(
            card.card_number, card.resident_id, card.revoked_at is not None)
    return dict(cards)


def _phones(snapshot: DirectorySnapshot) -> tuple[Mapping[str, CredentialEntry],
                                                  Mapping[str, tuple[str, ...]]]:
    credentials: dict[str, CredentialEntry] = {}
    usable: dict[str, list[str]] = defaultdict(list)
    for cred in sorted(snapshot.phone_credentials, key=lambda c: c.enrolled_at):
        revoked = cred.revoked_at is not None
        credentials[cred.credential_id] = CredentialEntry(
            cred.credential_id, snapshot.secrets[cred.credential_id], cred.resident_id, revoked)
        if not revoked:
            usable[cred.resident_id].append(cred.credential_id)
    return credentials, {rid: tuple(ids) for rid, ids in usable.items()}


def _passes(snapshot: DirectorySnapshot) -> tuple[Mapping[str, PassEntry],
                                                  Mapping[str, CredentialEntry]]:
    passes: dict[str, PassEntry] = {}
    credentials: dict[str, CredentialEntry] = {}
    for vp in snapshot.visitor_passes:
        entry = PassEntry(vp.pass_id, vp.credential_id, vp.issued_by, frozenset(vp.gate_ids),
                          vp.building_id, vp.floor, vp.valid_from, vp.valid_until, vp.max_uses,
                          vp.uses, vp.revoked_at is not None)
        passes[vp.pass_id] = entry
        credentials[vp.credential_id] = CredentialEntry(
            vp.credential_id, snapshot.secrets[vp.credential_id], vp.issued_by, entry.revoked,
            entry)
    return passes, credentials


def _patch_cards(cards: Mapping[str, Mapping[str, CardEntry]],
                 delta: DirectoryDelta) -> Mapping[str, Mapping[str, CardEntry]]:
    if not delta.cards:
        return cards
    patched = {kind: by_number for kind, by_number in cards.items()}
    copied: dict[str, dict[str, CardEntry]] = {}
    for card in delta.cards:
        if card.kind not in copied:
            copied[card.kind] = dict(cards.get(card.kind, {}))
            patched[card.kind] = copied[card.kind]
        copied[card.kind][card.card_number] = CardEntry(
            card.card_number, card.resident_id, card.revoked_at is not None)
    return patched


def _patch_phones(previous: DirectoryIndex, delta: DirectoryDelta) -> tuple[
        Mapping[str, CredentialEntry], Mapping[str, tuple[str, ...]]]:
    if not delta.phone_residents:
        return previous.credentials, previous.phones_of
    credentials = dict(previous.credentials)
    phones_of = dict(previous.phones_of)
    usable: dict[str, list[str]] = {rid: [] for rid in delta.phone_residents}
    for cred in sorted(delta.phone_credentials, key=lambda c: c.enrolled_at):
        revoked = cred.revoked_at is not None
        credentials[cred.credential_id] = CredentialEntry(
            cred.credential_id, delta.secrets[cred.credential_id], cred.resident_id, revoked)
        if not revoked:
            usable[cred.resident_id].append(cred.credential_id)
    for resident_id, ids in usable.items():
        if ids:
            phones_of[resident_id] = tuple(ids)
        else:
            phones_of.pop(resident_id, None)
    return credentials, phones_of


def build_index(snapshot: DirectorySnapshot, timezone: tzinfo = UTC,
                previous: DirectoryIndex | None = None,
                delta: DirectoryDelta | None = None) -> DirectoryIndex:
    """The index for `snapshot`; parts it did not read come from `previous`, patched with
    the single rows in `delta`.

    Dangling ids (a card whose resident is missing) are not errors: they resolve to no
    active resident, so a torn read can only ever deny, never grant.
    """
    parts = snapshot.parts
    if previous is None:
        if parts != ALL_PARTS:
            raise ValueError("a partial snapshot needs the previous index to complete it")
        previous = empty_index(timezone)
    delta = delta or DirectoryDelta()
    if "cards" in parts:
        cards: Mapping[str, Mapping[str, CardEntry]] = _cards(snapshot)
    else:
        cards = _patch_cards(previous.cards, delta)
    phones = _phones(snapshot) if "phones" in parts else _patch_phones(previous, delta)
    passes = _passes(snapshot) if "passes" in parts else (previous.visitor_passes,
                                                          previous.visitor_credentials)
    return DirectoryIndex(
        version=snapshot.version,
        timezone=timezone,
        public_floors=_public_floors(snapshot) if "places" in parts else previous.public_floors,
        residents=_residents(snapshot) if "people" in parts else previous.residents,
        cards=cards,
        credentials=phones[0],
        phones_of=phones[1],
        visitor_passes=passes[0],
        visitor_credentials=passes[1],
    )
