"""The one supervisor every long-lived task of the gateway runs under.

A crashed background task must never leave the process looking healthy while a gate, a
meter or the audit log has silently stopped. Each task is spawned with a policy:

- `restart=True`: a crash is logged with the task's name and the task is started again
  after a jittered, growing delay; more than `max_restarts` crashes within `window_s`
  escalate to a fatal failure (a component that cannot stay up is not "degraded", it is
  broken);
- `restart=False`: the first crash is fatal.

A fatal failure cancels every task of the supervisor's TaskGroup; the runtime sees it as an
exception leaving `async with supervisor`, tears everything down in order and exits
non-zero, so systemd (or the operator) notices. Stopping a task on purpose is one call,
`SupervisedTask.stop()`, instead of a cancel-and-await written out in every component.

It lives in the bottom layer (beside the drivers, which own tasks too) because every layer
above may import it and it imports nothing of ours.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Awaitable[None]]


class ComponentFailed(RuntimeError):
    """A supervised task crashed with restart disabled or beyond its restart budget."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"component {name!r} failed: {cause!r}")
        self.name = name


@dataclass
class SupervisedTask:
    """A handle on one supervised task: its name, crash count and a way to stop it."""

    name: str
    restart: bool
    crashes: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def join(self) -> None:
        """Wait until the task ends by itself (a component asked it to finish its work)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel the task and wait for it to finish, at most `timeout_s` seconds."""
        if self._task is not None and not await cancel_until_done(self._task, timeout_s):
            log.error("task %s did not stop within %.1f s", self.name, timeout_s)


async def cancel_until_done(task: asyncio.Task[Any], timeout_s: float = 5.0) -> bool:
    """Cancel `task` and wait for it to finish, at most `timeout_s` seconds (False if not).

    Cancels again every 100 ms: Python 3.11's wait_for (inside aiomqtt's publish, pymodbus
    and others) returns normally when a reply arrives as the cancel does, and the cancel is
    lost; a task cancelled once then walks on (a demo resident kept using the gates after
    SIGTERM until the test's deadline).
    """
    deadline = time.monotonic() + timeout_s
    while not task.done():
        if time.monotonic() > deadline:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    return True


class Supervisor:
    """An async context manager owning a TaskGroup and the restart policy of its tasks."""

    def __init__(
        self,
        name: str = "gateway",
        *,
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 10.0,
    ) -> None:
        self.name = name
        self._max_restarts = max_restarts
        self._window_s = window_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._group: asyncio.TaskGroup | None = None
        self.tasks: dict[str, SupervisedTask] = {}

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._group is not None
        if exc is None:
            # A clean exit: components stopped their own tasks; stop any stragglers.
            await asyncio.gather(*(t.stop() for t in self.tasks.values()))
        try:
            await self._group.__aexit__(exc_type, exc, tb)
        finally:
            self._group = None

    def spawn(self, name: str, factory: TaskFactory, *, restart: bool = True) -> SupervisedTask:
        """Run `factory()` under this supervisor; names are unique and appear in every log."""
        if self._group is None:
            raise RuntimeError(f"supervisor {self.name} is not running (spawning {name})")
        if name in self.tasks and self.tasks[name].running:
            raise ValueError(f"a task named {name!r} is already running")
        handle = SupervisedTask(name, restart)
        handle._task = self._group.create_task(self._guard(handle, factory), name=name)
        self.tasks[name] = handle
        return handle

    async def _guard(self, handle: SupervisedTask, factory: TaskFactory) -> None:
        crashes: deque[float] = deque()
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await factory()
                log.info("task %s finished", handle.name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                handle.crashes += 1
                now = time.monotonic()
                crashes.append(now)
                while crashes and crashes[0] < now - self._window_s:
                    crashes.popleft()
                if not handle.restart or len(crashes) > self._max_restarts:
                    why = "no restart" if not handle.restart else (
                        f"{len(crashes)} crashes in {self._window_s:.0f} s")
                    log.critical("task %s crashed (%s): stopping the process", handle.name,
                                 why, exc_info=exc)
                    raise ComponentFailed(handle.name, exc) from exc
                attempt = 0 if now - started > self._window_s else attempt + 1
                delay = self._delay(attempt)
                log.error("task %s crashed; restarting in %.2f s", handle.name, delay,
                          exc_info=exc)
                await asyncio.sleep(delay)

    def _delay(self, attempt: int) -> float:
        low, high = self._backoff
        return random.uniform(low / 2, min(high, low * 2 ** min(attempt, 20)))


class ComponentTasks:
    """The tasks one component (a driver or a service) runs, on a shared supervisor.

    Components take the runtime's supervisor; built alone (a test, a tool) they get a
    private one, so a component's code is the same either way and its teardown is one
    `await tasks.stop()` that stops exactly the tasks it started.
    """

    def __init__(self, supervisor: Supervisor | None, component: str) -> None:
        self._shared = supervisor
        self._own: Supervisor | None = None
        self._component = component
        self._handles: list[SupervisedTask] = []

    async def start(self) -> None:
        if self._shared is None and self._own is None:
            self._own = Supervisor(self._component)
            await self._own.__aenter__()

    def spawn(self, name: str, factory: TaskFactory, *, restart: bool = True) -> SupervisedTask:
        supervisor = self._shared or self._own
        if supervisor is None:
            raise RuntimeError(f"{self._component}: start() before spawn({name!r})")
        handle = supervisor.spawn(name, factory, restart=restart)
        self._handles.append(handle)
        return handle

    async def stop(self) -> None:
        handles, self._handles = self._handles, []
        await asyncio.gather(*(h.stop() for h in reversed(handles)))
        own, self._own = self._own, None
        if own is not None:
            await own.__aexit__(None, None, None)


class RequestTasks:
    """Short tasks started per message (a payment, a Modbus write, a decision's publish).

    The message loop hands work here and moves on; the set is bounded so a flood turns
    into refusals the caller can count instead of unbounded memory, and closing waits
    briefly for work in flight (a payment half-answered) before cancelling the rest.
    """

    def __init__(self, name: str, limit: int = 10_000) -> None:
        self._name = name
        self._limit = limit
        self._running: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def start(self, work: Awaitable[None], name: str | None = None) -> bool:
        """Start `work`; False (and `work` closed unstarted) when at the limit."""
        if len(self._running) >= self._limit:
            if asyncio.iscoroutine(work):
                work.close()
            return False
        task = asyncio.ensure_future(work)
        if name is not None:
            task.set_name(name)
        self._running.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s failed", self._name, task.get_name(), exc_info=task.exception())

    async def close(self, grace_s: float = 2.0) -> None:
        if not self._running:
            return
        _, pending = await asyncio.wait(set(self._running), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
