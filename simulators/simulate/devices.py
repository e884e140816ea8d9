"""Device logins, simulated phones, and a canteen terminal that keeps simulated time.

The terminal is `simulators.canteen.CanteenTerminal` (retries with the same txn_id, offline
sales within the limits, batch upload) with two additions a simulation needs: a sale's
`ts` is the simulated moment it happens, and the terminal can really drop off the broker
(its last will tells the gateway) and come back.

An offline sale keeps the *wall-clock* time instead: the gateway believes an offline sale
only inside the period it saw the terminal offline, by its own clock
(gateway.canteen.offline_windows), so a simulated clock hours in the past would have every
batch item refused as `outside_offline_window`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from device_drivers.vocabulary import Credential
from simulators.canteen import CanteenTerminal, Sale
from simulators.phone import SimulatedPhone


@dataclass(frozen=True, slots=True)
class Logins:
    """Broker logins from the `credentials.json` of `scgw mqtt-config` (CONTRACT.md 6)."""

    devices: dict[str, tuple[str, str]]
    monitor: tuple[str, str] | None = None

    @classmethod
    def anonymous(cls) -> Logins:
        return cls({}, None)

    @classmethod
    def from_file(cls, path: str | Path) -> Logins:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: Any) -> Logins:
        if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
            raise ValueError("credentials.json: expected {\"devices\": {id: {username, "
                             "password}}, ...} as `scgw mqtt-config` writes it")
        devices = {str(k): (str(v["username"]), str(v["password"]))
                   for k, v in data["devices"].items()
                   if isinstance(v, dict) and "username" in v and "password" in v}
        monitor = data.get("monitor")
        mon = ((str(monitor["username"]), str(monitor["password"]))
               if isinstance(monitor, dict) and monitor.get("password") else None)
        return cls(devices, mon)

    def of(self, device_id: str) -> tuple[str | None, str | None]:
        login = self.devices.get(device_id)
        return (None, None) if login is None else login


def load_phones(path: str | Path) -> dict[str, SimulatedPhone]:
    """`{resident_id: {"credential_id": ..., "secret": hex}}`: phones the gateway enrolled."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{resident_id: {{credential_id, secret}}}}")
    return {str(rid): SimulatedPhone(str(p["credential_id"]), bytes.fromhex(str(p["secret"])))
            for rid, p in data.items()}


class SimTerminal(CanteenTerminal):
    """A canteen terminal on the simulated clock that can lose its broker connection.

    One customer at a time, as at a real till: sales, dropping off the network and coming
    back take turns in the order they were asked for, so what is sold online and what goes
    into the offline batch follows the scenario, not how fast the gateway answered.
    """

    _turn: asyncio.Lock | None = None

    def _till(self) -> asyncio.Lock:
        if self._turn is None:
            self._turn = asyncio.Lock()
        return self._turn

    async def __aenter__(self) -> SimTerminal:
        await super().__aenter__()
        return self

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def drop(self) -> None:
        """The terminal loses the network: `{"online": false}` reaches the gateway."""
        async with self._till():
            self.online = False
            if self._client is not None:
                await self.__aexit__(None, None, None)
                self._client = None

    async def reconnect(self) -> list[dict[str, Any]]:
        """Back on the network: log in again and upload what was sold meanwhile."""
        async with self._till():
            if self._client is None:
                await self.__aenter__()
            return await self.come_online()

    async def _ask(self, channel: str, key: str, payload: dict[str, Any]) -> tuple[
            dict[str, Any] | None, int]:
        """As the terminal's, but a connection dropped mid-sale is no answer, not a crash."""
        try:
            if self._client is None:
                return None, 0
            return await super()._ask(channel, key, payload)
        except (AttributeError, AssertionError, aiomqtt.MqttError):
            return None, self.attempts

    async def sell_at(self, amount_cents: int, cred: Credential, ts: float) -> Sale:
        async with self._till():
            return await self._sell_at(amount_cents, cred, ts)

    async def _sell_at(self, amount_cents: int, cred: Credential, ts: float) -> Sale:
        txn_id = self.new_txn_id()
        request = {"txn_id": txn_id, "amount_cents": amount_cents,
                   "credential": {"type": cred.type, "value": cred.value}, "ts": ts}
        timed_out = False
        if self.online and self._client is not None:
            started = time.perf_counter()
            answer, attempts = await self._ask("payment/request", txn_id, request)
            if answer is not None:
                outcome = "approved" if answer.get("approved") else "refused"
                sale = Sale(txn_id, amount_cents, outcome, answer, attempts,
                            time.perf_counter() - started)
                self.sales.append(sale)
                return sale
            await self.go_offline()
            timed_out = True
        return self._sell_offline({**request, "ts": time.time()}, cred, timed_out=timed_out)
