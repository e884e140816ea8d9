"""Staff actions on credentials that the audit log records with who did them.

A card added to a resident by staff is as good as a key: it opens that resident's gates or
pays from their purse. So issuing one is written to the hash-chained audit log, with the
staff member's username as `actor`, in the same transaction as the card itself: there is no
card without its audit row, and no audit row for a card that was refused.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection

from gateway.access.audit import AuditEntry, append_entries
from gateway.store import directory as d

STAFF_DEVICE = "api"  # audit rows of staff actions: device_id, device_kind
STAFF_KIND = "staff"
ENROL_CARD = "enrol_card"


def issue_card_audited(conn: Connection, resident_id: str, kind: str, card_number: str, *,
                       actor: str, now: float | None = None) -> d.Card:
    """`directory.issue_card`, plus its audit row naming `actor`, in the caller's transaction.

    Raises what `issue_card` raises (DirectoryError, NotFound, Conflict) and then writes
    nothing. Re-issuing a card the resident already holds records nothing new.
    """
    now = time.time() if now is None else now
    try:
        existing: d.Card | None = d.get_card(conn, kind, card_number)
    except d.NotFound:
        existing = None
    card = d.issue_card(conn, resident_id, kind, card_number, now=now)
    if existing is None:
        append_entries(conn, [AuditEntry(
            ts=now, device_id=STAFF_DEVICE, device_kind=STAFF_KIND, granted=True,
            action=ENROL_CARD, credential_type="card", credential_ref=card_number,
            resident_id=resident_id, request_id=f"{kind}:{card_number}", actor=actor,
        )])
    return card
