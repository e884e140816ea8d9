"""Property test: random top-ups, payments, retries, refunds, batches and restarts against
an independent model of the purses, on both databases.

Invariants after every step: each journal's entries sum to zero, cached balances equal the
sum of entries, no purse is negative, money is conserved (the model and the database agree
on every purse), and every approved payment is in the ledger exactly once (refused: never).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from device_drivers.offline_sales import DEFAULT_LIMITS
from device_drivers.vocabulary import Reason
from gateway.canteen.ledger import (
    BatchPayment,
    IdempotencyConflict,
    Ledger,
    RefundRefused,
)
from gateway.canteen.tables import canteen_accounts, canteen_journal
from gateway.store.db import make_engine, upgrade

_examples = itertools.count()
PURSES = 3
amounts = st.integers(min_value=1, max_value=2500)
refusals = st.sampled_from([None, None, None, Reason.REVOKED, Reason.UNKNOWN_CARD])


@dataclass
class Expected:
    amount: int
    account: str | None
    wire: dict[str, object]
    debited: int
    online: bool


class LedgerMachine(RuleBasedStateMachine):
    url = ""  # set by the test on a subclass

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"e{next(_examples)}"
        self.engine = make_engine(self.url)
        self.ledger = Ledger(self.engine)
        self.balances: dict[str, int] = {}
        self.payments: dict[tuple[str, str], Expected] = {}
        self.refunded: dict[tuple[str, str], int] = {}
        self.keys: dict[str, tuple[object, ...]] = {}
        self.txns = itertools.count()

    def teardown(self) -> None:
        self.engine.dispose()

    def account(self, i: int) -> str:
        return f"{self.prefix}-r{i}"

    def terminal(self, i: int) -> str:
        return f"{self.prefix}-pos{i}"

    def new_key(self, key: tuple[str, str], amount: int, resolution: str | Reason,
                online: bool, over_limit: bool = False) -> Expected:
        """The model's decision for a payment seen for the first time."""
        if not isinstance(resolution, Reason) and over_limit:
            # Beyond the offline limit: nothing debited, the whole amount for staff review.
            limited: dict[str, object] = {
                "txn_id": key[1], "approved": False,
                "balance_cents": self.balances.get(resolution, 0),
                "reason": "offline_limit", "shortfall_cents": amount}
            return Expected(amount, resolution, limited, 0, online)
        if isinstance(resolution, Reason):
            wire: dict[str, object] = {"txn_id": key[1], "approved": False,
                                       "balance_cents": None, "reason": resolution.value}
            if not online:
                wire["shortfall_cents"] = amount
            return Expected(amount, None, wire, 0, online)
        balance = self.balances.get(resolution, 0)
        if balance >= amount:
            self.balances[resolution] = balance - amount
            wire = {"txn_id": key[1], "approved": True, "balance_cents": balance - amount,
                    "reason": None}
            return Expected(amount, resolution, wire, amount, online)
        wire = {"txn_id": key[1], "approved": False, "balance_cents": balance,
                "reason": "insufficient_funds"}
        if online:
            return Expected(amount, resolution, wire, 0, online)
        if balance:
            self.balances[resolution] = 0
        wire.update(balance_cents=0, shortfall_cents=amount - balance)
        return Expected(amount, resolution, wire, balance, online)

    def resolution(self, purse: int, refusal: Reason | None) -> str | Reason:
        # purse == PURSES is somebody without a purse (never topped up).
        return refusal if refusal is not None else self.account(purse)

    @rule(purse=st.integers(0, PURSES - 1), amount=amounts, reuse=st.booleans())
    def topup(self, purse: int, amount: int, reuse: bool) -> None:
        used = [k for k, v in self.keys.items() if v[0] == "topup"]
        if reuse and used:
            key = used[0]
            _, account, previous = self.keys[key]
            if (account, previous) != (self.account(purse), amount):
                with pytest.raises(IdempotencyConflict):
                    self.ledger.topup(self.account(purse), amount, key)
                return
            assert self.ledger.topup(self.account(purse), amount, key).replayed
            return
        key = f"{self.prefix}-topup-{len(self.keys)}"
        account = self.account(purse)
        receipt = self.ledger.topup(account, amount, key)
        self.balances[account] = self.balances.get(account, 0) + amount
        self.keys[key] = ("topup", account, amount)
        assert (receipt.balance_cents, receipt.replayed) == (self.balances[account], False)

    @rule(terminal=st.integers(0, 1), purse=st.integers(0, PURSES), amount=amounts,
          refusal=refusals, offline=st.booleans())
    def pay(self, terminal: int, purse: int, amount: int, refusal: Reason | None,
            offline: bool) -> None:
        key = (self.terminal(terminal), f"t-{next(self.txns)}")
        resolution = self.resolution(purse, refusal)
        result = self.ledger.pay(*key, amount, resolution, 1.0, offline=offline)
        expected = self.new_key(key, amount, resolution, not offline)
        self.payments[key] = expected
        assert result.to_wire() == expected.wire

    @precondition(lambda self: self.payments)
    @rule(data=st.data(), other_amount=st.booleans(), refusal=refusals)
    def retry(self, data: st.DataObject, other_amount: bool, refusal: Reason | None) -> None:
        key = data.draw(st.sampled_from(sorted(self.payments)))
        expected = self.payments[key]
        amount = expected.amount + 1 if other_amount else expected.amount
        # A retry's credential may no longer resolve (single-use token): irrelevant.
        result = self.ledger.pay(*key, amount, refusal or (expected.account or "x"), 2.0)
        if other_amount:
            assert (result.approved, result.reason) == (False, Reason.AMOUNT_MISMATCH)
        else:
            assert result.to_wire() == expected.wire

    @precondition(lambda self: any(e.debited for e in self.payments.values()))
    @rule(data=st.data(), fraction=st.floats(0.1, 1.2))
    def refund(self, data: st.DataObject, fraction: float) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, e in self.payments.items()
                                               if e.debited)))
        expected = self.payments[key]
        assert expected.account is not None
        left = expected.debited - self.refunded.get(key, 0)
        amount = max(1, int(expected.debited * fraction))
        refund_key = f"{self.prefix}-refund-{len(self.keys)}"
        if amount > left:
            with pytest.raises(RefundRefused):
                self.ledger.refund(expected.account, *key, amount, refund_key)
            return
        receipt = self.ledger.refund(expected.account, *key, amount, refund_key)
        self.keys[refund_key] = ("refund",)
        self.refunded[key] = self.refunded.get(key, 0) + amount
        self.balances[expected.account] += amount
        assert receipt.balance_cents == self.balances[expected.account]

    @rule(data=st.data(), terminal=st.integers(0, 1), size=st.integers(1, 6))
    def batch(self, data: st.DataObject, terminal: int, size: int) -> None:
        term = self.terminal(terminal)
        now = time.time()
        items: list[BatchPayment] = []
        for _ in range(size):
            known = [k for k in self.payments if k[0] == term]
            retry = bool(known) and data.draw(st.booleans())
            duplicate = bool(items) and data.draw(st.booleans())
            if retry:
                key = data.draw(st.sampled_from(sorted(known)))
                e = self.payments[key]
                items.append(BatchPayment(key[1], e.amount, e.account or Reason.REVOKED, now))
            elif duplicate:
                items.append(data.draw(st.sampled_from(items)))  # duplicate within the upload
            else:
                resolution = self.resolution(data.draw(st.integers(0, PURSES)),
                                             data.draw(refusals))
                items.append(BatchPayment(f"t-{next(self.txns)}", data.draw(amounts),
                                          resolution, now))
        results = self.ledger.apply_batch(term, f"b-{next(self.txns)}", items)
        expected: list[dict[str, object]] = []
        seen: set[str] = set()
        exposure: dict[str, int] = {}  # per card in this upload (no window: per batch)
        for item in items:
            if item.txn_id in seen:
                continue
            seen.add(item.txn_id)
            key = (term, item.txn_id)
            if key not in self.payments:
                card = (f"refused:{item.resolution}" if isinstance(item.resolution, Reason)
                        else item.resolution)
                over = exposure.get(card, 0) + item.amount_cents > DEFAULT_LIMITS.per_card_cents
                if not over:
                    exposure[card] = exposure.get(card, 0) + item.amount_cents
                self.payments[key] = self.new_key(key, item.amount_cents, item.resolution,
                                                  online=False, over_limit=over)
            expected.append(self.payments[key].wire)
        assert [r.to_wire() for r in results] == expected

    @rule()
    def restart(self) -> None:
        self.engine.dispose()
        self.engine = make_engine(self.url)
        self.ledger = Ledger(self.engine)

    @invariant()
    def ledger_is_sound(self) -> None:
        assert self.ledger.audit() == []
        j, a = canteen_journal.c, canteen_accounts.c
        with self.engine.connect() as conn:
            # Money is conserved: everything in purses came from @cash, and all accounts
            # together always sum to zero.
            assert conn.execute(select(func.sum(a.balance_cents))).scalar_one() == 0
            db_balances = dict(conn.execute(
                select(a.account_id, a.balance_cents)
                .where(a.account_id.like(f"{self.prefix}-%"))
            ).all())
            debits: dict[tuple[str, str], list[int]] = {}
            for terminal, txn, amount in conn.execute(
                select(j.terminal_id, j.txn_id, j.amount_cents)
                .where(j.kind == "payment", j.terminal_id.like(f"{self.prefix}-%"))
            ).all():
                debits.setdefault((terminal, txn), []).append(amount)
        assert db_balances == self.balances
        for key, expected in self.payments.items():
            assert debits.pop(key, []) == ([expected.debited] if expected.debited else [])
        assert debits == {}


@pytest.fixture
def migrated(database_url: str) -> Iterator[str]:
    upgrade(database_url)
    yield database_url


def test_ledger_state_machine(migrated: str) -> None:
    class Bound(LedgerMachine):
        url = migrated

    run_state_machine_as_test(
        Bound,
        settings=settings(max_examples=25, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
