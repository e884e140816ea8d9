"""The first vertical slice over a real Mosquitto: phone -> reader -> gateway -> reader."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import httpx

from simulators.demo.broker import Mosquitto
from simulators.phone import SimulatedAir, SimulatedPhone
from simulators.readers import ReaderSimulator
from tests.community import Running, running_gateway


def _reader(broker: Mosquitto, run: Running, device_id: str, kind: str) -> ReaderSimulator:
    return ReaderSimulator(broker.host, broker.port, device_id, kind, run.root)


def _phone(run: Running, index: int = 0) -> SimulatedPhone:
    resident = run.people.residents[index]
    return SimulatedPhone(resident.credential_id, resident.secret)


async def test_phone_qr_unlocks_the_gate_and_replay_is_refused_everywhere(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        async with (
            _reader(mosquitto, run, "gate-north", "gate") as north,
            _reader(mosquitto, run, "gate-south", "gate") as south,
        ):
            qr = _phone(run).qr()
            decision = await north.present("qr", qr)
            assert decision["granted"] is True
            assert (decision["action"], decision["duration_s"]) == ("unlock", 5)
            assert [a.action for a in north.actuations] == ["unlock"]
            again = await south.present("qr", qr)
            assert (again["granted"], again["action"], again["reason"]) == (
                False, "none", "replayed_token"
            )
            assert south.actuations == []


async def test_elevator_enables_home_and_public_floors_only(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        alice = run.people.residents[0]
        async with _reader(mosquitto, run, "elev-b1-1", "elevator") as car:
            decision = await car.present("qr", _phone(run).qr())
            assert decision["action"] == "enable_floors"
            assert sorted(decision["floors"]) == sorted([-1, 1, alice.floor])
        async with _reader(mosquitto, run, "elev-b2-1", "elevator") as other_building:
            decision = await other_building.present("card", alice.cards["elevator"])
            assert (decision["granted"], decision["reason"]) == (False, "not_permitted")


async def test_bad_input_is_answered_counted_and_survived(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        async with _reader(mosquitto, run, "gate-north", "gate") as gate:
            answer = await gate.send_raw(
                b'{"request_id": "r-1", "credential": {"type": "qr"}}', "r-1"
            )
            assert (answer["granted"], answer["reason"]) == (False, "malformed_request")
            answer = await gate.send_raw(b'{"request_id": "r-2", "credential": 7}', "r-2")
            assert answer["reason"] == "malformed_request"
            assert gate._client is not None
            for junk in (b"\xff\xfe", b"[1,2]", b"{not json", b""):
                await gate._client.publish(gate.topic("access/request"), junk, qos=1)
            async with _reader(mosquitto, run, "gate-nowhere", "gate") as stranger:
                answer = await stranger.present("qr", _phone(run).qr())
                assert (answer["granted"], answer["reason"]) == (False, "malformed_request")
            # The gateway is still deciding.
            assert (await gate.present("qr", _phone(run).qr()))["granted"] is True
        metrics = run.gateway.metrics
        errors = metrics.value("scgw_mqtt_errors_total", channel="access/request",
                               error="malformed")
        assert errors == 6
        assert metrics.value("scgw_mqtt_errors_total", channel="access/request",
                             error="unknown_device") == 1


async def test_gateway_answers_again_after_the_broker_restarts(
    own_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(own_mosquitto, tmp_path) as run:
        link = run.gateway.link
        assert link is not None
        own_mosquitto.stop()
        await asyncio.sleep(0.3)
        own_mosquitto.start()
        await asyncio.wait_for(link.connected.wait(), 10)
        async with _reader(own_mosquitto, run, "gate-north", "gate") as gate:
            assert (await gate.present("qr", _phone(run).qr()))["granted"] is True
        assert link.connections == 2


async def test_resident_gets_a_token_and_remote_unlocks_through_the_api(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        alice = run.people.residents[0]
        async with httpx.AsyncClient(base_url=run.api, timeout=10) as http:
            login = await http.post(
                "/api/v1/auth/token", data={"username": alice.username, "password": alice.password}
            )
            assert login.status_code == 200, login.text
            auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
            token = await http.post("/api/v1/me/access-token", headers=auth)
            assert token.status_code == 200, token.text
            # What the app offers: exactly the readers a remote action would be granted at.
            mine = await http.get("/api/v1/me/devices", headers=auth)
            assert mine.status_code == 200, mine.text
            offered = {d["device_id"]: d for d in mine.json()}
            assert offered["gate-south"]["kind"] == "gate"
            for device in mine.json():
                if device["kind"] == "elevator":
                    assert device["floors"], device
            async with (
                _reader(mosquitto, run, "gate-north", "gate") as gate,
                aiomqtt.Client(mosquitto.host, mosquitto.port) as observer,
            ):
                await observer.subscribe(f"{run.root}/devices/gate-south/command")
                decision = await gate.present("qr", token.json()["qr"])
                assert decision["granted"] is True
                unlock = await http.post("/api/v1/gates/gate-south/unlock", headers=auth)
                assert unlock.status_code == 202, unlock.text
                async with asyncio.timeout(5):
                    async for message in observer.messages:
                        assert isinstance(message.payload, bytes)
                        command = json.loads(message.payload)
                        assert command["action"] == "unlock"
                        assert command["command_id"] == unlock.json()["command_id"]
                        break
            wrong = await http.post(
                "/api/v1/auth/token", data={"username": alice.username, "password": "nope"}
            )
            assert wrong.status_code == 401
            assert (await http.post("/api/v1/me/access-token")).status_code == 401
            forged = {"Authorization": "Bearer " + login.json()["access_token"][:-4] + "AAAA"}
            assert (await http.post("/api/v1/me/access-token", headers=forged)).status_code == 401


async def test_phone_near_a_ble_reader_opens_it_without_asking(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The BLE radio is the hardware boundary: SimulatedAir stands in for it."""
    air = SimulatedAir()
    async with running_gateway(
        mosquitto, tmp_path, ble_readers=("gate-north",), ble_backend=air.backend
    ) as run:
        async with _reader(mosquitto, run, "gate-north", "gate") as gate:
            phone = _phone(run)
            assert air.broadcast(phone, rssi=-95) == 1  # too far away: ignored
            await asyncio.sleep(0.3)
            assert gate.actuations == []
            for _ in range(5):  # a phone advertises repeatedly; the door opens once
                air.broadcast(phone, rssi=-60)
            for _ in range(50):
                if gate.actuations:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            assert [a.action for a in gate.actuations] == ["unlock"]
        metrics = run.gateway.metrics
        assert metrics.value("scgw_access_decisions_total", kind="gate", result="granted") == 1


async def test_elevator_call_only_to_permitted_floors(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_gateway(mosquitto, tmp_path) as run:
        alice = run.people.residents[0]
        async with (
            httpx.AsyncClient(base_url=run.api, timeout=10) as http,
            _reader(mosquitto, run, "elev-b1-1", "elevator") as car,
        ):
            login = await http.post(
                "/api/v1/auth/token", data={"username": alice.username, "password": alice.password}
            )
            auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
            home = await http.post("/api/v1/elevators/elev-b1-1/call", headers=auth,
                                   json={"floor": alice.floor})
            assert home.status_code == 202, home.text
            neighbour = await http.post("/api/v1/elevators/elev-b1-1/call", headers=auth,
                                        json={"floor": 3})
            assert neighbour.status_code == 403
            other_building = await http.post("/api/v1/elevators/elev-b2-1/call", headers=auth,
                                             json={"floor": 1})
            assert other_building.status_code == 403
            not_an_elevator = await http.post("/api/v1/elevators/gate-north/call", headers=auth,
                                              json={"floor": 1})
            assert not_an_elevator.status_code == 404
            for _ in range(50):
                if car.actuations:
                    break
                await asyncio.sleep(0.05)
            assert [(a.action, a.floors) for a in car.actuations] == [
                ("call_floor", (alice.floor,))
            ]
