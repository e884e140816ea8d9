"""The access decision: a pure function of the index, the reader, the credential and the time.

One phone credential stands in for every card a resident used to carry: what it resolves
to depends on the reader's kind (gate -> unlock, elevator -> the floors this person may
reach, canteen -> their purse). Rights are the resident's defaults (site gates, their own
building's doors, their home floor plus the building's public floors) plus their access
groups during the groups' weekly windows. A visitor pass delegates part of its issuer's
rights and never more than the issuer holds at that moment.

Order of checks: shape -> authenticity -> time -> revocation -> rights. A forged token is
reported as `invalid_token` even when it names a revoked or expired credential, so a guess
learns nothing. Single use is the one thing a pure function cannot decide: a decision on
an authentic token carries it in `consume`, and the caller (AccessService) marks it used
in the site's ReplayGuard, turning a second presentation into `replayed_token`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from device_drivers.tokens import ParsedToken, check, parse_ble_hex, parse_qr
from device_drivers.vocabulary import CREDENTIAL_TYPES, READER_KINDS, Credential, Reason
from gateway.access.index import DirectoryIndex, PassEntry, ResidentEntry

_CARD_NUMBER = re.compile(r"^[\x21-\x7e]{1,64}$")
_MAX_TOKEN_TEXT = 128


@dataclass(frozen=True, slots=True)
class Reader:
    """A reader as the decision needs it; built from the site configuration.

    `building_id`: the building whose door (gate) or car (elevator) this is; None for the
    site's perimeter gates. `gate_ids`: what access groups and visitor passes name; empty
    means the device id. A `restricted` gate (gym, machine room) opens only through a group
    or a pass, not for every resident.
    """

    device_id: str
    kind: str
    building_id: str | None = None
    gate_ids: frozenset[str] = frozenset()
    restricted: bool = False
    duration_s: int = 5

    def __post_init__(self) -> None:
        if self.kind not in READER_KINDS:
            raise ValueError(f"reader kind must be one of {READER_KINDS}, got {self.kind!r}")
        if self.kind == "elevator" and self.building_id is None:
            raise ValueError(f"elevator reader {self.device_id!r} needs a building_id")
        if not self.gate_ids:
            object.__setattr__(self, "gate_ids", frozenset({self.device_id}))


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The answer, plus what the audit log needs; never a token or a secret.

    `credential_ref` is the phone/pass credential id or the card number. `account` is the
    canteen purse (the resident id) at canteen readers. `consume` is the authentic token to
    mark used; AccessService strips it before the decision leaves the service.
    """

    granted: bool
    action: str  # "unlock" | "enable_floors" | "none"
    floors: tuple[int, ...] | None
    reason: Reason | None
    duration_s: int
    resident_id: str | None
    credential_ref: str | None
    credential_type: str
    account: str | None = None
    visitor_pass_id: str | None = None
    consume: ParsedToken | None = field(default=None, repr=False, compare=False)


def _deny(reason: Reason, ctype: str, ref: str | None = None, resident_id: str | None = None,
          consume: ParsedToken | None = None, pass_id: str | None = None) -> AccessDecision:
    return AccessDecision(False, "none", None, reason, 0, resident_id, ref, ctype,
                          visitor_pass_id=pass_id, consume=consume)


def replayed(decision: AccessDecision) -> AccessDecision:
    """The decision to send instead when `decision.consume` had been used before."""
    return _deny(Reason.REPLAYED_TOKEN, decision.credential_type, decision.credential_ref,
                 decision.resident_id, pass_id=decision.visitor_pass_id)


class _Clock:
    """Site-local weekday and minute, computed only if a schedule is actually consulted."""

    __slots__ = ("_index", "_local", "_now")

    def __init__(self, index: DirectoryIndex, now: float) -> None:
        self._index, self._now = index, now
        self._local: tuple[int, int] | None = None

    def in_any(self, windows: tuple[tuple[int, int, int], ...]) -> bool:
        if not windows:
            return True
        if self._local is None:
            local = datetime.fromtimestamp(self._now, self._index.timezone)
            self._local = (local.weekday(), local.hour * 60 + local.minute)
        weekday, minute = self._local
        return any(d == weekday and start <= minute < end for d, start, end in windows)


def _gate_rights(reader: Reader, resident: ResidentEntry, clock: _Clock) -> Reason | None:
    """None when the resident may pass this gate now, else why not."""
    if not reader.restricted and reader.building_id in (None, resident.building_id):
        return None
    reason = Reason.NOT_PERMITTED
    for group in resident.groups:
        if not group.gate_ids.isdisjoint(reader.gate_ids):
            if clock.in_any(group.windows):
                return None
            reason = Reason.OUTSIDE_SCHEDULE
    return reason


def _personal_floors(reader: Reader, resident: ResidentEntry,
                     clock: _Clock) -> tuple[set[int], Reason]:
    """The non-public floors the resident may reach in this car now, and why none if so."""
    building = reader.building_id
    floors: set[int] = set()
    if resident.building_id == building and resident.home_floor is not None:
        floors.add(resident.home_floor)
    reason = Reason.NOT_PERMITTED
    for group in resident.groups:
        group_floors = group.floors.get(building) if building is not None else None
        if group_floors:
            if clock.in_any(group.windows):
                floors |= group_floors
            else:
                reason = Reason.OUTSIDE_SCHEDULE
    return floors, reason


def _grant_floors(index: DirectoryIndex, reader: Reader, floors: set[int]) -> tuple[int, ...]:
    public = index.public_floors.get(reader.building_id or "", frozenset())
    return tuple(sorted(floors | public))


def _resident_decision(index: DirectoryIndex, reader: Reader, resident: ResidentEntry,
                       clock: _Clock, ctype: str, ref: str | None,
                       consume: ParsedToken | None) -> AccessDecision:
    rid = resident.resident_id
    if reader.kind == "gate":
        reason = _gate_rights(reader, resident, clock)
        if reason is not None:
            return _deny(reason, ctype, ref, rid, consume)
        return AccessDecision(True, "unlock", None, None, reader.duration_s, rid, ref, ctype,
                              consume=consume)
    if reader.kind == "elevator":
        floors, reason = _personal_floors(reader, resident, clock)
        if not floors:
            return _deny(reason, ctype, ref, rid, consume)
        return AccessDecision(True, "enable_floors", _grant_floors(index, reader, floors), None,
                              reader.duration_s, rid, ref, ctype, consume=consume)
    return AccessDecision(True, "none", None, None, 0, rid, ref, ctype, account=rid,
                          consume=consume)


def _visitor_decision(index: DirectoryIndex, reader: Reader, visit: PassEntry,
                      issuer: ResidentEntry, clock: _Clock, now: float, used: int, ctype: str,
                      ref: str, consume: ParsedToken) -> AccessDecision:
    def deny(reason: Reason) -> AccessDecision:
        return _deny(reason, ctype, ref, issuer.resident_id, consume, visit.pass_id)

    if not visit.valid_from <= now < visit.valid_until:
        return deny(Reason.OUTSIDE_SCHEDULE)
    if used >= visit.max_uses or reader.kind == "canteen":
        return deny(Reason.NOT_PERMITTED)
    if reader.kind == "gate":
        if visit.gate_ids and visit.gate_ids.isdisjoint(reader.gate_ids):
            return deny(Reason.NOT_PERMITTED)
        reason = _gate_rights(reader, issuer, clock)
        if reason is not None:
            return deny(reason)
        return AccessDecision(True, "unlock", None, None, reader.duration_s, issuer.resident_id,
                              ref, ctype, visitor_pass_id=visit.pass_id, consume=consume)
    if visit.floor is None or visit.building_id is None or visit.building_id != reader.building_id:
        return deny(Reason.NOT_PERMITTED)
    public = index.public_floors.get(visit.building_id, frozenset())
    if visit.floor not in public:
        issuer_floors, reason = _personal_floors(reader, issuer, clock)
        if visit.floor not in issuer_floors:
            return deny(reason)
    return AccessDecision(True, "enable_floors", _grant_floors(index, reader, {visit.floor}), None,
                          reader.duration_s, issuer.resident_id, ref, ctype,
                          visitor_pass_id=visit.pass_id, consume=consume)


def decide(index: DirectoryIndex, reader: Reader, credential: Credential, now: float,
           pass_uses: Mapping[str, int] | None = None) -> AccessDecision:
    """Decide one presentation; `pass_uses` are visitor-pass uses counted since the snapshot."""
    ctype, value = credential.type, credential.value
    if ctype not in CREDENTIAL_TYPES or not isinstance(ctype, str) or not isinstance(value, str):
        return _deny(Reason.MALFORMED_REQUEST, ctype if isinstance(ctype, str) and
                     ctype in CREDENTIAL_TYPES else "invalid")
    clock = _Clock(index, now)
    if ctype == "card":
        if not _CARD_NUMBER.match(value):
            return _deny(Reason.MALFORMED_REQUEST, ctype)
        card = index.cards.get(reader.kind, {}).get(value)
        if card is None:
            elsewhere = any(value in by_number for kind, by_number in index.cards.items()
                            if kind != reader.kind)
            return _deny(Reason.NOT_PERMITTED if elsewhere else Reason.UNKNOWN_CARD, ctype, value)
        holder = index.active_resident(card.resident_id)
        if card.revoked or holder is None:
            return _deny(Reason.REVOKED, ctype, value, card.resident_id)
        return _resident_decision(index, reader, holder, clock, ctype, value, None)

    if not value or len(value) > _MAX_TOKEN_TEXT:
        return _deny(Reason.MALFORMED_REQUEST, ctype)
    token = parse_qr(value) if ctype == "qr" else parse_ble_hex(value)
    if token is None:
        return _deny(Reason.INVALID_TOKEN, ctype)
    entry = index.credential(token.credential_id)
    if entry is None:
        return _deny(Reason.INVALID_TOKEN, ctype)
    ref = entry.credential_id
    error = check(token, entry.secret, now)
    if error is not None:
        return _deny(Reason(error.value), ctype, ref)
    holder = index.active_resident(entry.resident_id)
    visit = entry.visitor_pass
    if entry.revoked or holder is None:
        return _deny(Reason.REVOKED, ctype, ref, entry.resident_id,
                     pass_id=visit.pass_id if visit is not None else None)
    if visit is not None:
        used = max(visit.uses, pass_uses.get(visit.pass_id, 0) if pass_uses else 0)
        return _visitor_decision(index, reader, visit, holder, clock, now, used, ctype, ref, token)
    return _resident_decision(index, reader, holder, clock, ctype, ref, token)


def decide_for_resident(index: DirectoryIndex, reader: Reader, resident_id: str,
                        now: float) -> AccessDecision:
    """The same rights for a logged-in resident using the app (remote unlock, elevator call)."""
    resident = index.active_resident(resident_id)
    if resident is None:
        return _deny(Reason.REVOKED, "app", None, resident_id)
    return _resident_decision(index, reader, resident, _Clock(index, now), "app", None, None)


def without_token(decision: AccessDecision) -> AccessDecision:
    return replace(decision, consume=None) if decision.consume is not None else decision
