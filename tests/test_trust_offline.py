"""Issue 11, offline sales: only believed inside an offline window, held to the offline
limits across batches, their timestamps bounded on every path.

The first test is the reported attack through the gateway's own runtime over Mosquitto: a
forged `payment/batch` on canteen-1 with a resident's card number, 6 x 3000 cents, two of
them dated six days back, while the gateway saw the terminal online all along.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from device_drivers import tokens as cred
from device_drivers.mqtt import NO_DELAY
from device_drivers.offline_sales import OfflineLimits
from gateway.access.presence import Segment, gaps
from gateway.app.cli_canteen import app as canteen_cli
from gateway.canteen.ledger import BatchPayment, Ledger
from gateway.canteen.offline_windows import OfflineWindows, Window, covering, merge
from gateway.canteen.payments import PaymentHandler
from gateway.canteen.tables import canteen_journal, canteen_shortfalls
from gateway.store.db import make_engine, upgrade
from simulators.demo.broker import Mosquitto
from tests.community import running_gateway
from tests.test_ledger_mqtt import Directory, request
from tests.test_trust_edge import say_offline, upload

DAY = 24 * 3600.0


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def card_batch(batch_id: str, card: str, *sales: tuple[str, int, float]) -> bytes:
    return json.dumps({"batch_id": batch_id, "payments": [
        {"txn_id": txn, "amount_cents": amount, "credential": {"type": "card", "value": card},
         "ts": ts} for txn, amount, ts in sales]}).encode()


def results(raw: bytes | None) -> dict[str, tuple[bool, str | None, int]]:  # txn -> answer
    assert raw is not None
    return {r["txn_id"]: (r["approved"], r["reason"], r.get("shortfall_cents", 0))
            for r in json.loads(raw)["results"]}


async def test_a_forged_batch_is_refused_and_offline_limits_hold_through_the_runtime(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        alice = run.people.residents[0]
        card = alice.cards["canteen"]
        ledger = Ledger(make_engine(run.config.database.url))
        try:
            ledger.topup(alice.resident_id, 50_000, "trust-offline-topup")
            now = time.time()
            forged = [(f"f-{i}", 3000, now - 6 * DAY if i < 2 else now - 30)
                      for i in range(6)]
            answer = await upload_cards(mosquitto, run.root, card, forged)
            # The gateway never saw canteen-1 offline: none of it is believed or debited.
            assert {t: (a, r) for t, (a, r, _) in answer.items()} == {
                t: (False, "outside_offline_window") for t, _, _ in forged}
            assert ledger.balance(alice.resident_id) == 50_000

            # Now its link really drops (the broker publishes its last will).
            await say_offline(mosquitto, run.root)
            assert run.gateway.router is not None
            while run.gateway.router.state["canteen-1"].online is not False:
                await asyncio.sleep(0.01)
            sold = time.time()
            first = await upload_cards(mosquitto, run.root, card,
                                       [("s-1", 3000, sold), ("s-2", 3000, sold + 1)])
            assert first == {"s-1": (True, None, 0), "s-2": (False, "offline_limit", 3000)}
            # Splitting the rest into another upload does not reset the 5000-cent card limit.
            second = await upload_cards(mosquitto, run.root, card,
                                        [("s-3", 1000, sold + 2), ("s-4", 2000, sold + 3)])
            assert second == {"s-3": (True, None, 0), "s-4": (False, "offline_limit", 2000)}
            assert ledger.balance(alice.resident_id) == 50_000 - 4000
            # A QR minted ten minutes ago and never shown: not valid at the sale's time.
            phone_qr = cred.mint_qr(alice.credential_id, alice.secret, sold - 628)
            late = await upload(mosquitto, run.root, [("q-1", phone_qr, sold + 4)])
            assert late["q-1"]["reason"] == "expired_token"
            # Dated when it was valid, but before the terminal went offline: outside.
            early = await upload(mosquitto, run.root, [("q-2", phone_qr, sold - 620)])
            assert early["q-2"]["reason"] == "outside_offline_window"
            rows = [(r.txn_id, r.account_id, r.reason, r.over_limit, r.shortfall_cents)
                    for r in ledger.reconcile(datetime.fromtimestamp(sold, UTC).date(), UTC)
                    if r.txn_id.startswith("s-")]
            # For staff review, with whose meal it was.
            assert rows == [("s-2", alice.resident_id, "offline_limit", "card", 3000),
                            ("s-4", alice.resident_id, "offline_limit", "card", 2000)]
        finally:
            ledger.engine.dispose()


Results = dict[str, tuple[bool, str | None, int]]


async def upload_cards(broker: Mosquitto, root: str, card: str,
                       sales: list[tuple[str, int, float]]) -> Results:
    batch_id = f"b-{sales[0][0]}"
    topic = f"{root}/devices/canteen-1/payment"
    async with aiomqtt.Client(broker.host, broker.port, socket_options=NO_DELAY) as client:
        await client.subscribe(f"{topic}/batch_result", qos=1)
        await client.publish(f"{topic}/batch", card_batch(batch_id, card, *sales), qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if json.loads(message.payload).get("batch_id") == batch_id:
                    return results(message.payload)
    raise AssertionError("no batch result")


def test_ts_1e300_for_a_sale_refused_online_is_refused_and_reconcile_survives(
    engine: Engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(engine, OfflineLimits(5000, 200_000))
    ledger.topup("r-1", 100, "topup-key-1")
    handler = PaymentHandler(ledger, Directory().resolve)
    now = time.time()
    online = json.loads(handler.handle_request("pos-1", request("t-1", 900, "card", "card-1",
                                                                now)) or b"")
    assert online["reason"] == "insufficient_funds"
    upload_ = card_batch("b-1", "card-1", ("t-1", 900, 1e300), ("t-2", 900, 1e300),
                         ("t-3", 900, -1e300))
    answer = results(handler.handle_batch("pos-1", upload_))
    # The retry keeps its first answer and leaves no record dated where no sale can be;
    # new sales so dated are malformed.
    assert answer == {"t-1": (False, "insufficient_funds", 0),
                      "t-2": (False, "malformed_request", 0),
                      "t-3": (False, "malformed_request", 0)}
    with engine.connect() as conn:
        assert conn.execute(select(canteen_shortfalls.c.txn_id)).all() == []
    # The ledger refuses it on its own too (any path that does not go through the handler).
    stored = ledger.lookup("pos-1", "t-1")
    assert stored is not None
    assert ledger.apply_batch("pos-1", "b-2", [BatchPayment("t-1", 900, "r-1", 1e300)]) == [
        stored.result]
    monkeypatch.chdir(tmp_path)
    day = datetime.fromtimestamp(now, UTC).date().isoformat()
    for command in ("reconcile", "settle"):
        done = CliRunner().invoke(canteen_cli, [command, "--date", day, "--database-url",
                                                database_url, "--tz", "UTC"])
        assert done.exit_code == 0, done.output


def test_offline_windows_come_from_status_and_gateway_gaps(engine: Engine) -> None:
    now = 1_800_000_000.0
    windows = OfflineWindows(engine, slack_s=60.0, clock=lambda: now)
    # Nothing seen: no window at all, however old the sale.
    assert windows.windows("pos-1", now) == []
    windows.observe("pos-1", False, now - 3000)
    windows.observe("pos-1", False, now - 2900)  # offline again while offline: nothing new
    windows.observe("pos-1", True, now - 2000)
    windows.observe("pos-1", False, now - 100)
    windows._write_queued()
    assert windows.windows("pos-1", now) == [Window(now - 3060, now - 1940),
                                             Window(now - 160, now + 60)]
    # A restarted gateway reads the same from the store alone.
    fresh = OfflineWindows(engine, slack_s=60.0, clock=lambda: now)
    assert fresh.windows("pos-1", now) == windows.windows("pos-1", now)
    assert fresh.windows("pos-2", now) == []
    fresh._read.dispose()
    windows._read.dispose()


def test_gateway_downtime_is_a_window_but_time_before_the_first_start_is_not() -> None:
    segments = [Segment("a", 1000.0, 2000.0), Segment("b", 2600.0, 3000.0),
                Segment("c", 2900.0, 5000.0)]
    assert gaps(segments, 0.0, 5005.0, heartbeat_s=5.0) == [(2005.0, 2600.0)]
    assert gaps(segments, 0.0, 6000.0, heartbeat_s=5.0) == [(2005.0, 2600.0), (5005.0, 6000.0)]
    assert gaps([], 0.0, 6000.0) == []
    merged = merge([(10.0, 20.0), (25.0, 30.0), (100.0, 110.0)], slack_s=5.0)
    assert merged == [Window(5.0, 35.0), Window(95.0, 115.0)]
    assert covering(merged, 34.0) == Window(5.0, 35.0) and covering(merged, 50.0) is None


def test_limits_count_every_batch_of_one_window_and_only_what_was_accepted(
    engine: Engine,
) -> None:
    now = time.time()
    ledger = Ledger(engine, OfflineLimits(per_card_cents=1000, per_terminal_cents=1500))
    ledger.topup("r-1", 5000, "topup-key-1")
    ledger.topup("r-2", 5000, "topup-key-2")
    handler = PaymentHandler(ledger, Directory().resolve,
                             windows=lambda terminal, at: [Window(now - 600, now + 60)])
    one = results(handler.handle_batch("pos-1", card_batch(
        "b-1", "card-1", ("o-1", 800, now - 300), ("o-2", 800, now - 200))))
    assert one == {"o-1": (True, None, 0), "o-2": (False, "offline_limit", 800)}
    two = results(handler.handle_batch("pos-1", card_batch(
        "b-2", "card-2", ("o-3", 700, now - 100), ("o-4", 100, now - 50))))
    # The terminal's 1500 is reached by r-2's 700 on top of r-1's 800 (o-2 never counted).
    assert two == {"o-3": (True, None, 0), "o-4": (False, "offline_limit", 100)}
    # Outside the window: refused before anything is resolved, recorded for staff.
    three = results(handler.handle_batch("pos-1", card_batch(
        "b-3", "card-1", ("o-5", 100, now - 4000))))
    assert three == {"o-5": (False, "outside_offline_window", 100)}
    with engine.connect() as conn:
        debits = sorted(conn.execute(select(canteen_journal.c.txn_id).where(
            canteen_journal.c.kind == "payment")).scalars())
    assert debits == ["o-1", "o-3"]
    assert ledger.audit() == []
