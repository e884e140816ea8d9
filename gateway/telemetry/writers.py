"""Drain a spool cursor into InfluxDB: batches, backoff that never gives up, quarantine.

One `InfluxWriter` owns one spool consumer and one transport and runs `run()` in its own
thread (or `asyncio.to_thread`). It acknowledges a batch only after a 2xx, so a crash, an
outage or a restart of either side replays rather than loses; replays are harmless because a
point is identified by its series and millisecond. A batch is up to 5,000 lines; when the
writer has caught up it lingers up to `linger_s` (0.2 s) so a trickle of readings becomes one
POST rather than hundreds. What it does on each outcome:

- no answer, 5xx, 429, 404 (database missing): jittered exponential backoff, forever; only the
  spool's own bound (oldest dropped, counted there) ends the wait for a batch.
- 401/403: state `auth_failed`, one clear log line per episode, a slow retry.
- 400/422 naming bad points (field type conflict, parse error, partial write): the offending
  lines are found from the server's message (1.x names the field, measurement and type) or by
  bisecting the batch, written to the quarantine file, counted and logged once per reason;
  every other line of the batch is (re)sent. One bad point never blocks the queue.
- 413: the batch is halved.

The counters are plain attributes, read without locking by /metrics and /readyz (each is
written by the writer thread only).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Literal

from gateway.telemetry.influx_http import Response, Transport, V1Transport, V2Transport
from gateway.telemetry.line_protocol import field_types
from gateway.telemetry.spool import Position, Spool, SpoolClosedError

log = logging.getLogger(__name__)

MAX_BATCH_LINES = 5000
_CONFLICT = re.compile(r'input field "(?P<field>(?:[^"\\]|\\.)*)" on measurement '
                       r'"(?P<measurement>(?:[^"\\]|\\.)*)" is type (?P<type>\w+)')
_UNPARSABLE = re.compile(r"unable to parse '(?P<line>.*?)': ", re.DOTALL)
_POINT_ERRORS = ("partial write", "unable to parse", "cannot parse", "field type conflict",
                 "invalid field", "invalid tag", "invalid number", "invalid boolean",
                 "bad timestamp", "beyond retention", "unprocessable")


class WriterState(StrEnum):
    STARTING = "starting"
    OK = "ok"
    RETRYING = "retrying"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"


def _names_points(response: Response) -> bool:
    """A 400/422 about some points (quarantine them), not about the request (retry)."""
    text = response.message.lower()
    return response.status in (400, 422) and any(marker in text for marker in _POINT_ERRORS)


def _reason_key(message: str) -> str:
    """A message with the varying parts (counts, quoted lines) removed: log once per key."""
    return re.sub(r"dropped=\d+|'.*?'|\d+", "#", message)[:200]


class InfluxWriter:
    """Moves records from `spool` (consumer `consumer`) to `transport` until `stop()`."""

    def __init__(
        self,
        spool: Spool,
        transport: Transport,
        *,
        consumer: str = "influxdb",
        batch_lines: int = MAX_BATCH_LINES,
        linger_s: float = 0.2,
        quarantine_path: Path | str | None = None,
        quarantine_max_bytes: int = 64 << 20,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        auth_backoff_s: float = 60.0,
    ) -> None:
        self.spool, self.transport, self.consumer = spool, transport, consumer
        self.batch_lines = max(1, min(batch_lines, MAX_BATCH_LINES))
        self.linger_s = linger_s
        self.quarantine_path = Path(quarantine_path) if quarantine_path else None
        self.quarantine_max_bytes = quarantine_max_bytes
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.auth_backoff_s = auth_backoff_s
        self.state = WriterState.STARTING
        self.written = 0
        """Points the server accepted (2xx)."""
        self.retries = 0
        """Requests that failed and were (or will be) tried again."""
        self.quarantined = 0
        """Points the server refused, set aside in the quarantine file."""
        self.batches = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._stop = threading.Event()
        self._logged: set[str] = set()
        self._random = random.Random()

    # ---- observing ------------------------------------------------------------------------

    @property
    def lag_s(self) -> float:
        """Age of the oldest record this writer has not delivered (0 when caught up)."""
        age = self.spool.stats().consumers[self.consumer].oldest_age_s
        return age or 0.0

    # ---- running --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to return; safe from any thread. An unacked batch is replayed later."""
        self._stop.set()

    def run(self) -> None:
        """Deliver until `stop()` or the spool closes; blocking, for a thread of its own.

        Stop the writer before closing the spool; an exception other than the spool closing
        propagates, for the runtime's supervisor to log and restart.
        """
        log.info("%s: writer for spool consumer %r started", self.transport.description,
                 self.consumer)
        try:
            while not self._stop.is_set():
                self.step()
        except SpoolClosedError:
            log.info("%s: spool closed, writer stops", self.transport.description)
        finally:
            self.state = WriterState.STOPPED

    def step(self, wait_s: float = 0.5) -> int:
        """Deliver one batch (waiting up to `wait_s` for one); returns records consumed."""
        batch = self.spool.read(self.consumer, self.batch_lines)
        if not batch.records:
            self.spool.wait(self.consumer, wait_s)
            return 0
        if len(batch.records) < self.batch_lines and batch.first_appended is not None:
            # Caught up: let a trickle gather for up to `linger_s` (one POST, not hundreds).
            pause = batch.first_appended + self.linger_s - time.time()
            if pause > 0:
                if self._stop.wait(min(pause, self.linger_s)):
                    return 0
                batch = self.spool.read(self.consumer, self.batch_lines)
                if not batch.records:  # dropped meanwhile (spool full)
                    return 0
        if self._deliver(batch.records, batch.start):
            self.spool.ack(self.consumer, batch.end)
            self.batches += 1
            return len(batch.records)
        return 0

    def _deliver(self, lines: list[bytes], start: Position) -> bool:
        """True once every line is written or quarantined; False if stopped or overtaken."""
        response = self._post(lines, start)
        if response is None:
            return False
        if response.ok:
            self.written += len(lines)
            return True
        if len(lines) > 1 and response.status == 413:
            return self._halves(lines, start)
        if len(lines) == 1:
            self._quarantine(lines, response.message)
            return True
        suspects = self._suspects(lines, response.message)
        if not suspects:
            return self._halves(lines, start)
        self._quarantine([lines[i] for i in sorted(suspects)], response.message)
        rest = [line for i, line in enumerate(lines) if i not in suspects]
        return not rest or self._deliver(rest, start)

    def _halves(self, lines: list[bytes], start: Position) -> bool:
        middle = len(lines) // 2
        return self._deliver(lines[:middle], start) and self._deliver(lines[middle:], start)

    def _post(self, lines: list[bytes], start: Position) -> Response | None:
        """POST until the answer is final (2xx, 413 or a point error); None to abandon."""
        body = b"\n".join(lines)
        attempt = 0
        while not self._stop.is_set():
            response = self.transport.post(body)
            if response.ok or response.status == 413 or _names_points(response):
                if self.state is not WriterState.OK:
                    self._recovered()
                return response
            self.retries += 1
            self._failed(response)
            if response.status in (401, 403):
                delay = self.auth_backoff_s * self._random.uniform(0.75, 1.0)
            else:
                ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(attempt, 30))
                delay = ceiling / 2 + self._random.uniform(0, ceiling / 2)
                delay = min(self.backoff_max_s, max(delay, response.retry_after_s or 0.0))
            attempt += 1
            if self._stop.wait(delay):
                return None
            if self.spool.position(self.consumer).offset > start.offset:
                log.warning("%s: spool full, the batch being retried was dropped",
                            self.transport.description)
                return None
        return None

    def _failed(self, response: Response) -> None:
        status = "no answer" if response.status is None else f"HTTP {response.status}"
        self.last_error = f"{status}: {response.message}".strip()
        self.last_error_at = time.time()
        if response.status in (401, 403):
            if self.state is not WriterState.AUTH_FAILED:
                log.error("%s: authentication failed (%s); check the credentials "
                          "(SCGW__INFLUXDB__TOKEN or SCGW__INFLUXDB__USERNAME/PASSWORD); "
                          "retrying every %.0f s, readings stay in the spool",
                          self.transport.description, self.last_error, self.auth_backoff_s)
            self.state = WriterState.AUTH_FAILED
        else:
            if self.state is not WriterState.RETRYING:
                log.warning("%s: write failed (%s); retrying with backoff, readings stay in "
                            "the spool", self.transport.description, self.last_error)
            self.state = WriterState.RETRYING

    def _recovered(self) -> None:
        if self.state in (WriterState.RETRYING, WriterState.AUTH_FAILED):
            log.info("%s: writing again after %d retries", self.transport.description,
                     self.retries)
        self.state = WriterState.OK

    def _suspects(self, lines: list[bytes], message: str) -> set[int]:
        """Indexes of lines the server's message points at (empty: bisect instead)."""
        found: set[int] = set()
        for match in _CONFLICT.finditer(message):
            field, measurement = match["field"], match["measurement"]
            for index, line in enumerate(lines):
                name, types = field_types(line.decode(errors="replace"))
                if name == measurement and types.get(field) == match["type"]:
                    found.add(index)
        for match in _UNPARSABLE.finditer(message):
            bad = match["line"].encode()
            found.update(i for i, line in enumerate(lines) if line == bad)
        return found

    def _quarantine(self, lines: list[bytes], reason: str) -> None:
        self.quarantined += len(lines)
        key = _reason_key(reason)
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s: quarantined %d point(s) the server refused: %s (later points "
                        "refused for the same reason are only counted)%s",
                        self.transport.description, len(lines), reason,
                        f"; see {self.quarantine_path}" if self.quarantine_path else "")
        path = self.quarantine_path
        if path is None:
            return
        try:
            size = path.stat().st_size if path.exists() else 0
            if size >= self.quarantine_max_bytes:
                return
            now = time.time()
            with path.open("a", encoding="utf-8") as out:
                for line in lines:
                    out.write(json.dumps({"at": now, "reason": reason,
                                          "line": line.decode(errors="replace")}) + "\n")
        except OSError as exc:
            log.error("cannot write the quarantine file %s: %s", path, exc)


def build_writer(
    spool: Spool,
    *,
    api: Literal["v1", "v2"],
    url: str,
    database: str = "scgw",
    org: str | None = None,
    bucket: str | None = None,
    token: str | None = None,
    username: str | None = None,
    password: str | None = None,
    consumer: str = "influxdb",
    quarantine_path: Path | str | None = None,
) -> InfluxWriter:
    """The writer the `influxdb` site keys describe (CONTRACT.md section 4)."""
    transport: Transport
    if api == "v1":
        transport = V1Transport(url, database, username=username, password=password)
    elif api == "v2":
        transport = V2Transport(url, org or "", bucket or database, token=token)
    else:
        raise ValueError(f"influxdb.api must be v1 or v2, not {api!r}")
    return InfluxWriter(spool, transport, consumer=consumer,
                        quarantine_path=quarantine_path)
