"""The in-memory index the access decision reads: every lookup is one or two dict hits.

Built from a `DirectorySnapshot` in one pass and then never mutated; a change in the store
produces a whole new index that replaces the old one with a single assignment, so a
decision always sees one consistent version. Entries point at each other (a card at its
holder, a holder at its groups) instead of repeating ids, which keeps 60,000 cards in a
few megabytes. Revocation is folded in at build time: a card, phone or pass whose holder
moved out is stored as revoked, so the hot path checks one flag.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, tzinfo

from gateway.store.directory import DirectorySnapshot

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
    building_id: str | None  # None only for a resident whose unit is missing (never granted)
    home_floor: int | None
    active: bool
    groups: tuple[GroupEntry, ...]


@dataclass(frozen=True, slots=True)
class CardEntry:
    card_number: str
    holder: ResidentEntry
    revoked: bool


@dataclass(frozen=True, slots=True)
class PassEntry:
    pass_id: str
    credential_id: str
    issuer: ResidentEntry
    gate_ids: frozenset[str]  # empty = the gates the issuer passes by default
    building_id: str | None
    floor: int | None
    valid_from: float
    valid_until: float
    max_uses: int
    uses: int


@dataclass(frozen=True, slots=True)
class CredentialEntry:
    """A phone credential, or the credential of a visitor pass (then `holder` is the issuer)."""

    credential_id: str
    secret: bytes = field(repr=False)
    holder: ResidentEntry
    revoked: bool
    visitor_pass: PassEntry | None = None


@dataclass(frozen=True, slots=True)
class DirectoryIndex:
    version: int
    timezone: tzinfo
    residents: Mapping[str, ResidentEntry]
    cards: Mapping[str, Mapping[str, CardEntry]]  # card kind -> card number -> entry
    credentials: Mapping[str, CredentialEntry]
    # The resident's usable phone credential ids, oldest first (to mint QR codes for the app).
    active_credentials: Mapping[str, tuple[str, ...]]
    public_floors: Mapping[str, frozenset[int]]  # building id -> public floors
    visitor_passes: Mapping[str, PassEntry]

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "residents": len(self.residents),
            "cards": sum(len(by_number) for by_number in self.cards.values()),
            "credentials": len(self.credentials),
            "visitor_passes": len(self.visitor_passes),
        }


_NOWHERE = ResidentEntry("", None, None, False, ())


def empty_index(timezone: tzinfo = UTC) -> DirectoryIndex:
    return DirectoryIndex(0, timezone, {}, {}, {}, {}, {}, {})


def build_index(snapshot: DirectorySnapshot, timezone: tzinfo = UTC) -> DirectoryIndex:
    """One pass over the snapshot; dangling references become revoked entries, not errors.

    Foreign keys make dangling references impossible in a consistent snapshot; tolerating
    them anyway means a torn read can only ever deny, never grant.
    """
    public: dict[str, set[int]] = defaultdict(set)
    for floor in snapshot.floors:
        if floor.public:
            public[floor.building_id].add(floor.number)

    groups_of: dict[str, list[GroupEntry]] = defaultdict(list)
    for group in snapshot.access_groups:
        group_floors: dict[str, set[int]] = defaultdict(set)
        for building_id, number in group.floors:
            group_floors[building_id].add(number)
        group_entry = GroupEntry(
            group.group_id,
            frozenset(group.gate_ids),
            {b: frozenset(n) for b, n in group_floors.items()},
            tuple((w.weekday, w.start_minute, w.end_minute) for w in group.windows),
        )
        for resident_id in group.member_ids:
            groups_of[resident_id].append(group_entry)

    unit_home = {u.unit_id: (u.building_id, u.floor) for u in snapshot.units}
    residents: dict[str, ResidentEntry] = {}
    for r in snapshot.residents:
        home = unit_home.get(r.unit_id)
        residents[r.resident_id] = ResidentEntry(
            r.resident_id, home[0] if home else None, home[1] if home else None,
            r.moved_out_at is None and home is not None,
            tuple(groups_of.get(r.resident_id, ())),
        )

    cards: dict[str, dict[str, CardEntry]] = defaultdict(dict)
    for card in snapshot.cards:
        holder = residents.get(card.resident_id, _NOWHERE)
        cards[card.kind][card.card_number] = CardEntry(
            card.card_number, holder, card.revoked_at is not None or not holder.active)

    credentials: dict[str, CredentialEntry] = {}
    active: dict[str, list[str]] = defaultdict(list)
    for cred in sorted(snapshot.phone_credentials, key=lambda c: c.enrolled_at):
        holder = residents.get(cred.resident_id, _NOWHERE)
        revoked = cred.revoked_at is not None or not holder.active
        credentials[cred.credential_id] = CredentialEntry(
            cred.credential_id, snapshot.secrets[cred.credential_id], holder, revoked)
        if not revoked:
            active[cred.resident_id].append(cred.credential_id)

    passes: dict[str, PassEntry] = {}
    for vp in snapshot.visitor_passes:
        issuer = residents.get(vp.issued_by, _NOWHERE)
        entry = PassEntry(vp.pass_id, vp.credential_id, issuer, frozenset(vp.gate_ids),
                          vp.building_id, vp.floor, vp.valid_from, vp.valid_until, vp.max_uses,
                          vp.uses)
        passes[vp.pass_id] = entry
        if vp.credential_id in credentials:
            # 64 random bits make this a once-in-never event; denying both is the safe answer.
            log.error("credential id of visitor pass %s collides with a phone", vp.pass_id)
            credentials[vp.credential_id] = CredentialEntry(vp.credential_id, b"", issuer, True)
            continue
        credentials[vp.credential_id] = CredentialEntry(
            vp.credential_id, snapshot.secrets[vp.credential_id], issuer,
            vp.revoked_at is not None or not issuer.active, entry)

    return DirectoryIndex(
        version=snapshot.version,
        timezone=timezone,
        residents=residents,
        cards=dict(cards),
        credentials=credentials,
        active_credentials={k: tuple(v) for k, v in active.items()},
        public_floors={b: frozenset(n) for b, n in public.items()},
        visitor_passes=passes,
    )
