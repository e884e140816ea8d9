"""Shared fixtures: real Mosquitto and PostgreSQL on free loopback ports; leak checks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from simulators.demo.broker import Mosquitto, mosquitto_binary
from tests.servers import Postgres, postgres_server, require


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """One broker for the session; tests isolate themselves with their own topic root."""
    require(mosquitto_binary() is not None, "mosquitto")
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def own_mosquitto() -> Iterator[Mosquitto]:
    """A broker this test may stop and restart."""
    require(mosquitto_binary() is not None, "mosquitto")
    broker = Mosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store test runs on both supported databases."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scgw.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_database()


# Threads that outlive a test by design: asyncio's default executor (closed with the loop,
# after fixtures finish) and the test servers' log pumps.
_ALLOWED_THREAD_PREFIXES = ("asyncio_", "pytest_timeout", "server-log")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Like zigpy's verify_cleanup: a test that leaves a thread running fails."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
                  and not t.name.startswith(_ALLOWED_THREAD_PREFIXES)]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if leaked:
        pytest.fail(f"test left threads running: {[t.name for t in leaked]}")


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """A test that leaves asyncio tasks pending fails, naming them."""
    yield
    current = asyncio.current_task()
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not leaked or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    if leaked:
        for task in leaked:
            task.cancel()
        pytest.fail(f"test left tasks running: {sorted(t.get_name() for t in leaked)}")
