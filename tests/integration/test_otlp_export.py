"""configure_telemetry exports metrics and spans over OTLP/HTTP to a real receiver.

In-process tests keep the providers library-local (``set_global=False``); the tests of the global
providers run in a fresh interpreter, since OpenTelemetry sets them only once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from _support.otlp_receiver import OtlpReceiver
from dotmac.communications import __version__
from dotmac.communications.config import ObservabilitySettings
from dotmac.communications.observability import (
    configure_telemetry,
    messaging_span,
    metrics,
    set_tracing_enabled,
)
from dotmac.communications.observability import tracing as tracing_module

_OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@dataclass
class Settings:
    service_name: str = "comms-test"
    otlp_endpoint: str | None = None
    metrics_enabled: bool = True
    tracing_enabled: bool = True
    export_interval_seconds: float = 60.0


@pytest.fixture(autouse=True)
def _restore_switches() -> Iterator[None]:
    # The OTEL_* variables are already scrubbed by the autouse fixture in conftest.py.
    yield
    metrics.set_enabled(True)
    set_tracing_enabled(True)
    metrics.use_meter_provider(None)
    tracing_module.use_tracer_provider(None)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def _publish_one(counter_name: str) -> None:
    metrics.counter(counter_name).add(1, {"messaging.destination.name": "orders"})
    with messaging_span(
        "publish", "orders", operation_type="send", system="redis", message_id="m1"
    ):
        pass


def test_configured_endpoint_exports_metrics_and_spans(receiver: OtlpReceiver) -> None:
    """With otlp_endpoint set, a counter and a messaging span reach the collector over OTLP/HTTP."""
    with configure_telemetry(
        Settings(otlp_endpoint=receiver.endpoint + "/"), set_global=False
    ) as telemetry:
        assert telemetry.metrics_endpoint == f"{receiver.endpoint}/v1/metrics"
        assert telemetry.traces_endpoint == f"{receiver.endpoint}/v1/traces"
        _publish_one("test.otlp.inprocess")
        assert telemetry.force_flush()
    received = receiver.wait_for_span("publish orders")
    assert received.kind == SpanKind.PRODUCER.value + 1  # protobuf enum is offset by one
    assert received.attributes == {
        "messaging.system": "redis",
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
        "messaging.destination.name": "orders",
        "messaging.message.id": "m1",
    }
    assert received.resource["service.name"] == "comms-test"
    assert received.resource["service.version"] == __version__
    metric = receiver.wait_for_metric("test.otlp.inprocess")
    assert metric.resource["service.name"] == "comms-test"
    assert set(receiver.paths) == {"/v1/metrics", "/v1/traces"}


def test_shutdown_unbinds_local_providers(receiver: OtlpReceiver) -> None:
    """After shutdown the library's spans no longer go to the local provider."""
    telemetry = configure_telemetry(Settings(otlp_endpoint=receiver.endpoint), set_global=False)
    telemetry.shutdown()
    telemetry.shutdown()  # idempotent
    with messaging_span("late", "orders", operation_type="send", system="redis") as current:
        assert not current.is_recording()


def test_extra_readers_and_processors_without_endpoint() -> None:
    """Readers and processors passed in are attached even when nothing is exported over OTLP."""
    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    with configure_telemetry(
        Settings(),
        metric_readers=[reader],
        span_processors=[SimpleSpanProcessor(exporter)],
        set_global=False,
    ) as telemetry:
        assert telemetry.metrics_endpoint is None
        assert telemetry.traces_endpoint is None
        _publish_one("test.otlp.readers")
        assert [s.name for s in exporter.get_finished_spans()] == ["publish orders"]
        data = reader.get_metrics_data()
        assert data is not None
        names = [
            m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        ]
        assert "test.otlp.readers" in names


def test_no_endpoint_and_nothing_attached_installs_nothing() -> None:
    """Without an endpoint or readers no provider is created and nothing is exported."""
    telemetry = configure_telemetry(Settings(), set_global=False)
    assert telemetry.meter_provider is None
    assert telemetry.tracer_provider is None
    assert telemetry.metrics_endpoint is None
    assert telemetry.traces_endpoint is None


def test_disabled_signals_switch_recording_off(receiver: OtlpReceiver) -> None:
    """metrics_enabled/tracing_enabled false create no provider and stop recording."""
    settings = Settings(
        otlp_endpoint=receiver.endpoint, metrics_enabled=False, tracing_enabled=False
    )
    with configure_telemetry(settings, set_global=False) as telemetry:
        assert telemetry.meter_provider is None
        assert telemetry.tracer_provider is None
        metrics.counter("test.otlp.disabled").add(1)
        assert metrics.value("test.otlp.disabled") == 0


def test_endpoint_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_* variables pick the endpoints: per-signal ones as is, the base one plus /v1/<signal>."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://tempo:4318/custom/traces")
    with configure_telemetry(Settings(), set_global=False) as telemetry:
        assert telemetry.metrics_endpoint == "http://collector:4318/v1/metrics"
        assert telemetry.traces_endpoint == "http://tempo:4318/custom/traces"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    with configure_telemetry(Settings(), set_global=False) as telemetry:
        assert telemetry.traces_endpoint is None
        assert telemetry.tracer_provider is None
        assert telemetry.metrics_endpoint == "http://collector:4318/v1/metrics"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with configure_telemetry(Settings(), set_global=False) as telemetry:
        assert telemetry.meter_provider is None
        assert telemetry.metrics_endpoint is None


def test_configured_endpoint_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """observability.otlp_endpoint wins over OTEL_EXPORTER_OTLP_ENDPOINT."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")
    settings = ObservabilitySettings(otlp_endpoint="http://configured:4318")
    with configure_telemetry(settings, set_global=False) as telemetry:
        assert telemetry.traces_endpoint == "http://configured:4318/v1/traces"


def test_export_interval_must_be_positive() -> None:
    """A zero export interval is refused."""
    with pytest.raises(ValueError, match="export_interval_seconds must be > 0"):
        configure_telemetry(Settings(export_interval_seconds=0), set_global=False)


_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    from opentelemetry import trace
    from dotmac.communications.observability import configure_telemetry, messaging_span, metrics

    class Settings:
        service_name = "comms-subprocess"
        otlp_endpoint = None
        metrics_enabled = True
        tracing_enabled = True

    if sys.argv[1] == "host-first":
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    telemetry = configure_telemetry(Settings())
    metrics.counter("test.otlp.subprocess").add(1)
    with messaging_span("publish", "orders", operation_type="send", system="redis") as span:
        recording = span.is_recording()
    flushed = telemetry.force_flush()
    telemetry.shutdown()
    print(json.dumps({
        "metrics_endpoint": telemetry.metrics_endpoint,
        "traces_endpoint": telemetry.traces_endpoint,
        "tracer_provider": telemetry.tracer_provider is not None,
        "global_tracer_provider": type(trace.get_tracer_provider()).__name__,
        "recording": recording,
        "flushed": flushed,
    }))
    """
)


def _run(mode: str, **env: str) -> tuple[dict[str, object], str]:
    clean = {k: v for k, v in os.environ.items() if k not in _OTEL_VARS}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_environment_variable_alone_switches_export_on(receiver: OtlpReceiver) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone installs global providers that export over OTLP."""
    result, _ = _run("fresh", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    assert result["traces_endpoint"] == f"{receiver.endpoint}/v1/traces"
    assert result["global_tracer_provider"] == "TracerProvider"
    assert result["flushed"] is True
    span = receiver.wait_for_span("publish orders")
    assert span.attributes["messaging.operation.type"] == "send"
    assert span.resource["service.name"] == "comms-subprocess"
    receiver.wait_for_metric("test.otlp.subprocess")


def test_without_endpoint_nothing_is_installed_or_exported(receiver: OtlpReceiver) -> None:
    """With no endpoint the global providers stay the API's no-op proxies; nothing is sent."""
    result, _ = _run("fresh")
    assert result == {
        "metrics_endpoint": None,
        "traces_endpoint": None,
        "tracer_provider": False,
        "global_tracer_provider": "ProxyTracerProvider",
        "recording": False,
        "flushed": True,
    }
    assert receiver.paths == []


def test_host_provider_is_kept(receiver: OtlpReceiver) -> None:
    """A tracer provider the host installed first is kept: spans go there, a warning is logged."""
    result, stderr = _run("host-first", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    assert result["tracer_provider"] is False
    assert result["traces_endpoint"] is None
    assert result["recording"] is True  # recorded by the host's provider
    assert result["metrics_endpoint"] == f"{receiver.endpoint}/v1/metrics"
    assert "global OpenTelemetry provider already set" in stderr
    assert "provider_kind='tracer'" in stderr
    receiver.wait_for_metric("test.otlp.subprocess")
    assert receiver.spans == []
