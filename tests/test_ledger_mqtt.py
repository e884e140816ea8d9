"""Payment messages (CONTRACT.md) through PaymentHandler, and the terminal simulator over a
real Mosquitto: lost requests, lost answers, a silent gateway and an offline upload."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
from sqlalchemy import Engine, select

from device_drivers import tokens as cred
from device_drivers.mqtt import NO_DELAY
from device_drivers.mqtt_protocol import Malformed
from device_drivers.offline_sales import OfflineLimits
from device_drivers.vocabulary import Credential, Reason
from gateway.canteen.ledger import Ledger
from gateway.canteen.payments import (
    PaymentHandler,
    PaymentMessage,
    parse_payment_batch,
    parse_payment_request,
)
from gateway.canteen.tables import canteen_journal
from gateway.store.db import make_engine, upgrade
from simulators.canteen import CanteenTerminal, card_credential, lunch_hour
from simulators.demo.broker import Mosquitto
from simulators.phone import SimulatedPhone
from tests.community import Running, running_gateway

CARDS = {"card-1": "r-1", "card-2": "r-2", "card-3": "r-3"}


@dataclass
class Directory:
    """A stand-in for the access service's resolution: cards and one enrolled phone."""

    phone: SimulatedPhone = field(default_factory=lambda: SimulatedPhone(
        cred.new_credential_id(), cred.new_secret()))
    guard: cred.ReplayGuard = field(default_factory=cred.ReplayGuard)
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, kind: str, value: str, now: float, use_ref: str = "") -> str | Reason:
        with self.lock:
            self.calls += 1
            if kind == "card":
                return CARDS.get(value, Reason.UNKNOWN_CARD)
            token = cred.parse_qr(value) if kind == "qr" else None
            if token is None or token.credential_id != self.phone.credential_id:
                return Reason.INVALID_TOKEN
            problem = cred.check(token, self.phone.secret, now)
            if problem is not None:
                return Reason(problem.value)
            if not self.guard.use(token, now):
                return Reason.REPLAYED_TOKEN
            return "r-1"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def ledger(engine: Engine) -> Ledger:
    return Ledger(engine, OfflineLimits(per_card_cents=2000, per_terminal_cents=100_000))


def request(txn_id: str, amount: int, kind: str, value: str, ts: float = 1.0) -> bytes:
    return json.dumps({"txn_id": txn_id, "amount_cents": amount,
                       "credential": {"type": kind, "value": value}, "ts": ts}).encode()


def test_parsing_payment_messages() -> None:
    unreadable = parse_payment_request(b"{not json")
    assert isinstance(unreadable, Malformed) and unreadable.reply_id is None
    anonymous = parse_payment_request(b'{"amount_cents": 5}')
    assert isinstance(anonymous, Malformed) and anonymous.reply_id is None
    bad = parse_payment_request(b'{"txn_id": "t-1", "amount_cents": "15.00"}')
    assert isinstance(bad, Malformed) and bad.reply_id == "t-1"
    assert isinstance(parse_payment_request(request("t-1", 0, "card", "c")), Malformed)
    assert isinstance(parse_payment_request(request("t-1", 100, "iris", "c")), Malformed)
    good = parse_payment_request(request("t-1", 100, "card", "c", 5.5))
    assert good == PaymentMessage("t-1", 100, Credential("card", "c"), 5.5)
    batch = parse_payment_batch(json.dumps({"batch_id": "b-1", "payments": [
        json.loads(request("t-1", 100, "card", "c")), {"txn_id": "t-2"}, 7]}).encode())
    assert not isinstance(batch, Malformed)
    assert [type(p).__name__ for p in batch.payments] == [
        "PaymentMessage", "Malformed", "Malformed"]
    no_list = parse_payment_batch(b'{"batch_id": "b-1"}')
    assert isinstance(no_list, Malformed) and no_list.reply_id == "b-1"


def test_a_retried_qr_payment_is_answered_without_spending_the_token_again(
    ledger: Ledger,
) -> None:
    ledger.topup("r-1", 3000, "topup-key-1")
    directory = Directory()
    handler = PaymentHandler(ledger, directory.resolve)
    payload = request("t-1", 1200, "qr", directory.phone.qr(), ts=0.0)
    first = handler.handle_request("pos-1", payload)
    assert json.loads(first or b"") == {
        "txn_id": "t-1", "approved": True, "balance_cents": 1800, "reason": None}
    assert handler.handle_request("pos-1", payload) == first
    assert directory.calls == 1
    # The same token in a new payment is a replay.
    replayed = handler.handle_request("pos-1", payload.replace(b'"t-1"', b'"t-2"'))
    assert json.loads(replayed or b"")["reason"] == "replayed_token"
    mismatch = handler.handle_request("pos-1", payload.replace(b"1200", b"1300"))
    assert json.loads(mismatch or b"")["reason"] == "amount_mismatch"
    assert handler.handle_request("pos-1", b"\xff\xfe") is None
    answer = handler.handle_request("pos-1", b'{"txn_id": "t-9", "amount_cents": -1}')
    assert json.loads(answer or b"")["reason"] == "malformed_request"
    assert handler.counts == {"approved": 1, "refused": 1, "retry": 2, "malformed": 2}
    assert ledger.balance("r-1") == 1800


def test_a_batch_with_bad_items_retries_and_duplicates(ledger: Ledger) -> None:
    ledger.topup("r-1", 1000, "topup-key-1")
    handler = PaymentHandler(ledger, Directory().resolve)
    sold = time.time() - 60
    handler.handle_request("pos-1", request("t-1", 400, "card", "card-1", sold))
    items = [json.loads(request(*args, sold)) for args in [
        ("t-1", 400, "card", "card-1"),  # answered online before the outage
        ("o-1", 500, "card", "card-1"),
        ("o-1", 500, "card", "card-1"),
        ("o-2", 300, "card", "card-1"),  # 100 left: 200 short
        ("o-3", 300, "card", "card-x"),
    ]]
    items.insert(2, {"txn_id": "o-bad", "amount_cents": "lots"})
    payload = json.dumps({"batch_id": "b-1", "payments": items}).encode()
    answer = json.loads(handler.handle_batch("pos-1", payload) or b"")
    assert answer["batch_id"] == "b-1"
    assert [(r["txn_id"], r["approved"], r["reason"], r.get("shortfall_cents", 0))
            for r in answer["results"]] == [
        ("t-1", True, None, 0), ("o-1", True, None, 0), ("o-bad", False, "malformed_request", 0),
        ("o-2", False, "insufficient_funds", 200), ("o-3", False, "unknown_card", 300),
    ]
    assert json.loads(handler.handle_batch("pos-1", payload) or b"") == answer
    assert json.loads(handler.handle_batch("pos-1", b'{"payments": []}') or b"null") is None
    assert ledger.balance("r-1") == 0
    assert ledger.audit() == []


@dataclass
class Gateway:
    """The part of the runtime that matters here: MQTT in, handler, MQTT out.

    `lose` decides per (device, txn_id, sighting) whether to drop the request ("request"),
    apply it but drop the answer ("answer"), or neither (None)."""

    handler: PaymentHandler
    lose: Callable[[str, str, int], str | None] = lambda *_: None
    sightings: dict[tuple[str, str], int] = field(default_factory=dict)


@asynccontextmanager
async def gateway(broker: Mosquitto, root: str, gw: Gateway) -> AsyncIterator[None]:
    async with aiomqtt.Client(broker.host, broker.port, socket_options=NO_DELAY) as client:
        await client.subscribe(f"{root}/devices/+/payment/request", qos=1)
        await client.subscribe(f"{root}/devices/+/payment/batch", qos=1)

        async def serve() -> None:
            async for message in client.messages:
                _, _, device, *rest = message.topic.value.split("/")
                channel, payload = "/".join(rest), bytes(message.payload)
                txn = json.loads(payload).get("txn_id", "")
                seen = gw.sightings.get((device, txn), 0)
                gw.sightings[(device, txn)] = seen + 1
                fate = gw.lose(device, txn, seen) if channel == "payment/request" else None
                if fate == "request":
                    continue
                reply = await asyncio.to_thread(gw.handler.handle, device, channel, payload)
                if reply is not None and fate != "answer":
                    await client.publish(f"{root}/devices/{device}/{reply.channel}",
                                         reply.payload, qos=1)

        task = asyncio.create_task(serve())
        try:
            yield
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_terminals_over_mqtt_pay_exactly_once_through_losses_and_an_outage(
    mosquitto: Mosquitto, ledger: Ledger, engine: Engine
) -> None:
    root = f"t{random.randrange(10**9)}"
    for account in ("r-1", "r-2"):
        ledger.topup(account, 50_000, f"topup-{account}")
    ledger.topup("r-3", 1000, "topup-r-3")
    directory = Directory()
    silent: set[str] = set()

    def lose(device: str, txn: str, seen: int) -> str | None:
        if device in silent:
            return "answer"  # the gateway decides, but nothing reaches the terminal
        if seen == 0 and zlib.crc32(txn.encode()) % 4 == 0:
            return "request"
        if seen == 0 and zlib.crc32(txn.encode()) % 4 == 1:
            return "answer"
        return None

    gw = Gateway(PaymentHandler(ledger, directory.resolve), lose)
    customers = [card_credential("card-1"), card_credential("card-2"),
                 lambda: Credential("qr", directory.phone.qr())]
    limits = OfflineLimits(per_card_cents=2000, per_terminal_cents=100_000)
    async with (
        gateway(mosquitto, root, gw),
        CanteenTerminal(mosquitto.host, mosquitto.port, "pos-1", root=root, timeout_s=1.5,
                        limits=limits) as pos1,
        CanteenTerminal(mosquitto.host, mosquitto.port, "pos-2", root=root, timeout_s=1.5,
                        limits=limits) as pos2,
    ):
        stats = await lunch_hour([pos1, pos2], customers, rate_per_s=30, duration_s=1.0,
                                 rng=random.Random(7))
        assert stats.outcomes["approved"] >= 10 and set(stats.outcomes) == {"approved"}
        assert any(sale.attempts > 1 for sale in pos1.sales + pos2.sales)

        # pos-2's answers stop arriving: its sale is charged but it cannot know; it goes
        # offline and sells on within the limits (card-3 has 10.00 and a 20.00 limit).
        silent.add("pos-2")
        charged_blind = await pos2.sell(600, card_credential("card-3"))
        assert charged_blind.outcome == "offline_accepted" and not pos2.online
        offline = [await pos2.sell(600, card_credential("card-3")) for _ in range(3)]
        assert [s.outcome for s in offline] == [
            "offline_accepted", "offline_accepted", "offline_refused"]
        silent.clear()
        results = await pos2.come_online()
    by_txn = {r["txn_id"]: r for r in results}
    assert [by_txn[s.txn_id]["approved"] for s in [charged_blind, *offline[:2]]] == [
        True, False, False]
    assert by_txn[offline[0].txn_id]["shortfall_cents"] == 200
    assert by_txn[offline[1].txn_id]["shortfall_cents"] == 600
    assert offline[2].txn_id not in by_txn

    # Every sale the terminals were told was approved is charged exactly once; nothing else.
    told = {(t.device_id, s.txn_id): s for t in (pos1, pos2) for s in t.sales}
    with engine.connect() as conn:
        rows = conn.execute(select(canteen_journal.c.terminal_id, canteen_journal.c.txn_id,
                                   canteen_journal.c.amount_cents)
                            .where(canteen_journal.c.kind == "payment")).all()
    charged: dict[tuple[str, str], list[int]] = {}
    for terminal, txn, amount in rows:
        charged.setdefault((terminal, txn), []).append(amount)
    expected = {key: [sale.amount_cents] for key, sale in told.items()
                if sale.outcome == "approved"}
    expected[("pos-2", charged_blind.txn_id)] = [600]
    expected[("pos-2", offline[0].txn_id)] = [400]
    assert charged == expected
    assert ledger.balance("r-3") == 0
    assert ledger.audit() == []


async def say_offline(broker: Mosquitto, run: Running, device_id: str) -> None:
    """What a terminal's last will says when its link drops; waits until the gateway saw it."""
    async with aiomqtt.Client(broker.host, broker.port) as will:
        await will.publish(f"{run.root}/devices/{device_id}/status", b'{"online": false}',
                           qos=1, retain=True)
    assert run.gateway.router is not None
    async with asyncio.timeout(5):
        while run.gateway.router.state[device_id].online is not False:
            await asyncio.sleep(0.01)


async def test_the_gateway_runtime_takes_payments_from_demo_residents(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Through `scgw run`'s own runtime: canteen card and phone QR, a retry, an upload."""
    async with running_gateway(mosquitto, tmp_path) as run:
        url = run.config.database.url
        engine = make_engine(url)
        ledger = Ledger(engine)
        alice = run.people.residents[0]
        ledger.topup(alice.resident_id, 5000, "e2e-topup-0001")
        phone = SimulatedPhone(alice.credential_id, alice.secret)
        async with CanteenTerminal(mosquitto.host, mosquitto.port, "canteen-1", root=run.root,
                                   timeout_s=2.0) as till:
            by_card = await till.sell(1500, card_credential(alice.cards["canteen"]))
            by_phone = await till.sell(2000, lambda: Credential("qr", phone.qr()))
            too_much = await till.sell(2000, card_credential(alice.cards["canteen"]))
            stranger = await till.sell(100, card_credential("C-NOBODY"))
            # The till loses its link: the broker publishes its last will, and it sells on.
            await say_offline(mosquitto, run, "canteen-1")
            till.online = False
            offline = await till.sell(900, card_credential(alice.cards["canteen"]))
            uploaded = await till.come_online()
        try:
            assert [s.outcome for s in (by_card, by_phone, too_much, stranger)] == [
                "approved", "approved", "refused", "refused"]
            assert by_phone.result is not None and by_phone.result["balance_cents"] == 1500
            assert too_much.result is not None
            assert too_much.result["reason"] == "insufficient_funds"
            assert stranger.result is not None and stranger.result["reason"] == "unknown_card"
            assert [(r["txn_id"], r["approved"]) for r in uploaded] == [(offline.txn_id, True)]
            assert ledger.balance(alice.resident_id) == 600
            assert ledger.audit() == []
        finally:
            engine.dispose()
