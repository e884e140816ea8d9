"""The durable spent-token record: a QR/BLE token opens once, everywhere, for good.

One row per authentic token ever presented, keyed by `ParsedToken.spent_key` (credential,
time step, nonce, kind; never the token, so the table holds nothing a reader could replay).
Every path writes it inside the transaction that records what the token did: an access
decision with its audit row before the answer is published (gateway.access.audit), a
payment with its ledger rows (gateway.canteen.ledger). The primary key makes the first
writer win on SQLite and PostgreSQL alike, so two gateway processes on one database, or one
process after a kill -9, can never both grant the same token.

A visitor-pass use is counted in the same transaction as the grant by a conditional
`UPDATE ... SET uses = uses + 1 WHERE uses < max_uses`: the row lock (PostgreSQL) or the
write lock (SQLite) orders two processes, and a pass with `max_uses` = 2 is granted at most
twice however many gateways race for it.

`use_ref` names the use (reader/request id, or terminal/txn id). A claim that finds its own
`use_ref` already there is the same use again: a payment retried after a crash (allowed:
the ledger makes the payment itself exactly-once), or a request that a second gateway on the
same broker is answering this very moment (that gateway stays silent instead of contradicting
the first). Rows are kept until no offline upload could bring the token back
(`RETAIN_S` after its time step) and then pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    String,
    Table,
    bindparam,
    delete,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from device_drivers.tokens import MAX_SKEW_STEPS, TIME_STEP_S
from gateway.store.directory_schema import visitor_passes
from gateway.store.metadata import metadata

log = logging.getLogger(__name__)

# An offline sale may be uploaded up to 7 days after it happened (gateway.canteen.policy
# MAX_BATCH_AGE_S) and is checked as of its own time; a day more covers clock skew.
RETAIN_S = 8 * 24 * 3600.0
# Two gateways on one broker both receive a request; the one that loses the claim stays
# silent when the winner claimed this very request within this many seconds.
PEER_WINDOW_S = 5.0
USE_REF_LEN = 200

spent_tokens = Table(
    "spent_tokens",
    metadata,
    Column("token_key", String(64), primary_key=True),
    Column("token_ts", Float, nullable=False, index=True),  # start of the token's step
    Column("spent_at", Float, nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("use_ref", String(USE_REF_LEN), nullable=False),
    Column("gw_instance", String(32), nullable=True),
)


class ClaimOutcome(StrEnum):
    FRESH = "fresh"  # first use: the decision stands
    SPENT = "spent"  # used before (another reader, process or lifetime): replayed_token
    EXHAUSTED = "exhausted"  # a visitor pass with no uses left: not_permitted
    PEER = "peer"  # another gateway claimed this very request a moment ago: stay silent


@dataclass(frozen=True, slots=True)
class TokenClaim:
    """One use of one token; `pass_id` is set for a granted visitor-pass use to count."""

    token_key: str
    token_ts: float
    device_id: str
    use_ref: str
    pass_id: str | None = None
    same_ref_is_ours: bool = False  # payments: a claim by the same txn is this payment's

    def __post_init__(self) -> None:
        if len(self.use_ref) > USE_REF_LEN:
            object.__setattr__(self, "use_ref", self.use_ref[:USE_REF_LEN])


_S = spent_tokens.c
EXISTING = select(_S.use_ref, _S.gw_instance, _S.spent_at).where(
    _S.token_key == bindparam("b_key"))
_COUNT_USE = (
    update(visitor_passes)
    .where(visitor_passes.c.pass_id == bindparam("b_pass"),
           visitor_passes.c.uses < visitor_passes.c.max_uses)
    .values(uses=visitor_passes.c.uses + 1)
)
_COUNT_USE_ANYWAY = (
    update(visitor_passes)
    .where(visitor_passes.c.pass_id == bindparam("b_pass"))
    .values(uses=visitor_passes.c.uses + 1)
)


def _build_insert(dialect_insert: Any) -> Any:
    """Built once per dialect: constructing the statement per call cost more than the
    SQLite work itself (like the ledger's, gateway.canteen.postings)."""
    return (dialect_insert(spent_tokens).values(
        token_key=bindparam("b_key"), token_ts=bindparam("b_ts"), spent_at=bindparam("b_at"),
        device_id=bindparam("b_device"), use_ref=bindparam("b_ref"),
        gw_instance=bindparam("b_instance"),
    ).on_conflict_do_nothing().returning(_S.token_key))


_INSERT = {"postgresql": _build_insert(pg_insert), "sqlite": _build_insert(sqlite_insert)}


def _insert_ignore(conn: Connection, token: TokenClaim, now: float,
                   instance: str | None) -> bool:
    """Insert unless the key is there; True when this call inserted it. (RETURNING, not
    rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT through SQLAlchemy.)"""
    statement = _INSERT["postgresql" if conn.dialect.name == "postgresql" else "sqlite"]
    return conn.execute(statement, {
        "b_key": token.token_key, "b_ts": token.token_ts, "b_at": now,
        "b_device": token.device_id, "b_ref": token.use_ref, "b_instance": instance,
    }).first() is not None


def claim(conn: Connection, token: TokenClaim, now: float, instance: str | None = None,
          *, decided: bool = False) -> ClaimOutcome:
    """Record one use inside the caller's transaction and say whether it may stand.

    `decided`: the answer was already sent (the database was unreachable then, and this is
    the spilled record catching up). The use is recorded whatever it finds; a token that
    turns out to have been used elsewhere meanwhile is logged as a double use.
    """
    inserted = _insert_ignore(conn, token, now, instance)
    outcome = ClaimOutcome.FRESH
    if not inserted:
        row = conn.execute(EXISTING, {"b_key": token.token_key}).first()
        same = row is not None and row.use_ref == token.use_ref
        if same and (token.same_ref_is_ours or decided):
            return ClaimOutcome.FRESH  # this very use, recorded before: count nothing twice
        if same and row is not None and row.gw_instance != instance and (
                now - float(row.spent_at) < PEER_WINDOW_S):
            return ClaimOutcome.PEER
        outcome = ClaimOutcome.SPENT
        if decided:
            log.error("token %s was used twice while the database was unreachable "
                      "(at %s and by %s)", token.token_key.split(":", 2)[1], token.device_id,
                      row.use_ref if row is not None else "?")
            return outcome
        return outcome
    if token.pass_id is not None:
        statement = _COUNT_USE_ANYWAY if decided else _COUNT_USE
        if conn.execute(statement, {"b_pass": token.pass_id}).rowcount == 0 and not decided:
            return ClaimOutcome.EXHAUSTED
    return outcome


def is_spent(conn: Connection, token_key: str) -> bool:
    return conn.execute(EXISTING, {"b_key": token_key}).first() is not None


PRUNE_CHUNK = 2000


def prune(conn: Connection, now: float) -> int:
    """Forget up to PRUNE_CHUNK tokens no path could accept any more, in the caller's
    transaction; returns how many went. Chunks keep the write lock short: a decision waits
    behind whoever holds it."""
    horizon = now - RETAIN_S - (MAX_SKEW_STEPS + 1) * TIME_STEP_S
    oldest = select(_S.token_key).where(_S.token_ts < horizon).limit(PRUNE_CHUNK)
    return int(conn.execute(delete(spent_tokens).where(_S.token_key.in_(
        oldest.scalar_subquery()))).rowcount or 0)
