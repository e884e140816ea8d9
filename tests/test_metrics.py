"""The `/metrics` registry: names, types, labels and isolation of the exposition."""

from __future__ import annotations

import logging
import math
import threading

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.devices.router import register_metrics
from gateway.metrics import CONTENT_TYPE, LATENCY_BUCKETS, Registry


def families(registry: Registry) -> dict[str, tuple[str, list[Sample]]]:
    """Sample-name prefix -> (type, samples), keyed by the name as exposed."""
    out: dict[str, tuple[str, list[Sample]]] = {}
    for family in text_string_to_metric_families(registry.render()):
        name = family.name + "_total" if family.type == "counter" else family.name
        assert name not in out, f"{name} exposed twice"
        out[name] = (family.type, list(family.samples))
    return out


def series(registry: Registry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples named exactly `name`, by sorted label items."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for _, samples in families(registry).values()
        for s in samples
        if s.name == name
    }


def test_counters_are_typed_counter_with_their_exact_names_and_labels() -> None:
    metrics = Registry()
    register_metrics(metrics)
    metrics.inc("scgw_mqtt_messages_total", channel="access/request")
    metrics.inc("scgw_mqtt_messages_total", channel="access/request")
    metrics.inc("scgw_mqtt_messages_total", channel="ble")
    metrics.inc("scgw_access_decisions_total", kind="gate", result="granted")
    metrics.counter("scgw_things_total", "An unlabelled counter.")
    metrics.inc("scgw_things_total", 5)

    found = families(metrics)
    for name in (
        "scgw_mqtt_messages_total",
        "scgw_mqtt_errors_total",
        "scgw_access_decisions_total",
        "scgw_things_total",
        "scgw_device_events_total",
    ):
        assert found[name][0] == "counter", name
    assert series(metrics, "scgw_mqtt_messages_total") == {
        (("channel", "access/request"),): 2.0,
        (("channel", "ble"),): 1.0,
    }
    assert series(metrics, "scgw_access_decisions_total") == {
        (("kind", "gate"), ("result", "granted")): 1.0,
    }
    assert series(metrics, "scgw_things_total") == {(): 5.0}
    # Declared but never incremented: announced, with no series yet.
    assert found["scgw_mqtt_errors_total"] == ("counter", [])

    text = metrics.render()
    assert "# TYPE scgw_mqtt_messages_total counter\n" in text
    assert "_total_total" not in text
    assert "_created" not in text
    every = {s.name for _, samples in found.values() for s in samples}
    assert every == {
        "scgw_mqtt_messages_total",
        "scgw_access_decisions_total",
        "scgw_things_total",
    }


def test_value_reads_counter_series() -> None:
    metrics = Registry()
    metrics.counter("scgw_api_logins_total", "API logins, by result.")
    assert metrics.value("scgw_api_logins_total", result="ok") == 0.0
    metrics.inc("scgw_api_logins_total", result="ok")
    metrics.inc("scgw_api_logins_total", 2.5, result="ok")
    assert metrics.value("scgw_api_logins_total", result="ok") == 3.5
    assert metrics.value("scgw_api_logins_total", result="refused") == 0.0
    # Reading does not create a series.
    assert series(metrics, "scgw_api_logins_total") == {(("result", "ok"),): 3.5}


def test_counter_with_labels_declared_up_front_is_exposed_at_zero() -> None:
    metrics = Registry()
    metrics.counter("scgw_gaps_total", "Gaps.", labels=())
    assert series(metrics, "scgw_gaps_total") == {(): 0.0}
    metrics.counter("scgw_by_kind_total", "By kind.", labels=["kind"])
    with pytest.raises(ValueError, match="labels"):
        metrics.inc("scgw_by_kind_total")
    metrics.inc("scgw_by_kind_total", kind="gate")
    assert series(metrics, "scgw_by_kind_total") == {(("kind", "gate"),): 1.0}


def test_declaring_again_is_harmless() -> None:
    metrics = Registry()
    metrics.counter("scgw_api_logins_total", "API logins, by result.")
    metrics.inc("scgw_api_logins_total", result="ok")
    metrics.counter("scgw_api_logins_total", "API logins, by result.")
    metrics.histogram("scgw_latency_seconds", "Latency.")
    metrics.histogram("scgw_latency_seconds", "Latency.")
    assert metrics.value("scgw_api_logins_total", result="ok") == 1.0
    assert list(families(metrics)) == ["scgw_api_logins_total", "scgw_latency_seconds"]


def test_counter_func_is_typed_counter_and_read_at_each_scrape() -> None:
    metrics = Registry()
    counts = {"approved": 0}
    metrics.counter_func(
        "scgw_canteen_payments_approved_total", "Canteen payments answered: approved.",
        lambda: float(counts["approved"]),
    )
    assert families(metrics)["scgw_canteen_payments_approved_total"][0] == "counter"
    assert series(metrics, "scgw_canteen_payments_approved_total") == {(): 0.0}
    counts["approved"] = 7
    assert series(metrics, "scgw_canteen_payments_approved_total") == {(): 7.0}
    assert metrics.value("scgw_canteen_payments_approved_total") == 7.0
    assert "# TYPE scgw_canteen_payments_approved_total counter\n" in metrics.render()
    # A second declaration (a restarted component) replaces the callback.
    metrics.counter_func(
        "scgw_canteen_payments_approved_total", "Canteen payments answered: approved.",
        lambda: 9.0,
    )
    assert series(metrics, "scgw_canteen_payments_approved_total") == {(): 9.0}


def test_gauge_callbacks_are_typed_gauge_and_read_at_each_scrape() -> None:
    metrics = Registry()
    connected = threading.Event()
    metrics.gauge("scgw_mqtt_connected", "1 while connected to the broker.",
                  lambda: float(connected.is_set()))
    assert families(metrics)["scgw_mqtt_connected"][0] == "gauge"
    assert series(metrics, "scgw_mqtt_connected") == {(): 0.0}
    connected.set()
    assert series(metrics, "scgw_mqtt_connected") == {(): 1.0}
    assert metrics.value("scgw_mqtt_connected") == 1.0


def test_a_failing_callback_is_left_out_and_the_rest_still_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Registry()
    metrics.gauge("scgw_broken", "Broken.", lambda: 1 / 0)
    metrics.gauge("scgw_fine", "Fine.", lambda: 2.0)
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        found = families(metrics)
        families(metrics)
    assert "scgw_broken" not in found
    assert series(metrics, "scgw_fine") == {(): 2.0}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "scgw_broken" in warned[0].getMessage()


def test_histogram_buckets_count_and_sum() -> None:
    metrics = Registry()
    metrics.histogram("scgw_access_decision_seconds", "Access decision latency.")
    metrics.histogram("scgw_payment_seconds", "Payment latency.", buckets=(0.01, 0.1, 1.0))
    for seconds in (0.00004, 0.0003, 0.0003, 0.02, 7.0):
        metrics.observe("scgw_access_decision_seconds", seconds, kind="gate")
    metrics.observe("scgw_payment_seconds", 0.05)

    kind, samples = families(metrics)["scgw_access_decision_seconds"]
    assert kind == "histogram"
    buckets = {
        s.labels["le"]: s.value for s in samples
        if s.name == "scgw_access_decision_seconds_bucket"
    }
    assert all(s.labels["kind"] == "gate" for s in samples)
    assert [float(le) for le in buckets] == [*LATENCY_BUCKETS, math.inf]
    assert buckets["5e-05"] == 1.0
    assert buckets["0.00025"] == 1.0
    assert buckets["0.0005"] == 3.0
    assert buckets["0.025"] == 4.0
    assert buckets["5.0"] == 4.0
    assert buckets["+Inf"] == 5.0
    assert series(metrics, "scgw_access_decision_seconds_count") == {(("kind", "gate"),): 5.0}
    [total] = series(metrics, "scgw_access_decision_seconds_sum").values()
    assert total == pytest.approx(7.02064)

    assert series(metrics, "scgw_payment_seconds_bucket") == {
        (("le", "0.01"),): 0.0,
        (("le", "0.1"),): 1.0,
        (("le", "1.0"),): 1.0,
        (("le", "+Inf"),): 1.0,
    }
    assert series(metrics, "scgw_payment_seconds_count") == {(): 1.0}
    assert "_created" not in metrics.render()


def test_latency_buckets_span_50_microseconds_to_5_seconds() -> None:
    assert LATENCY_BUCKETS[0] == 0.00005
    assert LATENCY_BUCKETS[-1] == 5.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_unused_histogram_is_announced_without_series() -> None:
    metrics = Registry()
    metrics.histogram("scgw_payment_seconds", "Payment latency.")
    assert families(metrics)["scgw_payment_seconds"] == ("histogram", [])


def test_mismatched_labels_raise() -> None:
    metrics = Registry()
    metrics.counter("scgw_mqtt_errors_total", "Errors.")
    metrics.inc("scgw_mqtt_errors_total", channel="access/request", error="malformed")
    with pytest.raises(ValueError, match=r"scgw_mqtt_errors_total.*\['channel', 'error'\]"):
        metrics.inc("scgw_mqtt_errors_total", channel="access/request")
    with pytest.raises(ValueError, match="labels"):
        metrics.inc("scgw_mqtt_errors_total", channel="x", error="y", device="z")
    with pytest.raises(ValueError, match="labels"):
        metrics.value("scgw_mqtt_errors_total", channel="access/request")
    # Same label names in another order are the same series.
    metrics.inc("scgw_mqtt_errors_total", error="malformed", channel="access/request")
    assert metrics.value(
        "scgw_mqtt_errors_total", channel="access/request", error="malformed"
    ) == 2.0

    metrics.histogram("scgw_payment_seconds", "Payment latency.")
    metrics.observe("scgw_payment_seconds", 0.1, result="approved")
    with pytest.raises(ValueError, match="labels"):
        metrics.observe("scgw_payment_seconds", 0.1)


def test_misuse_is_refused() -> None:
    metrics = Registry()
    with pytest.raises(KeyError, match="not declared"):
        metrics.inc("scgw_nowhere_total")
    with pytest.raises(KeyError, match="not declared"):
        metrics.observe("scgw_nowhere_seconds", 1.0)
    with pytest.raises(ValueError, match="_total"):
        metrics.counter("scgw_messages", "No suffix.")
    with pytest.raises(ValueError, match="_total"):
        metrics.counter_func("scgw_payments", "No suffix.", lambda: 0.0)
    metrics.gauge("scgw_mqtt_connected", "Connected.", lambda: 1.0)
    with pytest.raises(ValueError, match="already declared as a gauge"):
        metrics.histogram("scgw_mqtt_connected", "Clash.")
    with pytest.raises(KeyError, match="gauge"):
        metrics.inc("scgw_mqtt_connected")
    metrics.counter("scgw_things_total", "Things.")
    with pytest.raises(ValueError, match="already declared as a counter"):
        metrics.counter_func("scgw_things_total", "Clash.", lambda: 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.inc("scgw_things_total", -1)


def test_two_registries_are_independent_and_the_default_one_untouched() -> None:
    one, two = Registry(), Registry()
    for metrics in (one, two):
        register_metrics(metrics)
        metrics.histogram("scgw_payment_seconds", "Payment latency.")
        metrics.gauge("scgw_mqtt_connected", "Connected.", lambda: 1.0)
    one.inc("scgw_mqtt_messages_total", channel="ble")
    two.inc("scgw_mqtt_messages_total", 3, channel="ble")
    one.observe("scgw_payment_seconds", 0.1)
    assert one.value("scgw_mqtt_messages_total", channel="ble") == 1.0
    assert two.value("scgw_mqtt_messages_total", channel="ble") == 3.0
    assert series(two, "scgw_payment_seconds_count") == {}
    # Label names are per registry too.
    two.inc("scgw_device_events_total", type="door")
    one.inc("scgw_device_events_total", type="door", kind="gate")
    assert one.collector_registry is not two.collector_registry
    default = {s.name for f in prometheus_client.REGISTRY.collect() for s in f.samples}
    assert not any(name.startswith("scgw_") for name in default)


def test_concurrent_increments_are_all_counted() -> None:
    metrics = Registry()
    metrics.counter("scgw_payments_total", "Payments.")
    metrics.histogram("scgw_payment_seconds", "Payment latency.")
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(1000):
            metrics.inc("scgw_payments_total", result="approved")
            metrics.observe("scgw_payment_seconds", 0.001, result="approved")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metrics.value("scgw_payments_total", result="approved") == 8000.0
    assert series(metrics, "scgw_payment_seconds_count") == {
        (("result", "approved"),): 8000.0
    }


def test_render_is_served_as_the_latest_text_format() -> None:
    assert CONTENT_TYPE == prometheus_client.CONTENT_TYPE_LATEST
    metrics = Registry()
    metrics.counter("scgw_b_total", "B.")
    metrics.gauge("scgw_a", "A.", lambda: 1.0)
    metrics.inc("scgw_b_total")
    text = metrics.render()
    assert text.endswith("\n")
    assert text.index("scgw_a ") < text.index("scgw_b_total ")
