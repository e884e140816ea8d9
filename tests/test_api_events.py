"""GET /api/v1/events (issue 12): live events over Server-Sent Events, against a running
gateway on a real Mosquitto. Decisions come from simulated readers, readings from a device
publishing telemetry, alerts from MQTT; what arrives is read from the stream itself."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

import api.routers.events as events_route
from gateway.events import EventHub, View
from simulators.canteen import CanteenTerminal, card_credential
from simulators.demo.broker import Mosquitto
from simulators.readers import ReaderSimulator
from tests.community import Running, running_gateway

METER = {"device_id": "meter-ev", "kind": "meter", "building": "b1"}


@dataclass
class Frame:
    id: str | None
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class Stream:
    """The frames of an open event stream, read with a deadline."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.seen: list[Frame] = []

    async def _frame(self) -> Frame:
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if "event" in fields or "data" in fields:
                    return Frame(fields.get("id"), fields.get("event"), fields.get("data", ""))
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise EOFError("the stream ended")

    async def until(self, match: Callable[[Frame], bool], timeout_s: float = 30.0) -> Frame:
        """The first frame that matches, among those already read or the next ones."""
        for frame in self.seen:
            if match(frame):
                return frame

        async def wait() -> Frame:
            while True:
                frame = await self._frame()
                self.seen.append(frame)
                if match(frame):
                    return frame
        return await asyncio.wait_for(wait(), timeout_s)


async def _token(http: httpx.AsyncClient, login: dict[str, Any]) -> str:
    answer = await http.post("/api/v1/auth/token", data={
        "username": login["username"], "password": login["password"]})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


@asynccontextmanager
async def _stream(http: httpx.AsyncClient, token: str, *, query: bool = False,
                  last_id: str | None = None) -> AsyncIterator[Stream]:
    headers = {} if query else {"Authorization": f"Bearer {token}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    params = {"access_token": token} if query else None
    async with http.stream("GET", "/api/v1/events", headers=headers, params=params) as answer:
        assert answer.status_code == 200, await answer.aread()
        assert answer.headers["content-type"].startswith("text/event-stream")
        yield Stream(answer)


def _reader(broker: Mosquitto, run: Running, device_id: str = "gate-north",
            kind: str = "gate") -> ReaderSimulator:
    return ReaderSimulator(broker.host, broker.port, device_id, kind, run.root)


def _access(request_id: str) -> Callable[[Frame], bool]:
    return lambda f: f.event == "access" and f.json().get("request_id") == request_id


async def _present(gate: ReaderSimulator, card: str) -> str:
    decision = await gate.present("card", card, timeout_s=30)
    return str(decision["request_id"])


def _client(run: Running) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=run.api, timeout=httpx.Timeout(30, read=60))


async def test_decisions_readings_alerts_and_devices_reach_the_roles_that_may_see_them(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with (
        running_gateway(mosquitto, tmp_path, extra_devices=[METER]) as run,
        _client(run) as http,
    ):
        alice = run.people.residents[0]
        staff = await _token(http, run.login("staff"))
        engineer = await _token(http, run.login("engineer"))
        async with (
            _stream(http, staff, query=True) as desk,  # as EventSource does it
            _stream(http, engineer) as facilities,
            _reader(mosquitto, run) as gate,
        ):
            request_id = await _present(gate, alice.cards["gate"])
            seen = (await desk.until(_access(request_id))).json()
            assert seen["granted"] is True and seen["device_id"] == "gate-north"
            assert (seen["method"], seen["resident_id"]) == ("card", alice.resident_id)
            assert seen["action"] == "unlock"
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
                await device.publish(f"{run.root}/devices/meter-ev/telemetry", json.dumps(
                    {"ts": time.time(), "seq": 1, "metrics": {"power_w": 1234.5}}), qos=1)
                alert = {"rule_id": "ev-rule", "device_id": "meter-ev", "metric": "power_w",
                         "state": "firing", "severity": "warning", "value": 1234.5,
                         "started_at": time.time(), "ts": time.time(), "message": "test"}
                await device.publish(f"{run.root}/alerts/ev-rule/meter-ev", json.dumps(alert),
                                     qos=1)
            reading = (await facilities.until(
                lambda f: f.event == "reading" and f.json()["device_id"] == "meter-ev")).json()
            assert reading["metrics"] == {"power_w": 1234.5} and reading["kind"] == "meter"
            got = (await facilities.until(lambda f: f.event == "alert")).json()
            assert got == alert
            online = await facilities.until(
                lambda f: f.event == "device" and f.json()["device_id"] == "gate-north")
            assert online.json()["online"] is True
        # The engineer never got a decision; staff never a reading or an alert.
        assert not [f for f in facilities.seen if f.event in ("access", "payment")]
        assert not [f for f in desk.seen if f.event in ("reading", "alert")]


async def test_a_resident_sees_its_own_decisions_only_and_the_stream_ends_with_its_session(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_route, "KEEPALIVE_S", 0.5)
    async with running_gateway(mosquitto, tmp_path) as run, _client(run) as http:
        alice, bob = run.people.residents[0], run.people.residents[1]
        logins = {u.get("resident_id"): u for u in run.people.logins}
        mine = await _token(http, logins[alice.resident_id])
        staff = {"Authorization": f"Bearer {await _token(http, run.login('staff'))}"}
        async with _stream(http, mine) as phone, _reader(mosquitto, run) as gate:
            others = await _present(gate, bob.cards["gate"])
            own = await _present(gate, alice.cards["gate"])
            first = await phone.until(lambda f: f.event == "access")
            assert first.json()["request_id"] == own, "another resident's decision was shown"
            assert others not in {f.json().get("request_id") for f in phone.seen}
            # Payments too: Bob's is not shown, Alice's is, with her new balance.
            async with CanteenTerminal(mosquitto.host, mosquitto.port, "canteen-1",
                                       root=run.root, timeout_s=30.0) as till:
                for who in (bob, alice):
                    topup = await http.post(
                        f"/api/v1/canteen/accounts/{who.resident_id}/topup", headers=staff,
                        json={"amount_cents": 2000, "idempotency_key": f"ev-{who.resident_id}"})
                    assert topup.status_code == 201, topup.text
                bobs = await till.sell(300, card_credential(bob.cards["canteen"]))
                hers = await till.sell(500, card_credential(alice.cards["canteen"]))
            assert bobs.outcome == hers.outcome == "approved"
            paid = await phone.until(lambda f: f.event == "payment")
            assert paid.json()["txn_id"] == hers.txn_id, "another resident's payment was shown"
            assert hers.result is not None and paid.json()["approved"] is True
            assert paid.json()["balance_cents"] == hers.result["balance_cents"]
            assert paid.json()["device_id"] == "canteen-1"
            gone = await http.post(f"/api/v1/residents/{alice.resident_id}/move-out",
                                   headers=staff)
            assert gone.status_code == 200, gone.text
            end = await phone.until(lambda f: f.event == "end")
            assert end.json() == {"reason": "session_ended"}
        answer = await http.get("/api/v1/events", params={"access_token": mine})
        assert answer.status_code == 401


async def test_reconnecting_with_last_event_id_replays_what_was_missed(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run, _client(run) as http:
        alice = run.people.residents[0]
        staff = await _token(http, run.login("staff"))
        async with _reader(mosquitto, run) as gate:
            async with _stream(http, staff) as first:
                before = await first.until(_access(await _present(gate, alice.cards["gate"])))
            missed = [await _present(gate, alice.cards["gate"]) for _ in range(2)]
            async with _stream(http, staff, last_id=before.id) as again:
                for request_id in missed:
                    frame = await again.until(_access(request_id))
                    assert frame.id is not None and before.id is not None
                    assert int(frame.id) > int(before.id)
            async with _stream(http, staff, last_id="1") as too_old:
                reset = await too_old.until(lambda f: f.event is not None)
                assert reset.event == "reset"
        # The same decisions in the access log, newest first, with the names the
        # dashboard reads.
        auth = {"Authorization": f"Bearer {staff}"}
        log = await http.get("/api/v1/access/log", headers=auth, params={
            "resident_id": alice.resident_id, "granted": "true", "device_id": "gate-north",
            "since": "2020-01-01T00:00:00Z", "until": str(time.time() + 60), "limit": "2"})
        assert log.status_code == 200, log.text
        items = log.json()
        assert [i["request_id"] for i in items] == missed[::-1]
        assert {"ts", "device_id", "method", "granted", "reason", "resident_id",
                "floor"} <= set(items[0])
        assert (items[0]["method"], items[0]["granted"], items[0]["floor"]) == ("card", True,
                                                                                None)
        assert items[0]["ts"] >= items[1]["ts"]
        for bad in ({"since": "yesterday"}, {"limit": "1001"}, {"granted": "maybe"}):
            answer = await http.get("/api/v1/access/log", headers=auth, params=bad)
            assert answer.status_code == 422, (bad, answer.text)
        future = await http.get("/api/v1/access/log", headers=auth,
                                params={"since": str(time.time() + 3600)})
        assert future.json() == []


def _slow_client(port: int, token: str) -> socket.socket:
    """A client that asks for the stream and never reads: a tiny receive window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    return sock


async def test_a_client_that_never_reads_never_delays_a_decision_and_its_drops_are_counted(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run, _client(run) as http:
        alice = run.people.residents[0]
        admin = await _token(http, run.login("admin"))
        assert run.gateway.api_port is not None
        slow = _slow_client(run.gateway.api_port, admin)
        try:
            deadline = time.monotonic() + 30
            while run.gateway.events.subscribers < 1:
                assert time.monotonic() < deadline, "the slow client never subscribed"
                await asyncio.sleep(0.05)
            # Alerts of 4 KiB each through the broker: far more than its queue, the socket
            # buffers and uvicorn's write buffer together hold.
            filler = "x" * 4096
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
                for i in range(2000):
                    await device.publish(f"{run.root}/alerts/flood/meter-x", json.dumps(
                        {"rule_id": "flood", "device_id": "meter-x", "n": i,
                         "message": filler}), qos=0)
            async with _reader(mosquitto, run) as gate:
                decision = await gate.present("card", alice.cards["gate"], timeout_s=30)
                assert decision["granted"] is True

            async def dropped() -> float:
                text = (await http.get("/metrics")).text
                for line in text.splitlines():
                    if line.startswith("scgw_sse_dropped_total "):
                        return float(line.split()[1])
                return 0.0

            deadline = time.monotonic() + 30
            while await dropped() == 0:
                assert time.monotonic() < deadline, "no drop was counted"
                await asyncio.sleep(0.2)
            # A reading client is unaffected: it connects and gets its events.
            async with _stream(http, admin) as reader, _reader(mosquitto, run) as gate:
                await reader.until(_access(await _present(gate, alice.cards["gate"])))
        finally:
            slow.close()


def test_the_hub_thins_readings_bounds_queues_and_resets_unknown_ids() -> None:
    now = [0.0]
    hub = EventHub(queue_limit=2, ring_size=3, clock=lambda: now[0])
    staff = hub.subscribe(View.of("staff", None))
    resident = hub.subscribe(View.of("resident", "r-1"))
    engineer = hub.subscribe(View.of("engineer", None))
    assert hub.publish_reading("m-1", {"v": 1}) is not None
    assert hub.publish_reading("m-1", {"v": 2}) is None  # within the second
    now[0] = 1.5
    assert hub.publish_reading("m-1", {"v": 3}) is not None
    assert [e.kind for e in engineer.queue] == ["reading", "reading"]
    hub.publish("access", {"n": 1}, owner="r-2")
    hub.publish("access", {"n": 2}, owner="r-1")
    assert [json.loads(e.data)["n"] for e in resident.queue] == [2]
    hub.publish("payment", {"n": 3}, owner="r-1")
    assert len(staff.queue) == 2 and staff.lagged and hub.dropped == 1
    assert staff.take_lag() and not staff.queue
    assert hub.subscribe(View.of("staff", None), "not-a-number").reset
    assert hub.subscribe(View.of("staff", None), "1").reset
    first_access = hub.recent()[0]
    later = hub.subscribe(View.of("resident", "r-1"), str(first_access.id))
    assert not later.reset and [e.owner for e in later.replay] == ["r-1", "r-1"]
    assert View.of("resident", None).kinds == frozenset()
