"""The two ways a batch of line protocol reaches an InfluxDB-compatible server.

Both are deliberately dumb: one POST per call, no retry, no buffering, and every outcome
(including "no answer at all") returned as a `Response`. Retrying, splitting and
quarantining live in `writers.InfluxWriter`, which knows the spool has room; the clients'
own retry policies do not (influxdb-client's batching retry gives up after 180 s and then
drops the batch).

- `V1Transport`: InfluxDB 1.x `POST /write?db=&precision=ms`, gzip, optional basic auth.
- `V2Transport`: InfluxDB 2.x/3.x or any v2-write server (VictoriaMetrics) through
  influxdb-client's synchronous WriteApi, with `retries=False` so urllib3 does not retry.

Not thread-safe: each writer owns its transport.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import urllib3

from gateway.telemetry.line_protocol import PRECISION

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Response:
    """What one POST came to: an HTTP status, or None when no answer arrived."""

    status: int | None
    message: str = ""
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Transport(Protocol):
    description: str

    def post(self, body: bytes) -> Response:
        """Send newline-separated line protocol (uncompressed; the transport gzips)."""
        ...

    def close(self) -> None: ...


def error_message(body: str | bytes | None) -> str:
    """The human part of an error body: 1.x `{"error"}`, 2.x `{"message"}`, else the text."""
    if body is None:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:2000]
    if isinstance(parsed, dict):
        for key in ("error", "message"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])[:2000]
    return text.strip()[:2000]


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


class V1Transport:
    """InfluxDB 1.x `/write`: database, precision=ms, gzip (level 1: CPU is scarcer than LAN).

    Through urllib3 (influxdb-client's own HTTP library, so a dependency already): httpx
    would bring its command line's imports (rich, click, pygments) into the telemetry worker,
    ~7 MB of RSS on an edge box for a few POSTs a second."""

    def __init__(self, url: str, database: str, *, username: str | None = None,
                 password: str | None = None, timeout_s: float = 30.0,
                 create_database: bool = True) -> None:
        self.description = f"InfluxDB v1 {url.rstrip('/')} db={database}"
        self._url = url.rstrip("/")
        self._pool = urllib3.PoolManager(
            num_pools=1, maxsize=1, retries=False,
            timeout=urllib3.Timeout(connect=min(5.0, timeout_s), read=timeout_s))
        self._auth = (urllib3.make_headers(basic_auth=f"{username}:{password or ''}")
                      if username else {})
        self._database = database
        self._write_url = f"{self._url}/write?" + urlencode({"db": database,
                                                             "precision": PRECISION})
        self._create = create_database

    def post(self, body: bytes) -> Response:
        try:
            reply = self._pool.request(
                "POST", self._write_url, body=gzip.compress(body, compresslevel=1),
                headers={**self._auth, "Content-Encoding": "gzip",
                         "Content-Type": "text/plain; charset=utf-8"})
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Response(None, f"{type(exc).__name__}: {exc}")
        message = "" if 200 <= reply.status < 300 else error_message(reply.data)
        if reply.status == 404 and "database not found" in message and self._create:
            self._create = False  # once: with auth the user may not be allowed to
            self._create_database()
        return Response(reply.status, message, retry_after(reply.headers.get("Retry-After")))

    def _create_database(self) -> None:
        escaped = self._database.replace("\\", "\\\\").replace('"', '\\"')
        try:
            reply = self._pool.request(
                "POST", f"{self._url}/query", headers=self._auth, encode_multipart=False,
                fields={"q": f'CREATE DATABASE "{escaped}"'})
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("%s: could not create the database: %s", self.description, exc)
            return
        if 200 <= reply.status < 300:
            log.info("%s: created the missing database", self.description)
        else:
            log.warning("%s: could not create the database: HTTP %d %s", self.description,
                        reply.status, error_message(reply.data))

    def close(self) -> None:
        self._pool.clear()


class V2Transport:
    """`/api/v2/write` through influxdb-client's WriteApi in SYNCHRONOUS mode.

    SYNCHRONOUS means one HTTP request per `write()` and the error raised to us; the client's
    batching mode would hold points in memory and give up on them after `max_retry_time`.
    `token` may be None for servers without auth (VictoriaMetrics).
    """

    def __init__(self, url: str, org: str, bucket: str, *, token: str | None = None,
                 timeout_s: float = 30.0) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS
        from influxdb_client.domain.write_precision import WritePrecision

        self.description = f"InfluxDB v2 {url.rstrip('/')} org={org} bucket={bucket}"
        self._client: Any = InfluxDBClient(url=url, token=token or "", org=org, enable_gzip=True,
                                           timeout=int(timeout_s * 1000), retries=False)
        self._write: Any = self._client.write_api(write_options=SYNCHRONOUS)
        self._precision: Any = WritePrecision.MS
        self._org, self._bucket = org, bucket

    def post(self, body: bytes) -> Response:
        from influxdb_client.rest import ApiException

        try:
            self._write.write(bucket=self._bucket, org=self._org, record=body,
                              write_precision=self._precision)
        except ApiException as exc:
            headers: Any = exc.headers or {}
            return Response(exc.status, error_message(exc.body) or str(exc.reason or ""),
                            retry_after(headers.get("Retry-After")))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Response(None, f"{type(exc).__name__}: {exc}")
        return Response(204)

    def close(self) -> None:
        self._write.close()
        self._client.close()
