"""Shared fixtures: real Mosquitto and PostgreSQL on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
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
