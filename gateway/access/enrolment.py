"""Staff actions on credentials that the audit log records with who did them.

A card added to a resident by staff is as good as a key: it opens that resident's gates or
pays from their purse. So issuing one is written to the hash-chained audit log, with the
staff member's username as `actor`, in the same transaction as the card itself: there is no
card without its audit row, and no audit row for a card that was refused.

A card number already held by another resident, of any kind, is refused: one physical card
carries one number, so the same number on two residents means a copied or mistyped card,
and staff would otherwise be able to point a card they hold at someone else's purse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, select

from gateway.access.audit import AuditEntry, append_entries, audit_log
from gateway.store import directory as d

STAFF_DEVICE = "api"  # audit rows of staff actions: device_id, device_kind
STAFF_KIND = "staff"
ENROL_CARD = "enrol_card"


@dataclass(frozen=True, slots=True)
class Enrolment:
    """One audited card enrolment as the resident's page shows it."""

    kind: str
    card_number: str
    actor: str | None
    ts: float


def _holders(conn: Connection, card_number: str) -> list[d.Card]:
    """Every card row with this number, whatever its kind."""
    return [d.get_card(conn, kind, card_number) for (kind,) in conn.execute(
        select(d.cards.c.kind).where(d.cards.c.card_number == card_number)).all()]


def issue_card_audited(conn: Connection, resident_id: str, kind: str, card_number: str, *,
                       actor: str, now: float | None = None) -> d.Card:
    """`directory.issue_card`, plus its audit row naming `actor`, in the caller's transaction.

    Raises what `issue_card` raises (DirectoryError, NotFound, Conflict), and Conflict when
    another resident holds a card with this number, and then writes nothing. Re-issuing a
    card the resident already holds records nothing new.
    """
    now = time.time() if now is None else now
    holders = _holders(conn, card_number) if isinstance(card_number, str) else []
    if any(card.resident_id != resident_id for card in holders):
        raise d.Conflict(f"card number {card_number!r} already belongs to another resident; "
                         "a card is never shared or moved: revoke it there and issue a new "
                         "card")
    existing = next((card for card in holders if card.kind == kind), None)
    card = d.issue_card(conn, resident_id, kind, card_number, now=now)
    if existing is None:
        append_entries(conn, [AuditEntry(
            ts=now, device_id=STAFF_DEVICE, device_kind=STAFF_KIND, granted=True,
            action=ENROL_CARD, credential_type="card", credential_ref=card_number,
            resident_id=resident_id, request_id=f"{kind}:{card_number}", actor=actor,
        )])
    return card


def card_enrolments(conn: Connection, resident_id: str) -> list[Enrolment]:
    """The resident's audited card enrolments, oldest first (cards imported or seeded
    outside the API have none)."""
    a = audit_log.c
    rows = conn.execute(select(a.request_id, a.credential_ref, a.actor, a.ts).where(
        a.resident_id == resident_id, a.action == ENROL_CARD,
        a.device_kind == STAFF_KIND).order_by(a.id)).all()
    return [Enrolment(kind=str(request_id).split(":", 1)[0], card_number=str(ref),
                      actor=actor, ts=float(ts))
            for request_id, ref, actor, ts in rows]
