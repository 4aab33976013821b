"""Messaging spans follow the OTel conventions and trace context survives a process hop."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dotmac.communications.observability import (
    current_traceparent,
    extract_context,
    inject_context,
    messaging_span,
    set_tracing_enabled,
    span,
    use_tracer_provider,
)
from dotmac.communications.observability.tracing import TRACER_NAME


class SendFailedError(Exception):
    pass


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_tracer_provider(provider)
    yield exporter
    use_tracer_provider(None)
    set_tracing_enabled(True)
    provider.shutdown()


def _only(exporter: InMemorySpanExporter) -> ReadableSpan:
    [finished] = exporter.get_finished_spans()
    return finished


def test_messaging_span_has_convention_name_and_attributes(exporter: InMemorySpanExporter) -> None:
    """A send span is "{operation} {destination}", PRODUCER, with the messaging attributes."""
    with messaging_span(
        "publish",
        "orders",
        operation_type="send",
        system="redis",
        message_id="m-1",
        attributes={"dotmac.tenant": "t1"},
    ):
        pass
    finished = _only(exporter)
    assert finished.name == "publish orders"
    assert finished.kind is SpanKind.PRODUCER
    assert dict(finished.attributes or {}) == {
        "messaging.system": "redis",
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
        "messaging.destination.name": "orders",
        "messaging.message.id": "m-1",
        "dotmac.tenant": "t1",
    }
    assert "messaging.operation" not in (finished.attributes or {})
    assert finished.instrumentation_scope is not None
    assert finished.instrumentation_scope.name == TRACER_NAME
    assert finished.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("operation_type", "kind"),
    [
        ("create", SpanKind.PRODUCER),
        ("receive", SpanKind.CLIENT),
        ("process", SpanKind.CONSUMER),
        ("settle", SpanKind.CLIENT),
    ],
)
def test_span_kind_follows_operation_type(
    exporter: InMemorySpanExporter, operation_type: str, kind: SpanKind
) -> None:
    """Each operation type gets the span kind the messaging conventions give it."""
    with messaging_span("op", "q", operation_type=operation_type, system="memory"):  # type: ignore[arg-type]
        pass
    assert _only(exporter).kind is kind


def test_explicit_kind_and_consumer_group(exporter: InMemorySpanExporter) -> None:
    """An explicit kind wins and the consumer group is recorded."""
    with messaging_span(
        "process",
        "orders",
        operation_type="process",
        system="redis",
        consumer_group="billing",
        kind=SpanKind.INTERNAL,
    ):
        pass
    finished = _only(exporter)
    assert finished.kind is SpanKind.INTERNAL
    assert (finished.attributes or {})["messaging.consumer.group.name"] == "billing"
    assert "messaging.message.id" not in (finished.attributes or {})


def test_failure_is_recorded_and_reraised(exporter: InMemorySpanExporter) -> None:
    """An exception marks the span ERROR with error.type and an exception event, then propagates."""
    with (
        pytest.raises(SendFailedError, match="smtp down"),
        messaging_span("publish", "orders", operation_type="send", system="memory"),
    ):
        raise SendFailedError("smtp down")
    finished = _only(exporter)
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.status.description == "SendFailedError: smtp down"
    assert (finished.attributes or {})["error.type"] == "SendFailedError"
    [event] = finished.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.message"] == "smtp down"


def test_unknown_operation_type_is_rejected(exporter: InMemorySpanExporter) -> None:
    """Only the five convention operation types are accepted."""
    with (
        pytest.raises(ValueError, match="operation_type must be one of"),
        messaging_span("publish", "orders", operation_type="publish", system="redis"),  # type: ignore[arg-type]
    ):
        pass  # pragma: no cover - never entered
    assert exporter.get_finished_spans() == ()


def test_inject_extract_round_trip_continues_the_trace(exporter: InMemorySpanExporter) -> None:
    """A consumer span from injected headers shares the trace id, with the producer as parent."""
    headers: dict[str, str] = {}
    with messaging_span("publish", "orders", operation_type="send", system="redis") as producer:
        assert inject_context(headers) is headers
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", headers["traceparent"])
    with messaging_span(
        "process",
        "orders",
        operation_type="process",
        system="redis",
        context=extract_context(headers),
    ):
        pass
    publish, process = exporter.get_finished_spans()
    assert process.context is not None
    assert publish.context is not None
    assert process.context.trace_id == publish.context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == producer.get_span_context().span_id


def test_extract_without_headers_starts_a_new_trace(exporter: InMemorySpanExporter) -> None:
    """Headers without trace context give a root span."""
    with messaging_span(
        "process", "orders", operation_type="process", system="redis", context=extract_context({})
    ):
        pass
    assert _only(exporter).parent is None


def test_current_traceparent_inside_and_outside_a_span(exporter: InMemorySpanExporter) -> None:
    """current_traceparent() is None outside a span and the span's W3C header inside one."""
    assert current_traceparent() is None
    with span("notification.send") as current:
        ctx = current.get_span_context()
        assert (
            current_traceparent()
            == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        )


def test_span_helper_takes_mapping_and_keyword_attributes(exporter: InMemorySpanExporter) -> None:
    """span() names the span and merges dotted attributes with keyword ones."""
    with span("websocket.deliver", {"dotmac.channel": "room:1"}, recipients=3):
        pass
    finished = _only(exporter)
    assert finished.name == "websocket.deliver"
    assert finished.kind is SpanKind.INTERNAL
    assert dict(finished.attributes or {}) == {"dotmac.channel": "room:1", "recipients": 3}


def test_span_helper_records_failures(exporter: InMemorySpanExporter) -> None:
    """span() marks failures like messaging_span does."""
    with pytest.raises(KeyError), span("notification.send"):
        raise KeyError("x")
    assert (_only(exporter).attributes or {})["error.type"] == "KeyError"


def test_tracing_disabled_creates_no_spans(exporter: InMemorySpanExporter) -> None:
    """With tracing off the helpers yield a non-recording span and export nothing."""
    set_tracing_enabled(False)
    with messaging_span("publish", "orders", operation_type="send", system="redis") as current:
        assert not current.is_recording()
        assert current_traceparent() is None
    with span("notification.send") as other:
        assert other is trace.INVALID_SPAN
    assert exporter.get_finished_spans() == ()


def test_spans_nest_under_the_current_span(exporter: InMemorySpanExporter) -> None:
    """A messaging span started inside another span is its child."""
    with span("notification.send") as outer, span("render"):
        pass
    inner, finished_outer = exporter.get_finished_spans()
    assert inner.parent is not None
    assert inner.parent.span_id == outer.get_span_context().span_id
    assert finished_outer.parent is None


def test_failure_message_is_scrubbed_of_secrets(exporter: InMemorySpanExporter) -> None:
    """A URL password in the exception reaches neither the span status nor its exception event."""
    with pytest.raises(ConnectionError), span("notification.send"):
        raise ConnectionError("cannot reach redis://:hunter2@cache:6379")
    finished = _only(exporter)
    assert finished.status.description == "ConnectionError: cannot reach redis://:***@cache:6379"
    [event] = finished.events
    attributes = dict(event.attributes or {})
    assert attributes["exception.message"] == "cannot reach redis://:***@cache:6379"
    assert attributes["exception.type"] == "ConnectionError"
    stacktrace = str(attributes["exception.stacktrace"])
    assert "ConnectionError: cannot reach redis://:***@cache:6379" in stacktrace
    assert "hunter2" not in repr(finished.to_json())
