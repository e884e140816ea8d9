"""Real InfluxDB 1.x and VictoriaMetrics for the telemetry tests, on free loopback ports.

Both run from their Debian packages in a temp dir; tests use them through `influxdb_server()`
and `victoria_metrics_server()` (the fixtures in tests/test_influx_writers.py do). The
InfluxDB server can be stopped and started again on the same port and data: the outage test
needs exactly that. With CI=true a missing binary fails the test (tests/servers.py
`require`), otherwise it skips.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulators.demo.broker import free_port
from tests.servers import require

INFLUXDB_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
  trace-logging-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  auth-enabled = {auth}
  log-enabled = false
  max-body-size = 0

[continuous_queries]
  enabled = false

[subscriber]
  enabled = false
"""


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, deadline_s: float) -> None:
    """Poll `url` until it answers 2xx; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {deadline_s} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class InfluxDB:
    """`influxd` 1.x with its own config, data dir and ports; `stop()`/`start()` keep both."""

    def __init__(self, *, auth: bool = False, database: str = "scgw") -> None:
        binary = shutil.which("influxd")
        require(binary is not None, "InfluxDB 1.x (influxd, Debian package influxdb)")
        assert binary is not None
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="scgw-influx-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database = database
        self.auth = auth
        self.admin = ("admin", "admin-secret")
        self.config = self.root / "influxdb.conf"
        self.config.write_text(INFLUXDB_CONFIG.format(
            root=self.root, port=self.port, rpc_port=free_port(),
            auth="true" if auth else "false"))
        self.log = self.root / "influxd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._initialised = False

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([self.binary, "-config", str(self.config)],
                                            stdout=out, stderr=subprocess.STDOUT)
        _wait_http(f"{self.url}/ping", self.process, self.log, 30.0)
        if not self._initialised:
            if self.auth:  # 1.x lets the first admin be created without credentials
                self.query(f"CREATE USER {self.admin[0]} WITH PASSWORD '{self.admin[1]}' "
                           "WITH ALL PRIVILEGES")
            self.query(f'CREATE DATABASE "{self.database}"')
            self._initialised = True

    def stop(self) -> None:
        _stop(self.process)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, q: str, *, database: str | None = None) -> list[dict[str, Any]]:
        """Run InfluxQL over HTTP and return the `series` of the first statement."""
        params = {"q": q, "epoch": "ms"}
        if database:
            params["db"] = database
        auth = self.admin if self.auth else None
        response = httpx.post(f"{self.url}/query", data=params, auth=auth, timeout=30.0)
        response.raise_for_status()
        result = response.json()["results"][0]
        if "error" in result:
            raise RuntimeError(result["error"])
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    def write(self, lines: str) -> httpx.Response:
        auth = self.admin if self.auth else None
        return httpx.post(f"{self.url}/write", params={"db": self.database, "precision": "ms"},
                          content=lines.encode(), auth=auth, timeout=30.0)


class VictoriaMetrics:
    """`victoria-metrics` single node: accepts the InfluxDB v2 write API of influxdb-client."""

    def __init__(self, *, basic_auth: tuple[str, str] | None = None) -> None:
        binary = shutil.which("victoria-metrics")
        require(binary is not None, "VictoriaMetrics (Debian package victoria-metrics)")
        assert binary is not None
        self.root = Path(tempfile.mkdtemp(prefix="scgw-vm-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "victoria-metrics.log"
        self.args = [binary, f"-httpListenAddr=127.0.0.1:{self.port}",
                     f"-storageDataPath={self.root / 'data'}", "-retentionPeriod=100y",
                     "-search.disableCache", "-search.latencyOffset=0s"]
        if basic_auth:
            self.args += [f"-httpAuth.username={basic_auth[0]}",
                          f"-httpAuth.password={basic_auth[1]}"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        _wait_http(f"{self.url}/health", self.process, self.log, 30.0)  # /health needs no auth

    def close(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.root, ignore_errors=True)

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every series matching the selector with all its samples (`/api/v1/export`)."""
        import json

        httpx.get(f"{self.url}/internal/force_flush", timeout=30.0)
        response = httpx.post(f"{self.url}/api/v1/export", data={"match[]": match},
                              timeout=30.0)
        response.raise_for_status()
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `condition()` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


@contextmanager
def influxdb_server(*, auth: bool = False) -> Iterator[InfluxDB]:
    """A started InfluxDB 1.x with database `scgw` (and an admin user when `auth`)."""
    server = InfluxDB(auth=auth)
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextmanager
def victoria_metrics_server(*, basic_auth: tuple[str, str] | None = None
                            ) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(basic_auth=basic_auth)
    try:
        server.start()
        yield server
    finally:
        server.close()
