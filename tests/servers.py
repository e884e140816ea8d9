"""Real servers for the tests, started on free loopback ports in temp dirs.

With CI=true a missing server binary is a failure, never a skip: a green run must mean the
code was exercised against the real thing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from simulators.demo.broker import free_port, wait_for_port


def require(binary_found: bool, what: str) -> None:
    if binary_found:
        return
    message = f"{what} is not installed; `make test` installs it (apt-get)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Postgres:
    """A throw-away PostgreSQL cluster; as root it runs as the `postgres` user."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        require(initdb is not None and pg_ctl is not None, "PostgreSQL (initdb, pg_ctl)")
        assert initdb is not None and pg_ctl is not None
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="scgw-pg-")
        self.data = Path(self.tmp) / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.tmp, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as_user, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def start(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-w", "-l",
                  str(Path(self.tmp) / "log"), "start")
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        subprocess.run([*self._as_user, self.pg_ctl, "-D", str(self.data), "-m", "immediate",
                        "stop"], check=False, capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh database per test keeps tests independent at ~50 ms each."""
        import psycopg

        name = f"t{time.monotonic_ns()}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()
