"""Sign-in defences: rate limits and the one bounded password-hashing thread.

An argon2 check costs 64 MiB and ~0.25 s of CPU spread over 4 threads; on the gateway's
2 cores a few at once starve everything else, and that is what an attacker with a list of
passwords sends. So:

- Every attempt counts against its user name and its client address (moving windows, the
  `limits` package, in memory). Beyond either limit the answer is 429 with Retry-After, at
  once, with no hashing and no database read. A success clears its user name's window.
- Attempts within the limits are hashed one at a time on a single thread that runs at the
  lowest CPU priority (nice 19; argon2's own lane threads inherit it), so access decisions
  and payments keep the cores whenever they want them. At most `login_queue` attempts wait
  for it; beyond that the answer is 503 with Retry-After.
- The thread starts with the first sign-in and ends after a second without one, so an idle
  gateway (or a finished test) holds none.
- The limits are checked by `LoginLimits`, an ASGI middleware in front of the application,
  from the form body it reads itself: a refused attempt never reaches FastAPI's routing,
  form parsing and dependencies (a flood's hundreds of refusals cost the event loop that
  carries access decisions and payments a fraction of a millisecond each). A body it cannot
  read that way (multipart) is counted by the route instead.

The limits live in this process: several API processes each count on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

T = TypeVar("T")
HASH_NICE = 19  # the lowest priority: a sign-in may wait, a gate or a payment may not
IDLE_EXIT_S = 1.0


class Busy(Exception):
    """The hashing queue is full; `retry_after_s` estimates when it will have room."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class HashWorker:
    """One thread, started on demand, running jobs in order at low CPU priority.

    A request first takes a place (`place()`, refused with `Busy` when `max_waiting` jobs
    wait already), then does its cheap preparation (the database read) and hands the job
    to `run`: so a flood beyond the queue costs neither a database read nor a thread. The
    job runs on the worker thread and its result (or exception) comes back to the awaiting
    task. Places are taken and given back on the event loop only.
    """

    def __init__(self, max_waiting: int, name: str = "scgw-login-hash") -> None:
        self._max = max_waiting + 1  # the one running, and those waiting
        self._placed = 0
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._name = name
        self._job_s = 0.25  # running estimate of one job's duration, for Retry-After

    @property
    def placed(self) -> int:
        return self._placed

    @property
    def full(self) -> bool:
        return self._placed >= self._max

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._placed * self._job_s))

    @contextlib.contextmanager
    def place(self) -> Iterator[None]:
        if self.full:
            raise Busy(self.retry_after_s())
        self._placed += 1
        try:
            yield
        finally:
            self._placed -= 1

    async def run(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if done.done():  # the awaiting request went away
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def job() -> None:
            started = time.perf_counter()
            result: T | None = None
            error: Exception | None = None
            try:
                result = work()
            except Exception as exc:  # handed to the awaiting task
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(settle, result, error)
            self._job_s = 0.8 * self._job_s + 0.2 * (time.perf_counter() - started)

        with self._lock:
            self._jobs.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name,
                                                daemon=True)
                self._thread.start()
        return await done

    def _serve(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICE)
        # SCHED_IDLE: below even nice 19, the hash runs only on a core nothing else wants,
        # and argon2's lane threads inherit the policy too.
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            job()


@dataclass(frozen=True)
class Refusal:
    """A refused attempt: which limit, and when to try again."""

    reason: str
    retry_after_s: int


class LoginGuard:
    """Rate limits for sign-ins, and the hashing worker they are checked in front of."""

    def __init__(self, *, window_s: int, per_username: int, per_client: int,
                 max_waiting: int) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._per_username = RateLimitItemPerSecond(per_username, window_s)
        self._per_client = RateLimitItemPerSecond(per_client, window_s)
        self.hasher = HashWorker(max_waiting)

    def _retry_after(self, item: RateLimitItemPerSecond, *key: str) -> int:
        stats = self._limiter.get_window_stats(item, *key)
        return max(1, math.ceil(stats.reset_time - time.time()))

    def admit(self, username: str, client: str) -> Refusal | None:
        """Count one attempt; a Refusal when it is beyond a limit (then nothing is hashed).

        The client's limit is checked first and a refused client does not count against
        the user name, so one noisy address cannot use up a user's attempts beyond its own
        limit.
        """
        if not self._limiter.hit(self._per_client, "client", client):
            return Refusal("too many sign-in attempts from this address",
                           self._retry_after(self._per_client, "client", client))
        if not self._limiter.hit(self._per_username, "user", username):
            return Refusal("too many sign-in attempts for this user",
                           self._retry_after(self._per_username, "user", username))
        return None

    def succeeded(self, username: str) -> None:
        """A correct password: the user's earlier failures no longer count."""
        self._limiter.clear(self._per_username, "user", username)


LOGIN_PATH = "/api/v1/auth/token"
BUSY = "too many sign-ins at once; try again shortly"
ADMITTED = "scgw.login_admitted"  # scope key: the middleware has counted this attempt
MAX_FORM_BYTES = 4096  # a sign-in form is tiny; a bigger one is left to the route


def form_username(body: bytes) -> str | None:
    """The user name of an urlencoded sign-in form that the route would accept, else None
    (then the route validates the form and counts the attempt itself)."""
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        return None
    names = fields.get("username", [])
    if len(names) != 1 or not names[0] or "\x00" in names[0] or len(names[0]) > 128:
        return None
    return names[0]


class LoginLimits:
    """ASGI middleware: counts each sign-in against its limits before the application sees
    it, and answers a refused one itself: 429 beyond a limit, 503 while the hashing queue is
    full, both with Retry-After."""

    def __init__(self, app: Any, guard: LoginGuard, client_of: Callable[[dict[str, Any]], str],
                 on_refused: Callable[[str], None]) -> None:
        self.app = app
        self.guard = guard
        self.client_of = client_of
        self.on_refused = on_refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] != LOGIN_PATH
                or scope["method"] != "POST" or not _urlencoded(scope)):
            await self.app(scope, receive, send)
            return
        messages: list[dict[str, Any]] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False) or len(body) > MAX_FORM_BYTES:
                break
        username = form_username(body) if len(body) <= MAX_FORM_BYTES else None
        if username is not None:
            refusal = self.guard.admit(username, self.client_of(scope))
            if refusal is not None:
                self.on_refused("rate_limited")
                await _refuse(send, 429, refusal.reason, refusal.retry_after_s)
                return
            if self.guard.hasher.full:  # counted, and refused before any more work
                self.on_refused("busy")
                await _refuse(send, 503, BUSY, self.guard.hasher.retry_after_s())
                return
            scope.setdefault("state", {})[ADMITTED] = True

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _urlencoded(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return bool(value.split(b";")[0].strip().lower()
                        == b"application/x-www-form-urlencoded")
    return False


async def _refuse(send: Any, status: int, detail: str, retry_after_s: int) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after_s).encode())]})
    await send({"type": "http.response.body", "body": body})
