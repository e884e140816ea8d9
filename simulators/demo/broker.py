"""Starting an MQTT broker for the demo and the tests.

Production sites run their own broker (Mosquitto, EMQX, ...). The demo and the tests start
Mosquitto on a free loopback port with the settings the gateway is measured with; without
Mosquitto installed the demo falls back to the embedded amqtt broker.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

# set_tcp_nodelay matters: with Nagle on, decision round trips rose from ~1 ms to ~38 ms
# under telemetry load (docs/benchmarks.md).
MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
set_tcp_nodelay true
persistence false
max_queued_messages 10000
log_dest stderr
log_type error
log_type warning
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                message = f"nothing listens on {host}:{port} after {timeout_s} s"
                raise TimeoutError(message) from None
            time.sleep(0.05)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


class Mosquitto:
    """A Mosquitto process on loopback; restartable on the same port (for reconnect tests)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._dir = tempfile.TemporaryDirectory(prefix="scgw-mosquitto-")
        self.conf_path = Path(self._dir.name) / "mosquitto.conf"
        self.conf_path.write_text(MOSQUITTO_CONF.format(port=self.port, host=host))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.host, self.port)
        log.info("mosquitto listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedBroker:
    """amqtt in-process, for the demo on machines without Mosquitto (~25x slower)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: object | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        from amqtt.broker import Broker
        from amqtt.contexts import BrokerConfig, ListenerConfig

        config = BrokerConfig(
            listeners={"default": ListenerConfig(type="tcp", bind=f"{self.host}:{self.port}")},
            plugins={"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        )
        broker = Broker(config)
        await broker.start()
        self._broker = broker
        log.info("embedded amqtt broker listening on %s:%d", self.host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()  # type: ignore[attr-defined]
