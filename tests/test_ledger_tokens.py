"""Canteen payment path hardening: durable single-use tokens, believable offline ts, ids
the database can store, and retries after a failed ledger write."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from device_drivers import tokens as cred
from device_drivers.mqtt_protocol import Malformed
from device_drivers.offline_sales import OfflineLimits
from device_drivers.vocabulary import Credential, Reason
from gateway.canteen import payments
from gateway.canteen.ledger import BatchPayment, Ledger
from gateway.canteen.payments import (
    MAX_BATCH_AGE_S,
    PaymentHandler,
    PaymentMessage,
    parse_payment_batch,
    parse_payment_request,
    token_key,
)
from gateway.canteen.policy import PaymentResult, validate_id
from gateway.canteen.tables import canteen_payments, canteen_shortfalls
from gateway.store.db import make_engine, upgrade
from simulators.canteen import CanteenTerminal
from tests.test_ledger_mqtt import Directory, request

NOW = 1_700_000_000.0


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def ledger(engine: Engine) -> Ledger:
    return Ledger(engine, OfflineLimits(per_card_cents=100_000, per_terminal_cents=1_000_000))


def batch(batch_id: str, *items: bytes | dict[str, Any]) -> bytes:
    payments = [json.loads(i) if isinstance(i, bytes) else i for i in items]
    return json.dumps({"batch_id": batch_id, "payments": payments}).encode()


def answer(raw: bytes | None) -> Any:
    assert raw is not None
    return json.loads(raw)


def results(raw: bytes | None) -> list[tuple[str, bool, str | None, int]]:
    return [(r["txn_id"], r["approved"], r["reason"], r.get("shortfall_cents", 0))
            for r in answer(raw)["results"]]


def stored_txns(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(canteen_payments.c.txn_id)).scalars())


# -- 1. a token pays once, durably ------------------------------------------------------

def test_a_token_key_identifies_a_token_without_holding_it() -> None:
    phone = Directory().phone
    qr, ble = phone.qr(NOW), phone.ble_token(NOW)
    parsed_qr, parsed_ble = cred.parse_qr(qr), cred.parse_bytes(ble)
    assert parsed_qr is not None and parsed_ble is not None
    qr_key = token_key(Credential("qr", qr))
    ble_key = token_key(Credential("ble", ble.hex()))
    assert qr_key == (f"qr:{phone.credential_id}:{cred.time_step(NOW)}:"
                      f"{parsed_qr.nonce.hex()}")
    assert ble_key is not None and ble_key.startswith(f"ble:{phone.credential_id}:")
    for key, token in ((qr_key, parsed_qr), (ble_key, parsed_ble)):
        assert len(key) <= 64 and token.tag.hex() not in key
    assert token_key(Credential("qr", qr)) == qr_key  # the same token, the same key
    assert token_key(Credential("qr", phone.qr(NOW))) != qr_key  # a fresh nonce
    assert token_key(Credential("card", "card-1")) is None
    assert token_key(Credential("qr", "SC1.garbage")) is None
    assert token_key(Credential("ble", qr)) is None


def test_a_token_spent_online_comes_back_in_an_offline_batch_as_a_shortfall(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.topup("r-1", 5000, "topup-key-1")
    directory = Directory()
    handler = PaymentHandler(ledger, directory.resolve)
    now = time.time()
    qr = directory.phone.qr()
    online = answer(handler.handle_request("pos-1", request("t-1", 1200, "qr", qr, now)))
    assert online["approved"] and online["balance_cents"] == 3800
    # Minutes later the replay guard has forgotten the token; the terminal uploads it again.
    directory.guard = cred.ReplayGuard()
    upload = batch("b-1", request("o-1", 1200, "qr", qr, now + 1),
                   request("o-2", 700, "card", "card-1", now + 2))
    assert results(handler.handle_batch("pos-2", upload)) == [
        ("o-1", False, "replayed_token", 1200), ("o-2", True, None, 0)]
    assert ledger.balance("r-1") == 3100
    # The same token online, under another txn_id, on another terminal: refused too.
    directory.guard = cred.ReplayGuard()
    again = answer(handler.handle_request("pos-3", request("t-9", 100, "qr", qr, now)))
    assert (again["approved"], again["reason"]) == (False, "replayed_token")
    with engine.connect() as conn:
        shortfalls = conn.execute(select(canteen_shortfalls.c.txn_id, canteen_shortfalls.c.reason,
                                         canteen_shortfalls.c.shortfall_cents)).all()
        keys = conn.execute(select(canteen_payments.c.txn_id, canteen_payments.c.token_key)
                            .order_by(canteen_payments.c.txn_id)).all()
    assert shortfalls == [("o-1", "replayed_token", 1200)]
    assert keys == [("o-1", None), ("o-2", None), ("t-1", token_key(Credential("qr", qr))),
                    ("t-9", None)]
    assert all(qr not in str(row) for row in keys)
    assert ledger.audit() == []


def test_the_ledger_refuses_a_second_payment_with_the_same_token_key(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.topup("r-1", 5000, "topup-key-1")
    first = ledger.pay("pos-1", "t-1", 1000, "r-1", NOW, token_key="qr:k1")
    assert first.approved
    assert ledger.pay("pos-1", "t-1", 1000, "r-1", NOW, token_key="qr:k1") == first
    assert ledger.pay("pos-2", "t-2", 1000, "r-1", NOW, token_key="qr:k1") == PaymentResult(
        "t-2", False, None, Reason.REPLAYED_TOKEN)
    # Within one upload, the second use of a token is the replay.
    sold = time.time()
    uploaded = ledger.apply_batch("pos-1", "b-1", [
        BatchPayment("o-1", 500, "r-1", sold, "ble:k2"),
        BatchPayment("o-2", 600, "r-1", sold, "ble:k2"),
    ])
    assert [(r.approved, r.reason, r.shortfall_cents) for r in uploaded] == [
        (True, None, 0), (False, Reason.REPLAYED_TOKEN, 600)]
    # A token refused before it resolved (forged, expired) burns nothing.
    refused = ledger.pay("pos-1", "t-3", 100, Reason.INVALID_TOKEN, NOW, token_key="qr:k3")
    assert refused.reason is Reason.INVALID_TOKEN
    assert ledger.pay("pos-1", "t-4", 100, "r-1", NOW, token_key="qr:k3").approved
    assert ledger.balance("r-1") == 3400
    # The unique index holds even against a writer that skips the check.
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert(canteen_payments).values(
            terminal_id="pos-9", txn_id="x", amount_cents=1, account_id="r-1", offline=False,
            request_ts=NOW, status="refused", reason="insufficient_funds", debited_cents=0,
            shortfall_cents=0, posted_at=NOW, token_key="qr:k1"))
    assert ledger.audit() == []


def test_racing_payments_with_one_token_debit_once(ledger: Ledger) -> None:
    ledger.topup("r-1", 50_000, "topup-key-1")
    start = threading.Barrier(8)

    def pay(i: int) -> PaymentResult:
        start.wait()
        return ledger.pay(f"pos-{i}", f"t-{i}", 1000, "r-1", NOW, token_key="qr:same")

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(pay, range(8)))
    assert sorted(r.reason or "approved" for r in outcomes) == ["approved"] + [
        Reason.REPLAYED_TOKEN] * 7
    assert ledger.balance("r-1") == 49_000


# -- 1b. offline ts must be believable ----------------------------------------------------

def test_batch_items_dated_too_far_ahead_or_back_are_malformed(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.topup("r-1", 5000, "topup-key-1")
    # Decided a week and more ago: a late retry still gets its first answer.
    then = Ledger(engine, clock=lambda: NOW - MAX_BATCH_AGE_S - 3000)
    old = then.apply_batch("pos-1", "b-0", [
        BatchPayment("o-old", 100, "r-1", NOW - MAX_BATCH_AGE_S - 3600)])
    ledger = Ledger(engine, ledger.limits, clock=lambda: NOW)
    handler = PaymentHandler(ledger, Directory().resolve, clock=lambda: NOW)
    upload = batch(
        "b-1",
        request("o-old", 100, "card", "card-1", NOW - MAX_BATCH_AGE_S - 3600),
        request("o-future", 100, "card", "card-1", NOW + 61),
        request("o-soon", 100, "card", "card-1", NOW + 59),
        request("o-ancient", 100, "card", "card-1", NOW - MAX_BATCH_AGE_S - 1),
        request("o-week", 100, "card", "card-1", NOW - MAX_BATCH_AGE_S + 60),
        {"txn_id": "o-now", "amount_cents": 100,
         "credential": {"type": "card", "value": "card-1"}},
    )
    assert results(handler.handle_batch("pos-1", upload)) == [
        ("o-old", old[0].approved, None, 0),
        ("o-future", False, "malformed_request", 0),
        ("o-soon", True, None, 0),
        ("o-ancient", False, "malformed_request", 0),
        ("o-week", True, None, 0),
        ("o-now", True, None, 0),
    ]
    assert stored_txns(engine) == {"o-old", "o-soon", "o-week", "o-now"}
    assert handler.counts["malformed"] == 2
    assert ledger.balance("r-1") == 4600


# -- 2. ids the database cannot store -----------------------------------------------------

BAD_IDS = ["t\x00", "x" * 65, "with space", "t\u00e9", "t\x7f", ""]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_unstorable_ids_are_refused_at_parse_time(bad: str) -> None:
    message = parse_payment_request(request(bad, 100, "card", "c"))
    assert isinstance(message, Malformed)
    assert message.reply_id == (bad or None)
    upload = parse_payment_batch(batch(bad, request("t-1", 100, "card", "c")))
    if bad:
        assert not isinstance(upload, Malformed)
        assert upload.payments == (Malformed(
            "batch_id must be 1-64 printable ASCII characters without spaces", "t-1"),)
    else:
        assert isinstance(upload, Malformed) and upload.reply_id is None
    item = parse_payment_batch(batch("b-1", request(bad, 100, "card", "c")))
    assert not isinstance(item, Malformed) and isinstance(item.payments[0], Malformed)
    longest = "!" + "~" * 63
    fine = parse_payment_batch(batch(longest, request(longest, 100, "card", "c")))
    assert not isinstance(fine, Malformed)
    assert fine.payments == (PaymentMessage(longest, 100, Credential("card", "c"), 1.0),)


def test_unstorable_ids_are_answered_as_malformed_and_never_written(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.topup("r-1", 5000, "topup-key-1")
    handler = PaymentHandler(ledger, Directory().resolve, clock=lambda: NOW)
    for bad in ("t\x00", "t" * 65):
        reply = answer(handler.handle_request("pos-1", request(bad, 100, "card", "card-1")))
        assert (reply["txn_id"], reply["reason"]) == (bad, "malformed_request")
        upload = batch(bad, request("o-1", 100, "card", "card-1", NOW),
                       request("o-2", 100, "card", "card-1", NOW))
        reply = answer(handler.handle_batch("pos-1", upload))
        assert reply["batch_id"] == bad
        assert [(r["txn_id"], r["reason"]) for r in reply["results"]] == [
            ("o-1", "malformed_request"), ("o-2", "malformed_request")]
        assert results(handler.handle_batch("pos-1", batch(
            "b-1", request(bad, 100, "card", "card-1", NOW)))) == [
            (bad, False, "malformed_request", 0)]
    assert stored_txns(engine) == set()
    # The ledger itself refuses them too, instead of failing the write.
    assert ledger.apply_batch("pos-1", "b\x00", [BatchPayment("o-1", 100, "r-1", NOW)]) == [
        PaymentResult("o-1", False, None, Reason.MALFORMED_REQUEST)]
    assert ledger.pay("pos-1", "t" * 65, 100, "r-1", NOW).reason is Reason.MALFORMED_REQUEST
    assert stored_txns(engine) == set()
    assert ledger.balance("r-1") == 5000


# -- 3. a retry after a failed write --------------------------------------------------------

def fail_next_write(ledger: Ledger, monkeypatch: pytest.MonkeyPatch, times: int = 1) -> None:
    real = ledger._transaction
    left = [times]

    def transaction(work: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise OperationalError("INSERT", {}, Exception("connection lost"))
        return real(work)

    monkeypatch.setattr(ledger, "_transaction", transaction)


def test_a_retry_after_a_failed_write_reuses_the_first_resolution(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.topup("r-1", 5000, "topup-key-1")
    directory = Directory()
    handler = PaymentHandler(ledger, directory.resolve)
    payload = request("t-1", 1200, "qr", directory.phone.qr(), time.time())
    fail_next_write(ledger, monkeypatch)
    with pytest.raises(OperationalError):
        handler.handle_request("pos-1", payload)
    assert directory.calls == 1
    reply = answer(handler.handle_request("pos-1", payload))
    assert (reply["approved"], reply["balance_cents"]) == (True, 3800)
    assert directory.calls == 1  # the token was not presented to the guard again
    assert answer(handler.handle_request("pos-1", payload)) == reply
    assert len(handler._resolutions) == 0  # stored: the ledger answers from now on

    # The same for an offline upload.
    now = time.time()
    upload = batch("b-1", request("o-1", 500, "qr", directory.phone.qr(), now),
                   request("o-2", 500, "card", "card-1", now))
    fail_next_write(ledger, monkeypatch)
    with pytest.raises(OperationalError):
        handler.handle_batch("pos-1", upload)
    assert directory.calls == 3
    assert results(handler.handle_batch("pos-1", upload)) == [
        ("o-1", True, None, 0), ("o-2", True, None, 0)]
    assert directory.calls == 3
    assert ledger.balance("r-1") == 2800
    assert ledger.audit() == []


def test_a_retry_with_another_credential_is_resolved_afresh(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.topup("r-2", 5000, "topup-key-2")
    directory = Directory()
    handler = PaymentHandler(ledger, directory.resolve)
    fail_next_write(ledger, monkeypatch)
    with pytest.raises(OperationalError):
        handler.handle_request("pos-1", request("t-1", 100, "card", "card-1", NOW))
    reply = answer(handler.handle_request("pos-1", request("t-1", 100, "card", "card-2", NOW)))
    assert (reply["approved"], reply["balance_cents"]) == (True, 4900)
    assert directory.calls == 2


def test_remembered_resolutions_are_bounded_in_age_and_number() -> None:
    card = Credential("card", "c")
    resolutions = payments._Resolutions(ttl_s=600.0, limit=3)
    resolutions.put(("pos-1", "t-0"), card, "r-0", NOW)
    assert resolutions.get(("pos-1", "t-0"), card, NOW + 599) == "r-0"
    assert resolutions.get(("pos-1", "t-0"), Credential("card", "d"), NOW + 599) is None
    assert resolutions.get(("pos-1", "t-0"), card, NOW + 600) is None
    for i in range(5):
        resolutions.put(("pos-1", f"t-{i}"), card, Reason.REVOKED, NOW + i)
    assert len(resolutions) == 3
    assert resolutions.get(("pos-1", "t-1"), card, NOW + 5) is None
    assert resolutions.get(("pos-1", "t-4"), card, NOW + 5) is Reason.REVOKED
    resolutions.forget([("pos-1", "t-4")])
    assert len(resolutions) == 2
    assert payments.RESOLUTION_TTL_S == 600 and payments.MAX_RESOLUTIONS == 10_000


def test_the_terminal_simulator_makes_ids_the_gateway_can_store() -> None:
    terminal = CanteenTerminal("127.0.0.1", 1883, "d" * 64)
    txn_id = terminal.new_txn_id()
    assert validate_id(txn_id, "txn_id") is None
    assert validate_id(f"b-{txn_id}", "batch_id") is None
