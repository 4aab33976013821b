"""The in-process metrics snapshot, instrument kinds, the on/off switch and Prometheus text."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)

from dotmac.communications.observability import metrics


@pytest.fixture(autouse=True)
def _clean_metrics() -> Iterator[None]:
    metrics.reset()
    metrics.set_enabled(True)
    yield
    metrics.set_enabled(True)
    metrics.use_meter_provider(None)
    metrics.reset()


def test_counter_sums_per_attribute_set_and_value_matches_subsets() -> None:
    """value() adds up every attribute set that contains the attributes asked for."""
    sent = metrics.counter("test.metrics.sent")
    sent.add(1, {"channel": "email", "tenant": "a"})
    sent.add(2, {"channel": "email", "tenant": "b"})
    sent.add(5, {"channel": "sms", "tenant": "a"})
    assert metrics.value("test.metrics.sent") == 8
    assert metrics.value("test.metrics.sent", {"channel": "email"}) == 3
    assert metrics.value("test.metrics.sent", {"channel": "sms", "tenant": "a"}) == 5
    assert metrics.value("test.metrics.sent", {"channel": "push"}) == 0


def test_same_name_returns_same_instrument() -> None:
    """Asking twice for a name gives back the one instrument, so values accumulate."""
    assert metrics.counter("test.metrics.same") is metrics.counter("test.metrics.same")


def test_histogram_keeps_count_sum_min_max() -> None:
    """A histogram's snapshot holds count, sum, min and max; value() counts recordings."""
    duration = metrics.histogram("test.metrics.duration")
    for seconds in (0.5, 0.1, 0.3):
        duration.record(seconds, {"op": "send"})
    [(attrs, stats)] = metrics.snapshot()["test.metrics.duration"]
    assert attrs == {"op": "send"}
    assert isinstance(stats, metrics.HistogramStats)
    assert (stats.count, stats.min, stats.max) == (3, 0.1, 0.5)
    assert stats.sum == pytest.approx(0.9)
    assert metrics.value("test.metrics.duration") == 3


def test_up_down_counter_may_go_below_zero() -> None:
    """An up-down counter adds negative amounts."""
    open_connections = metrics.up_down_counter("test.metrics.connections")
    open_connections.add(2)
    open_connections.add(-3)
    assert metrics.value("test.metrics.connections") == -1


def test_reusing_a_name_as_another_kind_raises() -> None:
    """A name registered as a counter cannot come back as a histogram or up-down counter."""
    metrics.counter("test.metrics.kind")
    with pytest.raises(ValueError, match="already registered as a counter"):
        metrics.histogram("test.metrics.kind")
    with pytest.raises(ValueError, match="not a up_down_counter"):
        metrics.up_down_counter("test.metrics.kind")


@pytest.mark.parametrize("amount", [-1, math.nan, math.inf])
def test_counter_rejects_negative_and_non_finite_amounts(amount: float) -> None:
    """A monotonic counter refuses amounts that would make it go down or explode."""
    with pytest.raises(ValueError, match="finite and >= 0"):
        metrics.counter("test.metrics.bad_amount").add(amount)


def test_disabled_metrics_record_nothing() -> None:
    """With metrics switched off, no instrument records anything."""
    metrics.set_enabled(False)
    metrics.counter("test.metrics.off_c").add(1)
    metrics.histogram("test.metrics.off_h").record(1.0)
    metrics.up_down_counter("test.metrics.off_u").add(1)
    assert metrics.snapshot() == {}
    metrics.set_enabled(True)
    metrics.counter("test.metrics.off_c").add(1)
    assert metrics.value("test.metrics.off_c") == 1


def test_reset_forgets_values_but_keeps_instruments() -> None:
    """reset() empties the snapshot; the same instrument keeps working afterwards."""
    hits = metrics.counter("test.metrics.reset")
    hits.add(4)
    metrics.reset()
    assert metrics.value("test.metrics.reset") == 0
    assert "test.metrics.reset" not in metrics.snapshot()
    hits.add(1)
    assert metrics.counter("test.metrics.reset") is hits
    assert metrics.value("test.metrics.reset") == 1


def test_use_meter_provider_routes_measurements_to_that_provider() -> None:
    """A library-local SDK provider receives measurements, including from earlier instruments."""
    hits = metrics.counter("test.metrics.routed")
    hits.add(1)  # bound to the global (no-op) provider so far
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.use_meter_provider(provider)
    try:
        hits.add(2, {"k": "v"})
        data = reader.get_metrics_data()
        assert data is not None
        points = [
            (m.name, point.value, dict(point.attributes or {}))
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            for point in m.data.data_points
            if isinstance(point, NumberDataPoint)
        ]
        assert points == [("test.metrics.routed", 2, {"k": "v"})]
        assert data.resource_metrics[0].scope_metrics[0].scope.name == metrics.METER_NAME
    finally:
        metrics.use_meter_provider(None)
        provider.shutdown()
    assert metrics.value("test.metrics.routed") == 3


def test_render_prometheus_follows_the_otel_name_mapping() -> None:
    """Counters end in _total, seconds histograms become _seconds summaries, labels escape."""
    metrics.counter("test.prom.sent", description="Messages sent").add(3, {"ch": 'a"b'})
    metrics.histogram("test.prom.duration", unit="s").record(0.25)
    metrics.up_down_counter("test.prom.open").add(-2, {"ok": True})
    metrics.counter("test.prom.size", unit="By").add(10)
    metrics.up_down_counter("test.prom.bytes", unit="By").add(math.inf)
    metrics.up_down_counter("test.prom.nan").add(math.nan)
    text = metrics.render_prometheus()
    assert "# HELP test_prom_sent_total Messages sent\n" in text
    assert "# TYPE test_prom_sent_total counter\n" in text
    assert 'test_prom_sent_total{ch="a\\"b"} 3.0\n' in text
    assert "# TYPE test_prom_duration_seconds summary\n" in text
    assert "test_prom_duration_seconds_count 1\n" in text
    assert "test_prom_duration_seconds_sum 0.25\n" in text
    assert 'test_prom_open{ok="true"} -2.0\n' in text
    assert "test_prom_size_bytes_total 10.0\n" in text
    assert "test_prom_bytes +Inf\n" in text
    assert "test_prom_nan NaN\n" in text
    assert text.endswith("\n")


def test_render_prometheus_is_empty_without_recordings() -> None:
    """Nothing recorded renders as an empty exposition."""
    metrics.counter("test.prom.unused")
    assert metrics.render_prometheus() == ""


def _histogram_bounds(reader: InMemoryMetricReader) -> dict[str, list[float]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(point.explicit_bounds)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for point in m.data.data_points
        if isinstance(point, HistogramDataPoint)
    }


def test_seconds_histograms_use_the_semconv_buckets() -> None:
    """A histogram in seconds is exported with the OTel conventions' buckets, not the ms ones."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.use_meter_provider(provider)
    try:
        metrics.histogram("test.metrics.buckets.s", unit="s").record(0.02)
        metrics.histogram("test.metrics.buckets.ms", unit="ms").record(20)
        bounds = _histogram_bounds(reader)
    finally:
        metrics.use_meter_provider(None)
        provider.shutdown()
    assert bounds["test.metrics.buckets.s"] == [
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10
    ]  # fmt: skip
    # Other units keep the SDK's default buckets.
    assert bounds["test.metrics.buckets.ms"][:3] == [0.0, 5.0, 10.0]


def test_reusing_a_name_with_another_unit_raises() -> None:
    """A name registered in seconds cannot come back in milliseconds."""
    metrics.histogram("test.metrics.unit", unit="s")
    with pytest.raises(ValueError, match="already registered with unit 's', not 'ms'"):
        metrics.histogram("test.metrics.unit", unit="ms")
    assert metrics.histogram("test.metrics.unit", unit="s").unit == "s"


def test_render_prometheus_escapes_help_text() -> None:
    """Backslashes and line feeds in a description are escaped in the HELP line."""
    metrics.counter("test.prom.help", description="line one\nC:\\path").add(1)
    text = metrics.render_prometheus()
    assert "# HELP test_prom_help_total line one\\nC:\\\\path\n" in text


_GLOBAL_LATE = """
import json
from opentelemetry import metrics as otel_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from dotmac.communications.observability import metrics

hist = metrics.histogram("test.late.duration", unit="s").bind({"k": "v"})
count = metrics.counter("test.late.count").bind({"k": "v"})
hist.record(1.0)  # before any provider: kept in the snapshot only
count.add(1)
reader = InMemoryMetricReader()
otel_metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
hist.record(2.0)
count.add(5)
seen = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            point = m.data.data_points[0]
            seen[m.name] = getattr(point, "sum", None) if hasattr(point, "sum") else point.value
print(json.dumps({"seen": seen, "local": metrics.value("test.late.count")}))
"""


def test_bound_instruments_follow_a_global_provider_set_later() -> None:
    """Bound before the host sets its global provider, they record into it from then on."""
    done = subprocess.run(
        [sys.executable, "-c", _GLOBAL_LATE], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # The provider got only what was recorded after it was set; the snapshot got everything.
    assert result["seen"] == {"test.late.duration": 2.0, "test.late.count": 5}
    assert result["local"] == 6
