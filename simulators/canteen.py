"""A canteen card terminal speaking CONTRACT.md's payment topics, and lunch-hour traffic.

It behaves like a careful real terminal: a request that gets no answer is re-sent with the
*same* txn_id (so the gateway can never charge twice); when the gateway stays silent the
terminal goes offline, keeps selling within the per-card and per-terminal offline limits,
and uploads the sales as `payment/batch` when it is back. A sale whose online attempt timed
out is uploaded with its original txn_id: if the gateway had in fact decided it, the upload
gets that first answer back.

Going offline and coming back are announced on the terminal's retained `status` topic
(CONTRACT.md section 1), the same message its last will carries: the gateway believes an
offline sale only inside a period it saw the terminal offline, and a gateway that merely
stopped answering (its link to the broker up) would otherwise never see one.

Credentials come from a callback so the demo can present a card number or a phone's fresh
QR code: `CanteenTerminal.sell(amount, lambda: Credential("qr", phone.qr()))`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiomqtt

from device_drivers.mqtt_protocol import device_topic
from device_drivers.offline_sales import DEFAULT_LIMITS, OfflineExposure, OfflineLimits
from device_drivers.tokens import parse_ble_hex, parse_qr
from device_drivers.vocabulary import Credential
from simulators.device_link import OFFLINE, ONLINE, device_connection

log = logging.getLogger(__name__)
TERMINAL_CHANNELS = ["payment/result", "payment/batch_result"]

CredentialSource = Callable[[], Credential | Awaitable[Credential]]
MENU_CENTS = (600, 800, 1200, 1500, 1800, 2200)
# Without it a QoS 1 publish waits ~40 ms for a delayed ACK (Nagle), every time.


@dataclass(frozen=True, slots=True)
class Sale:
    txn_id: str
    amount_cents: int
    # approved | refused (online answer) | offline_accepted | offline_refused (over a limit)
    outcome: str
    result: dict[str, Any] | None = None
    attempts: int = 0
    latency_s: float | None = None  # first publish to answer, online sales only


def card_key(credential: Credential) -> str:
    """Who a credential belongs to as far as an offline terminal can tell (no secrets)."""
    parsed = (parse_qr(credential.value) if credential.type == "qr"
              else parse_ble_hex(credential.value) if credential.type == "ble" else None)
    if parsed is not None:
        return f"cred:{parsed.credential_id}"
    return f"{credential.type}:{credential.value}"


def card_credential(number: str) -> CredentialSource:
    """An old canteen card: the same number every time."""
    return lambda: Credential("card", number)


@dataclass
class CanteenTerminal:
    host: str
    port: int
    device_id: str
    root: str = "scgw"
    username: str | None = None  # the terminal's broker login (scgw mqtt-config)
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 1.0
    attempts: int = 3
    limits: OfflineLimits = DEFAULT_LIMITS
    batch_size: int = 100  # keeps a batch payload well under the gateway's 64 KiB limit
    online: bool = True  # False while the terminal cannot reach the gateway
    sales: list[Sale] = field(default_factory=list)
    batch_results: list[dict[str, Any]] = field(default_factory=list)
    uncertain: list[str] = field(default_factory=list)  # timed out, then refused offline
    _queue: list[dict[str, Any]] = field(default_factory=list)
    _exposure: OfflineExposure = field(default_factory=OfflineExposure)
    _client: aiomqtt.Client | None = None
    _stack: contextlib.AsyncExitStack | None = None
    _task: asyncio.Task[None] | None = None
    _waiting: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _txn_numbers: itertools.count[int] = field(default_factory=itertools.count)
    _session: str = field(default_factory=lambda: secrets.token_hex(3))

    def topic(self, channel: str) -> str:
        return device_topic(self.root, self.device_id, channel)

    async def _announce(self, online: bool) -> None:
        """Say online / offline on the retained status topic; a broker that is gone too
        will publish the last will instead, so a failure here changes nothing."""
        if self._client is None:
            return
        try:
            await self._client.publish(self.topic("status"), ONLINE if online else OFFLINE,
                                       qos=1, retain=True)
        except aiomqtt.MqttError:
            log.info("%s: could not announce online=%s", self.device_id, online)

    async def go_offline(self) -> None:
        """Stop asking the gateway and sell offline from now on, and say so."""
        self.online = False
        await self._announce(False)

    async def __aenter__(self) -> CanteenTerminal:
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            device_connection(self.host, self.port, self.root, self.device_id,
                              TERMINAL_CHANNELS, self.username, self.password)
        )
        self._task = asyncio.create_task(self._listen(), name=f"canteen-{self.device_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._stack is not None:
            await self._stack.aclose()

    async def _listen(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            try:
                data = json.loads(message.payload) if isinstance(message.payload, bytes) else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                log.warning("%s: unreadable answer on %s", self.device_id, message.topic)
                continue
            if not isinstance(data, dict):
                continue
            key = data.get("txn_id") if message.topic.value.endswith("/payment/result") \
                else data.get("batch_id")
            future = self._waiting.get(str(key))
            if future is not None and not future.done():
                future.set_result(data)

    async def _ask(self, channel: str, key: str, payload: dict[str, Any]) -> tuple[
            dict[str, Any] | None, int]:
        """Publish and wait for the answer, re-sending the identical payload on timeout."""
        assert self._client is not None
        future = self._waiting.setdefault(key, asyncio.get_running_loop().create_future())
        body = json.dumps(payload).encode()
        try:
            for attempt in range(1, self.attempts + 1):
                await self._client.publish(self.topic(channel), body, qos=1)
                try:
                    async with asyncio.timeout(self.timeout_s):
                        return await asyncio.shield(future), attempt
                except TimeoutError:
                    log.info("%s: no answer to %s (attempt %d)", self.device_id, key, attempt)
            return None, self.attempts
        finally:
            self._waiting.pop(key, None)

    def new_txn_id(self) -> str:
        # The gateway stores ids of at most 64 characters; a long device id is shortened
        # (the session and counter keep the id unique on this terminal).
        return f"{self.device_id[:36]}-{self._session}-{next(self._txn_numbers)}"

    async def sell(self, amount_cents: int, credential: CredentialSource) -> Sale:
        """One customer at the till: online if possible, else offline within the limits."""
        presented = credential()
        cred = await presented if inspect.isawaitable(presented) else presented
        txn_id = self.new_txn_id()
        request = {"txn_id": txn_id, "amount_cents": amount_cents,
                   "credential": {"type": cred.type, "value": cred.value}, "ts": time.time()}
        if self.online:
            started = time.perf_counter()
            answer, attempts = await self._ask("payment/request", txn_id, request)
            if answer is not None:
                outcome = "approved" if answer.get("approved") else "refused"
                sale = Sale(txn_id, amount_cents, outcome, answer, attempts,
                            time.perf_counter() - started)
                self.sales.append(sale)
                return sale
            log.warning("%s: gateway unreachable, going offline", self.device_id)
            await self.go_offline()
            return self._sell_offline(request, cred, timed_out=True)
        return self._sell_offline(request, cred, timed_out=False)

    def _sell_offline(self, request: dict[str, Any], cred: Credential, timed_out: bool) -> Sale:
        key, amount = card_key(cred), int(request["amount_cents"])
        over = self._exposure.check(self.limits, key, amount)
        if over is None:
            self._exposure = self._exposure.add(key, amount)
            self._queue.append(request)
            sale = Sale(request["txn_id"], amount, "offline_accepted")
        else:
            sale = Sale(request["txn_id"], amount, "offline_refused", {"over_limit": over.value})
            if timed_out:
                # The gateway may have charged it before going silent, but the meal was not
                # served: staff look the txn_id up and refund it if it was charged.
                self.uncertain.append(request["txn_id"])
        self.sales.append(sale)
        return sale

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def come_online(self) -> list[dict[str, Any]]:
        """Say online again, then upload everything sold offline, in order; returns the
        per-txn results."""
        self.online = True
        await self._announce(True)
        results: list[dict[str, Any]] = []
        while self._queue:
            chunk = self._queue[: self.batch_size]
            batch_id = f"b-{self.new_txn_id()}"
            answer, _ = await self._ask("payment/batch", batch_id,
                                        {"batch_id": batch_id, "payments": chunk})
            if answer is None:
                log.warning("%s: batch %s unanswered; still offline", self.device_id, batch_id)
                await self.go_offline()
                break
            del self._queue[: len(chunk)]
            results.extend(answer.get("results", []))
        self.batch_results.extend(results)
        if not self._queue:
            self._exposure = OfflineExposure()
        return results


@dataclass
class LunchStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)


async def lunch_hour(
    terminals: Sequence[CanteenTerminal], customers: Sequence[CredentialSource],
    rate_per_s: float, duration_s: float, rng: random.Random | None = None,
    menu: Sequence[int] = MENU_CENTS,
) -> LunchStats:
    """Poisson arrivals at `rate_per_s` spread over the terminals, each buying one dish."""
    rng = rng or random.Random()
    stats = LunchStats()
    deadline = time.monotonic() + duration_s

    async def customer() -> None:
        sale = await rng.choice(terminals).sell(rng.choice(menu), rng.choice(customers))
        stats.outcomes[sale.outcome] += 1
        if sale.latency_s is not None:
            stats.latencies_s.append(sale.latency_s)

    async with asyncio.TaskGroup() as group:
        while (left := deadline - time.monotonic()) > 0:
            group.create_task(customer())
            await asyncio.sleep(min(left, rng.expovariate(rate_per_s)))
    return stats


def device_login(credentials_file: str | None, device_id: str) -> tuple[str | None, str | None]:
    """The device's broker login from a credentials.json of `scgw mqtt-config`."""
    if credentials_file is None:
        return None, None
    with open(credentials_file, encoding="utf-8") as handle:
        login = json.load(handle)["devices"][device_id]
    return str(login["username"]), str(login["password"])


async def _main(args: argparse.Namespace) -> None:
    customers = [card_credential(number) for number in args.card]
    username, password = device_login(args.credentials, args.device)
    terminal = CanteenTerminal(args.host, args.port, args.device, root=args.root,
                               username=username, password=password)
    async with terminal:
        stats = await lunch_hour([terminal], customers, args.rate, args.duration)
        if terminal.queued:
            await terminal.come_online()
    log.warning("sales: %s", dict(stats.outcomes))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Simulate a canteen terminal at lunch time.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--root", default="scgw")
    parser.add_argument("--device", default="canteen-1")
    parser.add_argument("--credentials", help="credentials.json of `scgw mqtt-config`: log "
                        "in as the device (brokers refuse anonymous clients)")
    parser.add_argument("--card", action="append", required=True, help="card number (repeat)")
    parser.add_argument("--rate", type=float, default=2.0, help="customers per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
