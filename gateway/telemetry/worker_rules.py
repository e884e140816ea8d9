"""The rules consumer of the telemetry spool: the live anomaly engine of the gateway.

Why on the spool: the spool is the ordered, durable log of what ingest accepted (readings
and device events), so the live engine sees exactly what `scgw rules replay` sees in a
recording, in the same order, and the same readings give the same transitions both ways.

Exactly once, across restarts. The engine's state (pending `for` timers, firing alerts,
baselines) is saved with the spool record number it covers every `save_every_s`, and only
then is the spool cursor acknowledged; between saves the consumer reads ahead. After a
crash the engine is restored from the last save and the records after it are replayed. The
transitions that replay produces again have the same alert ids (rules.model.alert_id), so
`AlertLog.record` reports them as already known and nothing is published twice.

Transitions that change the store are published on `{root}/alerts/{rule_id}/{device}`
(QoS 1) and appended to the spool as `alerts` points for the InfluxDB writer. The wall
clock enters only through `Engine.tick`, every `tick_every_s` once the consumer has caught
up with the spool (and not in the first `tick_grace_s` after a start, while the broker
delivers what it queued): the live deadman for devices that went silent, which event time
alone cannot see when every device is silent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from device_drivers.vocabulary import DeviceEvent, Reading
from gateway.telemetry.alert_log import AlertLog
from gateway.telemetry.local_db import LocalDbError
from gateway.telemetry.records import ReadingMemo, encode_alert
from gateway.telemetry.spool import Position, Spool, SpoolClosedError
from rules.engine import Engine
from rules.model import Transition

log = logging.getLogger(__name__)

CONSUMER = "rules"
LINGER_S = 1.0
LINGER_BELOW = 2000  # records: a smaller batch waits up to `linger_s` for more
Publish = Callable[[Transition], None]


class RulesConsumer:
    """Runs `engine` over the spool's `rules` cursor until `stop()`; `run()` blocks.

    `make_engine(snapshot)` builds the engine, restored from a saved snapshot when one is
    given (it may raise ValueError for a snapshot it cannot use: the consumer then starts
    from a fresh engine and says so). Counters for the health report: `state`, `processed`,
    `fired`, `resolved`, `retries`, `last_error`, `lag_s`.
    """

    def __init__(self, spool: Spool, store: AlertLog,
                 make_engine: Callable[[bytes | None], Engine], *, rules_digest: str,
                 site: str, publish: Publish | None = None,
                 memo: ReadingMemo | None = None, linger_s: float = LINGER_S,
                 save_every_s: float = 5.0, tick_every_s: float = 10.0,
                 tick_grace_s: float = 60.0,
                 backoff_max_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.spool, self.store, self.make_engine = spool, store, make_engine
        self.rules_digest, self.site, self.publish = rules_digest, site, publish
        self.memo = memo if memo is not None else ReadingMemo(0)
        self.linger_s = linger_s
        self.save_every_s, self.tick_every_s = save_every_s, tick_every_s
        self.tick_grace_s = tick_grace_s
        self.backoff_max_s, self.clock = backoff_max_s, clock
        self.engine: Engine | None = None
        self.state = "starting"
        self.processed = self.fired = self.resolved = self.retries = self.quarantined = 0
        self.engine_errors = 0
        self.last_error: str | None = None
        self.lag_s = 0.0
        self._pos: Position | None = None
        self._applied = -1  # records below this recno are in the restored snapshot
        self._saved_pos: Position | None = None
        self._next_save = 0.0
        self._next_tick = 0.0
        self._stop = threading.Event()
        self._random = random.Random()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                self.step()
            self._save()  # an orderly stop leaves nothing to replay
        except SpoolClosedError:
            pass
        finally:
            self.state = "stopped"

    # ---- one step -------------------------------------------------------------------------

    def step(self, wait_s: float = 0.5) -> int:
        """Evaluate one batch (waiting up to `wait_s` for one); returns records consumed."""
        if self.engine is None and not self._start():
            return 0
        assert self.engine is not None and self._pos is not None
        engine = self.engine
        # A trickle is gathered up to `linger_s` into one engine call. Each call has a fixed
        # cost per rule (numpy set-up), which at a few readings a call cost more CPU than
        # ingest itself at 2,000 readings/s; rules with `for` durations of minutes lose
        # nothing by a second's wait.
        batch = self.spool.read_gathered(CONSUMER, fill=LINGER_BELOW, linger_s=self.linger_s,
                                         stop=self._stop, start=self._pos)
        if batch is None:
            return 0  # stopping
        if not batch.records:
            self.lag_s = 0.0
            now = time.monotonic()
            if now >= self._next_tick:  # caught up: silence now means silent devices
                self._next_tick = now + self.tick_every_s
                wall = self.clock()
                self._emit(self._evaluate(lambda: engine.tick(wall), 0))
            self.memo.caught_up()
            self._maybe_save()
            self.spool.wait(CONSUMER, min(wait_s, self.tick_every_s), start=self._pos)
            return 0
        if batch.first_appended is not None:
            self.lag_s = max(0.0, time.time() - batch.first_appended)
        skip = max(0, min(len(batch.records), self._applied - batch.start.recno))
        self.memo.forget(batch.records[:skip])
        items = self._decode(batch.records[skip:])
        if items:
            self._emit(self._evaluate(lambda: engine.process(items), len(items)))
        self.processed += len(items)
        self._pos = batch.end
        self._maybe_save()
        return len(batch.records)

    def _start(self) -> bool:
        try:
            saved = self.store.load_state()
        except (LocalDbError, OSError) as exc:
            self._failed(exc, self.retries)
            return False
        engine = None
        tail = self.spool.stats().written_recno
        if saved is not None:
            if saved.recno > tail:
                log.warning("rules: the saved engine state covers spool records up to %d but "
                            "the spool ends at %d (recreated); keeping the state, reading the "
                            "spool from its start", saved.recno, tail)
            else:
                self._applied = saved.recno
            try:
                engine = self.make_engine(saved.snapshot)
            except ValueError as exc:
                log.error("rules: the saved engine state cannot be restored (%s); starting "
                          "fresh: pending timers and baselines are relearnt", exc)
            else:
                if saved.rules_digest != self.rules_digest:
                    log.info("rules: the rule set changed since the last run; state kept for "
                             "the rules that did not change")
        self.engine = engine if engine is not None else self.make_engine(None)
        self._pos = self.spool.position(CONSUMER)
        self._saved_pos = self._pos
        self._next_save = time.monotonic() + self.save_every_s
        # After a restart the broker delivers what it queued meanwhile within seconds; a
        # wall-clock deadman before that would call every device silent.
        self._next_tick = time.monotonic() + self.tick_grace_s
        self.state = "ok"
        return True

    def _evaluate(self, run: Callable[[], list[Transition]], items: int) -> list[Transition]:
        """The engine over one batch. An engine bug must not stop telemetry: the readings
        are already spooled for the other sinks, so the batch is skipped for alerting,
        counted, logged with its traceback, and shown in /readyz until a batch succeeds."""
        try:
            transitions = run()
        except Exception as exc:
            self.engine_errors += 1
            self.last_error = f"engine error: {type(exc).__name__}: {str(exc)[:200]}"
            if self.state != "error":
                log.exception("rules: the engine failed on a batch of %d items; batch skipped "
                              "for alerting (telemetry is unaffected)", items)
            self.state = "error"
            return []
        if self.state == "error":
            log.info("rules: the engine evaluates again after %d failed batches",
                     self.engine_errors)
            self.state = "ok"
        return transitions

    def _decode(self, records: Sequence[bytes]) -> list[Reading | DeviceEvent]:
        decoded, bad = self.memo.decode(records)
        self.quarantined += len(bad)
        return [item for item in decoded if isinstance(item, Reading | DeviceEvent)]

    # ---- effects --------------------------------------------------------------------------

    def _emit(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        attempt = 0
        while True:
            try:
                new = self.store.record(transitions)
                break
            except (LocalDbError, OSError) as exc:
                if self._stop.is_set():
                    raise SpoolClosedError("stopping with unrecorded transitions") from exc
                self._failed(exc, attempt)
                attempt += 1
        if self.state == "retrying":
            self.state = "ok"
        records = []
        for transition in new:
            if transition.state == "firing":
                self.fired += 1
            else:
                self.resolved += 1
            log.log(logging.WARNING if transition.state == "firing" else logging.INFO,
                    "alert %s %s: %s", transition.rule_id, transition.state, transition.message)
            if self.publish is not None:
                self.publish(transition)
            record = encode_alert(transition.to_wire(), self.site)
            if record is not None:
                records.append(record)
        if records:
            self.spool.append(records)

    def _maybe_save(self) -> None:
        if time.monotonic() >= self._next_save:
            self._save()

    def _save(self) -> None:
        """Persist the engine with the record number it covers, then free the spool."""
        if self.engine is None or self._pos is None or self._pos == self._saved_pos:
            self._next_save = time.monotonic() + self.save_every_s
            return
        try:
            self.store.save_state(self._pos.recno, self.rules_digest, self.engine.snapshot(),
                                  time.time())
        except (LocalDbError, OSError) as exc:
            self._failed(exc, 0)  # the spool keeps the records; the next save covers them
            return
        self._applied = self._pos.recno
        self.spool.ack(CONSUMER, self._pos)
        self._saved_pos = self._pos
        self._next_save = time.monotonic() + self.save_every_s

    def _failed(self, exc: Exception, attempt: int) -> None:
        self.retries += 1
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if self.state != "retrying":
            log.warning("rules: %s; retrying with backoff", self.last_error)
        self.state = "retrying"
        ceiling = min(self.backoff_max_s, 0.5 * 2 ** min(attempt, 16))
        self._stop.wait(ceiling / 2 + self._random.uniform(0, ceiling / 2))
