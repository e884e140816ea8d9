"""Issue 11: the canteen terminal simulator says when it goes offline and when it is back,
so the gateway's offline-window check believes the sales it made meanwhile.

Through the gateway's own runtime over Mosquitto. The gateway stays up and connected the
whole time (no gap in its presence that would open a window by itself); it only stops
answering this terminal, as a gateway stuck on a locked database or a broken route would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.canteen.ledger import Ledger
from gateway.store.db import make_engine
from simulators.canteen import CanteenTerminal, card_credential
from simulators.demo.broker import Mosquitto
from tests.community import running_gateway


async def test_a_terminal_the_gateway_stops_answering_sells_offline_and_its_batch_is_accepted(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        router = run.gateway.router
        assert router is not None
        alice = run.people.residents[0]
        card = card_credential(alice.cards["canteen"])
        engine = make_engine(run.config.database.url)
        ledger = Ledger(engine)
        silent = asyncio.Event()
        payments: Any = router._payments  # the canteen service the router hands payments to
        answer = payments.handle

        async def stop_answering(device: Any, channel: str, payload: bytes) -> None:
            if not silent.is_set():
                await answer(device, channel, payload)

        monkeypatch.setattr(payments, "handle", stop_answering)
        try:
            ledger.topup(alice.resident_id, 10_000, "trust-terminal-topup")
            async with CanteenTerminal(mosquitto.host, mosquitto.port, "canteen-1",
                                       root=run.root, timeout_s=0.5, attempts=2) as till:
                online = await till.sell(1000, card)
                assert online.outcome == "approved", online

                silent.set()
                unanswered = await till.sell(800, card)  # times out: the terminal goes offline
                assert unanswered.outcome == "offline_accepted" and not till.online
                async with asyncio.timeout(20):  # the gateway saw it say so
                    while router.state["canteen-1"].online is not False:
                        await asyncio.sleep(0.02)
                offline = [await till.sell(700, card), await till.sell(600, card)]
                assert [s.outcome for s in offline] == ["offline_accepted"] * 2

                silent.clear()
                uploaded = await till.come_online()
                assert router.state["canteen-1"].online is True
            sold = [unanswered, *offline]
            assert {r["txn_id"]: (r["approved"], r["reason"]) for r in uploaded} == {
                s.txn_id: (True, None) for s in sold}
            assert ledger.balance(alice.resident_id) == 10_000 - 1000 - 800 - 700 - 600
            assert ledger.audit() == []
        finally:
            engine.dispose()
