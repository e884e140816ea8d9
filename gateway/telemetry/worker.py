"""The telemetry worker: its own process from MQTT to the spool, and from the spool to the sinks.

Why a process of its own: a telemetry flood then competes with access decisions for CPU
time only, never for the main process's event loop or its GIL (measured by the lead). The
main gateway no longer subscribes to telemetry; it publishes Modbus-polled readings on the
contract topic `{root}/devices/{id}/telemetry`, so this worker ingests MQTT devices and Modbus
units alike.

    python -m gateway.telemetry.worker  < site-config.json

reads its view of the site configuration as JSON on stdin (`WorkerConfig`, secrets
included, as gateway.app.telemetry_process writes it: never on a command line, never logged;
neither pydantic nor SQLAlchemy is imported here: worker_config.py, local_db.py) and runs until
SIGTERM/SIGINT: exit 0 after an orderly stop, 1 when a thread died or the spool could not be
opened (the main process's supervisor restarts it), 2 for a configuration it cannot read,
75 after an orderly hand-over to a fresh worker that gives memory back (recycle.py).
`run_worker(config, stop)` is the same in-process, for tests.

Threads: paho's network thread (ingest on the fast path: parse, dedupe, encode, append to
the spool before the PUBACK, see worker_mqtt.py), the local-store consumer (worker_local.py),
the InfluxDB writer when `influxdb` is configured (writers.py), the spool's fsync thread, and
the main thread, which publishes the health report every 2 s as a retained message on
`{root}/gateway/{site}/telemetry` (the last will on that topic says `{"online": false}`) and
watches for a dead thread. The MQTT session is persistent (v5, clean start off, one day's
session expiry, stable client id `scgw-{site}-telemetry`, QoS 1), so readings published while
the worker restarts wait at the broker.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_drivers.mqtt_protocol import alert_topic, polled_subscription
from gateway.telemetry import PARENT_PID_ENV, health_topic
from gateway.telemetry.alert_log import AlertLog
from gateway.telemetry.ingest import Ingest
from gateway.telemetry.local_db import LocalDb, LocalDbError
from gateway.telemetry.records import ReadingMemo
from gateway.telemetry.recycle import RECYCLE_EXIT, MemoryWatch, observe, rss_mb
from gateway.telemetry.rollups import RollupStore
from gateway.telemetry.rules_site import load_rule_set, rules_digest, site_context
from gateway.telemetry.spool import Spool
from gateway.telemetry.spool_ingest import SpoolIngestor
from gateway.telemetry.worker_config import WorkerConfig, WorkerConfigError
from gateway.telemetry.worker_local import LocalStoreConsumer
from gateway.telemetry.worker_mqtt import IngestClient, session_properties
from gateway.telemetry.worker_rules import RulesConsumer
from gateway.telemetry.worker_seed import seed_from_spool
from gateway.telemetry.writers import InfluxWriter, build_writer
from rules.engine import Engine as RulesEngine
from rules.loader import RuleFileError
from rules.model import Transition

log = logging.getLogger("gateway.telemetry.worker")  # also when run as __main__

SESSION_EXPIRY_S = 86_400
HEALTH_EVERY_S = 2.0
NICENESS = 10  # lower CPU priority than the access process
SINK_NICENESS = 19  # the sink threads: lower still (see `main`)
GIL_SWITCH_S = 0.001
MEMO_MAX = 4_000  # readings per consumer between append and read: 2 s at 2,000/s (~2 MB)
STOP_JOIN_S = 5.0  # the main process kills the worker 10 s after SIGTERM


def client_id(config: WorkerConfig) -> str:
    """Stable across restarts: the broker keeps the session (and queued readings) by it.

    With a broker login, a suffix derived from the password makes the id unguessable: any
    logged-in device could otherwise connect with this id, take the session over and let
    the ACL drop the readings queued in it (MQTT has no per-user client ids)."""
    password = config.mqtt.password
    if not password:
        return f"scgw-{config.site_id}-telemetry"
    suffix = hmac.new(password.encode(), b"scgw-telemetry-session", hashlib.sha256)
    return f"scgw-{config.site_id}-telemetry-{suffix.hexdigest()[:12]}"


class TelemetryWorker:
    """Owns the spool, the MQTT client and the sink threads of one worker run."""

    def __init__(self, config: WorkerConfig, *, fast_path: bool = True,
                 health_every_s: float = HEALTH_EVERY_S, retry_max_s: float = 30.0,
                 may_hand_over: bool = False) -> None:
        self.config, self.fast_path, self.health_every_s = config, fast_path, health_every_s
        self.retry_max_s = retry_max_s
        # Only as a process of its own: in-process (tests), the RSS is the host's and nobody
        # would start the next worker.
        self.may_hand_over = may_hand_over
        self.site, self.root = config.site_id, config.mqtt.root
        self.topic = health_topic(self.root, self.site)
        self.ingest = Ingest({d.device_id: d.kind for d in config.devices})
        self.failure: str | None = None
        self.started_at = time.time()
        self.connects = 0
        self.subscribed = False
        self._wake = threading.Event()
        self._stopping = False
        self.handing_over = False  # recycle.py: memory after a backlog; exit RECYCLE_EXIT
        self._threads: list[threading.Thread] = []
        self._rate = (time.monotonic(), 0)
        self.rules: RulesConsumer | None = None

    # ---- threads ------------------------------------------------------------------------

    def _died(self, what: str) -> None:
        if self.failure is None:
            self.failure = what
        self._wake.set()

    def _start(self, name: str, target: Callable[[], None], *, sink: bool = False) -> None:
        def guarded() -> None:
            if sink:
                _lower_priority()
            try:
                target()
            except BaseException:
                log.exception("telemetry worker thread %r died", name)
                self._died(f"thread {name} died")
                raise
        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        """Threads not started by `_start` (paho's network thread) end the worker too."""
        name = args.thread.name if args.thread is not None else "?"
        if not any(t is args.thread for t in self._threads):
            log.error("telemetry worker thread %r died", name, exc_info=args.exc_value)
            self._died(f"thread {name} died")

    # ---- MQTT ---------------------------------------------------------------------------

    def _client(self, sink: SpoolIngestor) -> IngestClient:
        mqtt_cfg = self.config.mqtt
        client = IngestClient(client_id(self.config), sink, fast_path=self.fast_path)
        if mqtt_cfg.username is not None:
            client.username_pw_set(mqtt_cfg.username, mqtt_cfg.password)
        if mqtt_cfg.tls:
            client.tls_set_context(ssl.create_default_context())
        client.reconnect_delay_set(max(1, round(mqtt_cfg.reconnect_min_s)),
                                   max(1, round(mqtt_cfg.reconnect_max_s)))
        client.will_set(self.topic, json.dumps({"online": False, "site": self.site,
                                                "reason": "connection lost"}),
                        qos=1, retain=True)
        subscriptions = [(f"{self.root}/devices/+/telemetry", 1),
                         (f"{self.root}/devices/+/event", 1),
                         (polled_subscription(self.root, self.site), 1)]

        def on_connect(c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.error("MQTT broker refused the telemetry worker: %s", reason)
                return
            self.connects += 1
            log.info("telemetry worker connected to %s (session %s)", mqtt_cfg.url,
                     "resumed" if flags.session_present else "new: nothing was queued")
            c.subscribe(subscriptions)

        def on_subscribe(_c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
            self.subscribed = not any(r.is_failure for r in reasons)
            if not self.subscribed:
                log.error("MQTT broker refused the subscription to %s: %s (check its ACL)",
                          [t for t, _ in subscriptions], [str(r) for r in reasons])

        def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self.subscribed = False
            if not self._stopping:
                log.warning("telemetry worker lost the MQTT connection (%s); reconnecting",
                            reason)

        client.on_connect, client.on_subscribe = on_connect, on_subscribe
        client.on_disconnect = on_disconnect
        client.connect_async(mqtt_cfg.host, mqtt_cfg.port, mqtt_cfg.keepalive_s,
                             clean_start=False, properties=session_properties(SESSION_EXPIRY_S))
        return client

    # ---- health -------------------------------------------------------------------------

    def health(self, spool: Spool, client: IngestClient | None, local: LocalStoreConsumer,
               writer: InfluxWriter | None, *, online: bool = True) -> dict[str, Any]:
        """The retained report that gateway.telemetry.health reads for /readyz and /metrics:

        `{"online", "handing_over", "site", "pid", "ts", "started_at",
          "mqtt": {"connected", "subscribed", "connects", "fast_path"},
          "ingest": {"messages", "accepted", "duplicates", "gaps", "missing", "seq_resets",
                     "refused": {reason: n}, "msg_per_s"},
          "spool": {"bytes", "max_bytes", "disk_bytes", "buffered_bytes", "segments",
                    "appended", "dropped", "written_recno", "synced_recno", "truncated_bytes",
                    "consumers": {name: {"depth_records", "depth_bytes", "oldest_age_s",
                                         "dropped"}}},
          "sinks": {"local" | "influxdb": {"state", "lag_s", "written", "retries",
                                           "quarantined", "last_error"}}}`
        """
        stats = spool.stats()
        now, mono = time.time(), time.monotonic()
        before_t, before_n = self._rate
        self._rate = (mono, self.ingest.messages)
        rate = (self.ingest.messages - before_n) / max(mono - before_t, 1e-6)
        consumers = {name: {"depth_records": c.depth_records, "depth_bytes": c.depth_bytes,
                            "oldest_age_s": c.oldest_age_s, "dropped": c.dropped}
                     for name, c in stats.consumers.items()}
        sinks: dict[str, dict[str, Any]] = {"local": {
            "state": local.state, "lag_s": stats.consumers["local"].oldest_age_s or 0.0,
            "written": local.written, "retries": local.retries,
            "quarantined": local.quarantined, "last_error": local.last_error}}
        if self.rules is not None:
            rules = self.rules
            sinks["rules"] = {
                "state": rules.state, "lag_s": rules.lag_s, "written": rules.processed,
                "retries": rules.retries, "quarantined": rules.quarantined,
                "last_error": rules.last_error, "fired": rules.fired,
                "engine_errors": rules.engine_errors,
                "resolved": rules.resolved}
        if writer is not None:
            sinks["influxdb"] = {
                "state": str(writer.state),
                "lag_s": stats.consumers["influxdb"].oldest_age_s or 0.0,
                "written": writer.written, "retries": writer.retries,
                "quarantined": writer.quarantined, "last_error": writer.last_error}
        return {
            "online": online, "handing_over": self.handing_over, "site": self.site,
            "pid": os.getpid(), "ts": now,
            "started_at": self.started_at,
            "mqtt": {"connected": client is not None and client.is_connected(),
                     "subscribed": self.subscribed, "connects": self.connects,
                     "fast_path": client is not None and client.fast_path},
            "ingest": {**self.ingest.counters(), "msg_per_s": round(rate, 1)},
            "spool": {"bytes": stats.disk_bytes + stats.buffered_bytes,
                      "max_bytes": spool.max_bytes, "disk_bytes": stats.disk_bytes,
                      "buffered_bytes": stats.buffered_bytes, "segments": stats.segments,
                      "appended": stats.appended, "dropped": stats.dropped,
                      "written_recno": stats.written_recno, "synced_recno": stats.synced_recno,
                      "truncated_bytes": stats.truncated_bytes, "consumers": consumers},
            "sinks": sinks,
        }

    # ---- running ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        config = self.config
        directory = Path(config.spool_dir)
        consumers = ["local", "rules"] + (["influxdb"] if config.influxdb is not None else [])
        try:
            spool = Spool(directory, consumers, max_bytes=config.spool_max_bytes,
                          fsync_interval_s=config.fsync_interval_s)
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("telemetry worker cannot open the spool %s: %s", directory, exc)
            return 1
        try:
            seed_from_spool(directory, self.ingest, spool.max_record_bytes)
            # One connection per sink thread: the local store's and the rules consumer's.
            databases = [LocalDb(config.database_url), LocalDb(config.database_url)]
            writer = self._writer(spool, directory)
        except BaseException:
            spool.close()
            raise
        memos = {name: ReadingMemo(MEMO_MAX) for name in ("local", "rules")}
        local = LocalStoreConsumer(spool, RollupStore(databases[0], config.local_retention_days),
                                   memo=memos["local"], backoff_max_s=self.retry_max_s)
        client: IngestClient | None = None
        try:
            rules = self._rules_consumer(spool, databases[1], lambda: client, memos["rules"])
        except BaseException:
            spool.close()
            raise
        self.rules = rules
        previous_hook, threading.excepthook = threading.excepthook, self._excepthook
        try:
            # The CPU-heavy sinks; the InfluxDB writer (a join and a gzip per batch) keeps the
            # worker's priority, so readings stay queryable within a second under load.
            self._start("telemetry-local", local.run, sink=True)
            self._start("telemetry-rules", rules.run, sink=True)
            if writer is not None:
                self._start("telemetry-influxdb", writer.run)
            sink = SpoolIngestor(self.ingest, spool, root=self.root, site=self.site,
                                 memos=list(memos.values()),
                                 buildings={d.device_id: d.building for d in config.devices},
                                 polled=[d.device_id for d in config.devices if d.is_modbus])
            client = self._client(sink)
            client.loop_start()
            log.info("telemetry worker for site %s: spool %s, sinks %s", self.site, directory,
                     ", ".join(consumers))
            next_health = 0.0
            watch = MemoryWatch(rss_mb())
            while not stop.is_set() and self.failure is None and not self.handing_over:
                if time.monotonic() >= next_health:
                    next_health = time.monotonic() + self.health_every_s
                    report = self.health(spool, client, local, writer)
                    self._publish(client, report)
                    if self.may_hand_over:
                        watch = self._watch_memory(watch, report)
                self._wake.wait(min(0.2, max(0.0, next_health - time.monotonic())))
        finally:
            self._stopping = True  # from here on a disconnect is expected
            self._shutdown(spool, client, local, writer)
            threading.excepthook = previous_hook
            for database in databases:
                database.close()
        if self.failure is not None:
            log.error("telemetry worker ends: %s", self.failure)
            return 1
        if self.handing_over:
            log.info("telemetry worker stopped; a fresh one takes over")
            return RECYCLE_EXIT
        log.info("telemetry worker stopped")
        return 0

    def _watch_memory(self, before: MemoryWatch, report: dict[str, Any]) -> MemoryWatch:
        depths = (c["depth_records"] for c in report["spool"]["consumers"].values())
        after, self.handing_over = observe(before, rss_mb(), depths,
                                           self.config.recycle_growth_mb)
        if self.handing_over:
            log.info("telemetry worker: %.0f MB after a backlog of %d readings drained, %.0f "
                     "MB before it; handing over to a fresh worker to give the memory back",
                     after.quiet_rss_mb, before.peak_backlog, before.quiet_rss_mb)
        return after

    def _rules_consumer(self, spool: Spool, database: LocalDb,
                        client: Callable[[], IngestClient | None], memo: ReadingMemo
                        ) -> RulesConsumer:
        """The live rules engine on the spool; a bad rule file ends the worker (exit 2)."""
        rule_set = load_rule_set(self.config.rule_files)
        context = site_context(self.config)

        def make(snapshot: bytes | None) -> RulesEngine:
            if snapshot is None:
                return RulesEngine(rule_set, context)
            return RulesEngine.restore(rule_set, context, snapshot)

        def publish(transition: Transition) -> None:
            mqtt_client = client()
            if mqtt_client is not None:  # paho queues QoS 1 messages while disconnected
                mqtt_client.publish(
                    alert_topic(self.root, transition.rule_id, transition.device_id),
                    json.dumps(transition.to_wire(), separators=(",", ":")), qos=1)

        log.info("rules: %d rules (%s)", len(rule_set),
                 ", ".join(self.config.rule_files) or "the bundled defaults")
        return RulesConsumer(spool, AlertLog(database), make, rules_digest=rules_digest(rule_set),
                             site=self.site, publish=publish, memo=memo)

    def _writer(self, spool: Spool, directory: Path) -> InfluxWriter | None:
        influx = self.config.influxdb
        if influx is None:
            return None
        return build_writer(spool, api=influx.api, url=influx.url, database=influx.database,
                            org=influx.org, bucket=influx.bucket, token=influx.token,
                            username=influx.username, password=influx.password,
                            quarantine_path=directory / "quarantine.jsonl")

    def _publish(self, client: IngestClient, report: dict[str, Any]) -> None:
        if client.is_connected():
            client.publish(self.topic, json.dumps(report, separators=(",", ":")), qos=1,
                           retain=True)

    def _shutdown(self, spool: Spool, client: IngestClient | None, local: LocalStoreConsumer,
                  writer: InfluxWriter | None) -> None:
        """Ingest off first (nothing more to append), then the sinks, then the spool."""
        if client is not None:
            if client.is_connected():
                info = client.publish(self.topic, json.dumps(
                    self.health(spool, client, local, writer, online=False)), qos=1,
                    retain=True)
                try:
                    info.wait_for_publish(timeout=2.0)
                except (RuntimeError, ValueError):
                    pass
            client.disconnect()  # session kept: readings queue at the broker meanwhile
            client.loop_stop()
        local.stop()
        if self.rules is not None:
            self.rules.stop()
        if writer is not None:
            writer.stop()
        deadline = time.monotonic() + STOP_JOIN_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("telemetry worker: %s did not stop in time", thread.name)
        spool.close()  # final write and fsync
        if writer is not None:
            writer.transport.close()


def run_worker(config: WorkerConfig, stop: threading.Event | None = None, *,
               may_hand_over: bool = False) -> int:
    """Run the worker until `stop` is set; the process exit code (0 orderly, 1 failed,
    RECYCLE_EXIT handed over)."""
    return TelemetryWorker(config, may_hand_over=may_hand_over).run(stop or threading.Event())


def _lower_priority() -> None:
    """This thread (the local store or the rules) at `SINK_NICENESS`, below ingest: `main`."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SINK_NICENESS)


def _end_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the gateway dies, kill -9 included.

    The gateway starts the worker in a process group of its own (a terminal's Ctrl-C is the
    gateway's to handle, and it stops the worker in order), so without this a killed gateway
    would leave an orphan holding the spool lock and the MQTT session.
    """
    if sys.platform != "linux":
        return
    parent = int(os.environ.get(PARENT_PID_ENV, "0")) or os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the gateway died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s telemetry-worker %(levelname)s %(name)s: "
                               "%(message)s")
    # Readings can wait in the broker and the spool; a resident at a gate cannot. When the
    # cores are contended, the scheduler runs the access process first, then this worker's
    # ingest (taking readings off the broker, into the spool), and its sinks last: the spool
    # is there to absorb what they have not written yet. A sink holding the GIL would still
    # keep ingest waiting for the interpreter's switch interval (5 ms by default), so it is
    # shortened. Measured (docs/decisions.md): ingest 0.24x of `mosquitto_sub` with the
    # sinks at the worker's nice 10, 0.36x at 19 (median rounds), access p99 unchanged.
    os.nice(NICENESS)
    sys.setswitchinterval(GIL_SWITCH_S)
    _end_with_parent()
    try:
        config = WorkerConfig.from_json(sys.stdin.buffer.read())
    except WorkerConfigError as exc:  # its message never echoes the input: secrets
        log.error("telemetry worker: unusable configuration on stdin: %s", exc)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("telemetry worker: %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return run_worker(config, stop, may_hand_over=True)
    except RuleFileError as exc:  # `scgw run` checks first; a file edited since is caught here
        log.error("telemetry worker: the rule files have problems: %s", "; ".join(exc.problems))
        return 2
    except OSError as exc:
        log.error("telemetry worker: cannot read a rule file: %s", exc)
        return 2
    except LocalDbError as exc:  # database.url of a kind the worker does not speak
        log.error("telemetry worker: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
