"""Prometheus metrics for `/metrics`, on top of `prometheus_client`.

Every `Registry` owns a private `prometheus_client.CollectorRegistry`; nothing is ever put
in the process-wide default registry, so tests and several gateways in one process do not
collide.

- `counter(name, help)` declares a counter and `inc(name, amount, **labels)` increments it.
  The label names are learnt at the first `inc` (or given up front with `labels=`); a later
  `inc` with other label names raises `ValueError`.
- `counter_func(name, help, read)` exposes a monotonic value kept elsewhere (TYPE counter);
  `gauge(name, help, read)` exposes a value that can go down (TYPE gauge). Both read their
  callback at every scrape, outside any lock of this module; declaring the name again
  replaces the callback. A callback that raises is left out of that scrape and logged.
- `histogram(name, help, buckets)` and `observe(name, seconds, **labels)` record latencies;
  the default `LATENCY_BUCKETS` span 50 µs .. 5 s.
- `render()` is the text exposition, to be served with `CONTENT_TYPE`.

Counter names must end in `_total`, and that is exactly the name exposed. The `_created`
series prometheus_client adds to counters and histograms are not exposed: they would double
the series count for a timestamp nobody here reads.

Label values must come from bounded sets (device kinds, results, reasons, channels, error
classes), never from card numbers, credential ids, request ids or device-supplied strings:
every distinct label value is a new time series kept for the life of the process.

All methods are thread-safe: `inc` and `observe` are called from the event loop and from
worker threads (the canteen ledger).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

CONTENT_TYPE: str = CONTENT_TYPE_LATEST
"""The `Content-Type` of `Registry.render()` output."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
"""Upper bounds in seconds, 50 µs .. 5 s (prometheus_client adds +Inf)."""

_M = TypeVar("_M", Counter, Histogram)
_Kind = Literal["counter", "histogram", "counter_func", "gauge"]


@dataclass
class _Declared(Generic[_M]):
    """A counter or histogram whose prometheus metric is made at its first use."""

    help_text: str
    make: Callable[[tuple[str, ...]], _M]
    labelnames: tuple[str, ...] | None = None
    metric: _M | None = None


@dataclass(frozen=True)
class _Callback:
    kind: Literal["counter_func", "gauge"]
    help_text: str
    read: Callable[[], Any]  # a float, or {label values: float} when `labelnames` is set
    labelnames: tuple[str, ...] = ()


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registry = CollectorRegistry(auto_describe=False)
        self._kinds: dict[str, _Kind] = {}
        self._counters: dict[str, _Declared[Counter]] = {}
        self._histograms: dict[str, _Declared[Histogram]] = {}
        self._callbacks: dict[str, _Callback] = {}
        self._failing: set[str] = set()
        self._registry.register(_Pending(self))

    @property
    def collector_registry(self) -> CollectorRegistry:
        """The private prometheus_client registry behind this one."""
        return self._registry

    # -- declarations ---------------------------------------------------------------------

    def counter(
        self, name: str, help_text: str, labels: Sequence[str] | None = None
    ) -> None:
        """Declare a counter; declaring it again is a no-op.

        `labels` fixes the label names now (`()` exposes an unlabelled 0 at once); by
        default they are those of the first `inc`.
        """
        _require_total(name)

        def make(labelnames: tuple[str, ...]) -> Counter:
            return Counter(name, help_text, labelnames, registry=self._registry)

        with self._lock:
            if not self._declare(name, "counter"):
                return
            declared = _Declared(help_text, make)
            if labels is not None:
                _create(declared, tuple(sorted(labels)))
            self._counters[name] = declared

    def histogram(
        self,
        name: str,
        help_text: str,
        buckets: Sequence[float] = LATENCY_BUCKETS,
        labels: Sequence[str] | None = None,
    ) -> None:
        """Declare a histogram (seconds); declaring it again is a no-op."""
        bounds = tuple(buckets)

        def make(labelnames: tuple[str, ...]) -> Histogram:
            return Histogram(
                name, help_text, labelnames, registry=self._registry, buckets=bounds
            )

        with self._lock:
            if not self._declare(name, "histogram"):
                return
            declared = _Declared(help_text, make)
            if labels is not None:
                _create(declared, tuple(sorted(labels)))
            self._histograms[name] = declared

    def counter_func(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Expose a monotonic value read through `read()` at every scrape, as a counter."""
        _require_total(name)
        self._callback(name, _Callback("counter_func", help_text, read))

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Expose a value that may go up and down, read through `read()` at every scrape."""
        self._callback(name, _Callback("gauge", help_text, read))

    def labelled_func(
        self, name: str, help_text: str, labelnames: tuple[str, ...],
        read: Callable[[], Mapping[tuple[str, ...], float]], *, counter: bool,
    ) -> None:
        """Like counter_func/gauge, for values kept elsewhere by label (a child process's
        counters by reason or by sink). The label values must come from bounded sets."""
        if counter:
            _require_total(name)
        kind: Literal["counter_func", "gauge"] = "counter_func" if counter else "gauge"
        self._callback(name, _Callback(kind, help_text, read, tuple(labelnames)))

    def _callback(self, name: str, callback: _Callback) -> None:
        with self._lock:
            self._declare(name, callback.kind)
            self._callbacks[name] = callback
            self._failing.discard(name)

    def _declare(self, name: str, kind: _Kind) -> bool:
        """Record `name` as `kind`; False if it already was. Call with the lock held."""
        known = self._kinds.get(name)
        if known is None:
            self._kinds[name] = kind
            return True
        if known != kind:
            raise ValueError(f"metric {name!r} is already declared as a {known}")
        return False

    # -- updates --------------------------------------------------------------------------

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        metric = self._metric(self._counters, "counter", name, labels, create=True)
        assert metric is not None
        (metric.labels(**labels) if labels else metric).inc(amount)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        metric = self._metric(self._histograms, "histogram", name, labels, create=True)
        assert metric is not None
        (metric.labels(**labels) if labels else metric).observe(seconds)

    def _metric(
        self,
        table: dict[str, _Declared[_M]],
        kind: _Kind,
        name: str,
        labels: dict[str, str],
        *,
        create: bool,
    ) -> _M | None:
        labelnames = tuple(sorted(labels))
        with self._lock:
            declared = table.get(name)
            if declared is None:
                known = self._kinds.get(name)
                what = f"a {known}" if known else "not declared"
                raise KeyError(f"metric {name!r} is {what}, not a {kind}")
            if declared.labelnames is None:
                return _create(declared, labelnames) if create else None
            if labelnames != declared.labelnames:
                raise ValueError(
                    f"{kind} {name!r} has labels {list(declared.labelnames)},"
                    f" not {list(labelnames)}"
                )
            return declared.metric

    # -- reading --------------------------------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """The current value of a counter series (0 if never incremented), or of a
        `counter_func`/`gauge` (without labels)."""
        with self._lock:
            callback = self._callbacks.get(name)
        if callback is not None:
            if labels:
                raise ValueError(f"{callback.kind} {name!r} has no labels")
            return float(callback.read())
        metric = self._metric(self._counters, "counter", name, labels, create=False)
        if metric is None:
            return 0.0
        for family in metric.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def render(self) -> str:
        """The Prometheus text exposition of every metric, sorted by name."""
        return generate_latest(_Exposition(self._registry)).decode("utf-8")

    def _pending_families(self) -> Iterator[Metric]:
        """Callback metrics, and declared counters and histograms not yet used."""
        with self._lock:
            callbacks = sorted(self._callbacks.items())
            unused: list[Metric] = [
                CounterMetricFamily(name, d.help_text)
                for name, d in self._counters.items() if d.metric is None
            ]
            unused += [
                HistogramMetricFamily(name, d.help_text)
                for name, d in self._histograms.items() if d.metric is None
            ]
        yield from unused
        for name, callback in callbacks:
            try:
                if callback.labelnames:
                    labelled = {tuple(k): float(v) for k, v in callback.read().items()}
                else:
                    value = float(callback.read())
            except Exception:
                with self._lock:
                    first = name not in self._failing
                    self._failing.add(name)
                log.log(logging.WARNING if first else logging.DEBUG,
                        "metric %s: reading failed, left out", name, exc_info=first)
                continue
            family: GaugeMetricFamily | CounterMetricFamily
            if callback.labelnames:
                family = (GaugeMetricFamily if callback.kind == "gauge" else CounterMetricFamily)(
                    name, callback.help_text, labels=callback.labelnames)
                for labels, number in sorted(labelled.items()):
                    family.add_metric(list(labels), number)
                yield family
            elif callback.kind == "gauge":
                yield GaugeMetricFamily(name, callback.help_text, value=value)
            else:
                yield CounterMetricFamily(name, callback.help_text, value=value)


def _create(declared: _Declared[_M], labelnames: tuple[str, ...]) -> _M:
    """Make the prometheus metric of `declared`. Call with the registry lock held."""
    metric = declared.make(labelnames)
    declared.labelnames = labelnames
    declared.metric = metric
    return metric


def _require_total(name: str) -> None:
    # prometheus_client strips a trailing `_total` and adds it back on the sample: only a
    # name that already ends in it is exposed unchanged.
    if not name.endswith("_total"):
        raise ValueError(f"counter name {name!r} must end in '_total'")


class _Pending:
    """Collector, in the private registry, of the families `Registry` builds itself.

    It never yields a family for a counter or histogram that is already made: the
    CollectorRegistry snapshots its collectors before calling any of them, so a metric
    made during a scrape is left out of that scrape rather than exposed twice.
    """

    def __init__(self, owner: Registry) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        return self._owner._pending_families()


class _Exposition:
    """Every family of `registry`, sorted by name, without the `_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        families = sorted(self._registry.collect(), key=lambda f: f.name)
        for family in families:
            if family.type in ("counter", "histogram", "summary"):
                created = family.name + "_created"
                family.samples = [s for s in family.samples if s.name != created]
            yield family
