"""Starting an MQTT broker for the demo and the tests.

Production sites run their own broker (Mosquitto, EMQX, ...) with the files of
`scgw mqtt-config`. `scgw demo` starts Mosquitto with those files too (generated into its
data directory: per-device logins, ACL, no anonymous clients); without Mosquitto installed
it falls back to the embedded amqtt broker, which enforces the same passwd and acl files
(simulators/demo/amqtt_acl.py).

`Mosquitto()` without a configuration is the tests' and benchmarks' throw-away broker:
loopback only, one run, anonymous allowed so that protocol tests need no logins. Tests of
authentication start it with generated files (`Mosquitto(conf_path=...)`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

# The settings the gateway is measured with; deploy/mosquitto/mosquitto.conf is the
# production counterpart and docs/deploy-mqtt.md explains each line. In short:
# - set_tcp_nodelay: with Nagle on, decision round trips rose from ~1 ms to ~38 ms under
#   telemetry load (docs/benchmarks.md).
# - max_queued_messages / max_queued_bytes: the gateway's telemetry session is persistent
#   (QoS 1, clean start off, session expiry), so readings published while it restarts wait
#   here. Mosquitto's default of 1000 queued messages per client would keep half a second of
#   a 2,000 readings/s flood and silently drop the rest; 200,000 keeps 100 s of it, and the
#   byte bound keeps a gateway that never returns from eating the broker's memory.
# - queue_qos0_messages: a device publishing readings at QoS 0 would otherwise have them
#   dropped, not queued, for the offline gateway.
# - max_inflight_messages: QoS 1 deliveries not yet acknowledged per client; Mosquitto's 20
#   throttles a busy gateway to 20 readings per round trip of its event loop.
# Formatted with `port` and `host` only (bench/bench_roundtrip.py edits and formats it);
# persistence needs a data directory and is added by `mosquitto_conf`.
MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
set_tcp_nodelay true
max_queued_messages 200000
max_queued_bytes 268435456
queue_qos0_messages true
max_inflight_messages 1000
log_dest stderr
log_type error
log_type warning
"""

# Persistence: sessions and their queued readings survive a broker restart (saved on
# SIGTERM and every autosave_interval). `user` names the account running the tests: run as
# root, Mosquitto otherwise drops to the `mosquitto` user, which cannot write the data
# directory it was given, and loses the save.
MOSQUITTO_PERSISTENCE = """\
persistence true
persistence_location {data_dir}/
autosave_interval 60
user {user}
"""


def mosquitto_conf(port: int, host: str, data_dir: Path) -> str:
    """The whole test/demo broker configuration: MOSQUITTO_CONF plus persistence."""
    return MOSQUITTO_CONF.format(port=port, host=host) + MOSQUITTO_PERSISTENCE.format(
        data_dir=data_dir, user=pwd.getpwuid(os.getuid()).pw_name)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server started a moment later.

    Chosen below the kernel's ephemeral range (where bind(0) would pick), so that no
    outgoing connection made in between takes it: with many clients connecting while
    servers start (tests on parallel workers), bind(0)'s port was sometimes in use by the
    time the server bound it.
    """
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12000), low))
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


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


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when its parent dies (kill -9 of
    `scgw demo` must not leave an orphaned broker in its own session holding a port).

    The kernel ties this to the forking *thread*, so it is only set from the main thread: a
    broker started from a worker thread would otherwise die with that thread.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl, parent = libc.prctl, os.getpid()  # looked up before fork: the hook only calls

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


_PR_SET_PDEATHSIG = 1


class Mosquitto:
    """A Mosquitto process on loopback; restartable on the same port (for reconnect tests),
    keeping persistent sessions and retained messages across the restart like a real one.

    `conf_path`: run this configuration (e.g. `scgw mqtt-config`'s, which must listen on
    `host`:`port`) instead of the anonymous test broker's. Its stderr then goes to
    `log_path` (beside it), where refused logins show up.
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", *,
        conf_path: Path | None = None,
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        if conf_path is not None and port is None:
            raise ValueError("a given configuration names its port: pass it as `port`")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._dir = tempfile.TemporaryDirectory(prefix="scgw-mosquitto-")
        self.data_dir = Path(self._dir.name) / "data"
        self.data_dir.mkdir()
        self.log_path: Path | None = None
        if conf_path is None:
            self.conf_path = Path(self._dir.name) / "mosquitto.conf"
            self.conf_path.write_text(mosquitto_conf(self.port, host, self.data_dir))
        else:
            self.conf_path = conf_path
            self.log_path = conf_path.parent / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        # A session of its own: Ctrl-C in a terminal signals the whole foreground process
        # group, and a broker dying at the same moment as the clients it serves turned the
        # demo's orderly shutdown into a page of MQTT disconnect tracebacks. The broker is
        # stopped by `stop()`, after its clients, and by the kernel if its parent is killed.
        command = [self.binary, "-c", str(self.conf_path)]
        if self.log_path is None:
            self._proc = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent())
        else:
            with self.log_path.open("ab") as out:
                self._proc = subprocess.Popen(
                    command, stdout=out, stderr=out,
                    start_new_session=True, preexec_fn=_die_with_parent())
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            ended = self._proc.poll()
            self.stop()
            if ended is not None and self.log_path is not None:
                raise RuntimeError(f"mosquitto exited ({ended}) with {self.conf_path}: "
                                   f"{self.log_path.read_text()[-2000:]}") from None
            raise
        log.info("mosquitto listening on %s:%d", self.host, self.port)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

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
    """amqtt in-process, for the demo on machines without Mosquitto (~25x slower).

    It enforces the `passwd` and `acl` files of `scgw mqtt-config` (amqtt_acl.py): there is
    no way to start it open.
    """

    def __init__(
        self, password_file: Path, acl_file: Path, port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.password_file, self.acl_file = password_file, acl_file
        self._broker: object | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        from amqtt.contexts import BrokerConfig, ListenerConfig

        from simulators.demo.amqtt_acl import AclBroker, PasswdAuthPlugin

        plugin = f"{PasswdAuthPlugin.__module__}.{PasswdAuthPlugin.__name__}"
        config = BrokerConfig(
            listeners={"default": ListenerConfig(type="tcp", bind=f"{self.host}:{self.port}")},
            plugins={plugin: {"password_file": str(self.password_file),
                              "acl_file": str(self.acl_file)}},
        )
        broker = AclBroker(config, self.acl_file)
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
