"""Spans on the OpenTelemetry API, named after the OTel messaging semantic conventions.

Spans go to the global tracer provider (a host's own, or the one
:func:`~dotmac.communications.observability.configure_telemetry` installs); with no SDK installed
they cost almost nothing. Messaging spans are named ``"{operation} {destination}"`` and carry
``messaging.system``, ``messaging.operation.name``, ``messaging.operation.type``,
``messaging.destination.name``, ``messaging.consumer.group.name``, ``messaging.message.id`` and, on
failure, ``error.type`` (the exception's message on the span is scrubbed of secrets the way log
lines are). Trace context crosses process hops (event headers, the gateway's Redis
hop) as W3C ``traceparent`` through :func:`inject_context` and :func:`extract_context`.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Literal, get_args

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from ._scrub import scrub_secrets

__all__ = [
    "TRACER_NAME",
    "MessagingOperationType",
    "current_traceparent",
    "extract_context",
    "inject_context",
    "is_active",
    "messaging_span",
    "set_tracing_enabled",
    "span",
    "use_tracer_provider",
]

TRACER_NAME = "dotmac.communications"

MessagingOperationType = Literal["create", "send", "receive", "process", "settle"]
"""``messaging.operation.type`` values of the OTel messaging conventions."""

_OPERATION_TYPES: frozenset[str] = frozenset(get_args(MessagingOperationType))

# Span kinds the messaging conventions give each operation type.
_DEFAULT_KINDS: dict[str, SpanKind] = {
    "create": SpanKind.PRODUCER,
    "send": SpanKind.PRODUCER,
    "receive": SpanKind.CLIENT,
    "process": SpanKind.CONSUMER,
    "settle": SpanKind.CLIENT,
}

_enabled = True
_provider: TracerProvider | None = None
_cached: tuple[TracerProvider | None, Tracer] | None = None
_traceparent = TraceContextTextMapPropagator()


def _tracer() -> Tracer:
    # Fetched on first use, never at import: the API's proxy tracer forwards to a provider the
    # host sets later, and a library-local provider (use_tracer_provider) invalidates the cache.
    global _cached  # noqa: PLW0603 -- one tracer per process, replaced when the provider changes
    cached = _cached
    if cached is None or cached[0] is not _provider:
        from dotmac.communications import __version__  # noqa: PLC0415 -- __init__ may import us first

        cached = (_provider, trace.get_tracer(TRACER_NAME, __version__, tracer_provider=_provider))
        _cached = cached
    return cached[1]


def is_active() -> bool:
    """Tell whether spans would be recorded: tracing is on and a real tracer provider is set.

    Hot paths (publishing and handling events) check this once and skip span and context work
    entirely when nothing would record it.
    """
    if not _enabled:
        return False
    provider = _provider
    if provider is None:
        # trace.get_tracer_provider() reads os.environ on every call while no provider is set
        # (~2 us); the API's own global is checked first and the public call is the fallback.
        try:
            provider = trace._TRACER_PROVIDER
        except AttributeError:  # pragma: no cover - a future API layout
            provider = trace.get_tracer_provider()
        if provider is None:
            return False
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def set_tracing_enabled(enabled: bool) -> None:
    """Switch span creation on or off (``observability.tracing_enabled``).

    When off, :func:`span` and :func:`messaging_span` yield a non-recording span and start
    nothing; context propagation still carries a host's own spans.
    """
    global _enabled  # noqa: PLW0603 -- one process-wide switch, like metrics.set_enabled
    _enabled = enabled


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Send this library's spans to ``provider`` instead of the global tracer provider.

    Used by :func:`~dotmac.communications.observability.configure_telemetry` with
    ``set_global=False`` and by tests; the OTel global provider can be set only once per process.

    Args:
        provider: The provider to use; ``None`` returns to the global one.
    """
    global _provider  # noqa: PLW0603 -- one process-wide binding, like the OTel global
    _provider = provider


@contextlib.contextmanager
def _start(
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue],
    context: Context | None,
    links: Sequence[Link] | None,
) -> Iterator[Span]:
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    with _tracer().start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except Exception as exc:
            # Marked here rather than by the SDK so that error.type is set as the conventions ask;
            # the exception propagates unchanged.
            if current.is_recording():
                _record_failure(current, exc)
            raise


def _record_failure(current: Span, exc: Exception) -> None:
    # An exception message often quotes a connection URL; the span gets the scrubbed text, as a
    # log line does. record_exception's attributes override its own message and stacktrace.
    error_type = type(exc).__qualname__
    message = scrub_secrets(str(exc))
    stacktrace = scrub_secrets("".join(traceback.format_exception(exc)))
    current.record_exception(
        exc, {"exception.message": message, "exception.stacktrace": stacktrace}
    )
    current.set_attribute("error.type", error_type)
    current.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))


@contextlib.contextmanager
def messaging_span(
    operation_name: str,
    destination: str,
    *,
    operation_type: MessagingOperationType,
    system: str,
    consumer_group: str | None = None,
    message_id: str | None = None,
    kind: SpanKind | None = None,
    context: Context | None = None,
    links: Sequence[Link] | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[Span]:
    """Run the block in a messaging span named ``"{operation_name} {destination}"``.

    An exception leaving the block is recorded on the span, which gets status ERROR and
    ``error.type`` (the exception's class name); its message and stack trace are recorded with
    URL passwords and secret ``key=value`` pairs masked. The exception propagates unchanged.

    Args:
        operation_name: ``messaging.operation.name``, for example ``"publish"`` or ``"process"``.
        destination: ``messaging.destination.name`` (stream, channel or topic).
        operation_type: ``messaging.operation.type``: create, send, receive, process or settle.
        system: ``messaging.system``, for example ``"redis"`` or ``"memory"``.
        consumer_group: ``messaging.consumer.group.name``, when consuming in a group.
        message_id: ``messaging.message.id``.
        kind: Span kind; by default PRODUCER for create/send, CONSUMER for process and CLIENT
            for receive/settle, as the conventions say.
        context: Parent context, for example from :func:`extract_context` on a consumed
            message; ``None`` uses the current context.
        links: Links to other spans (a batch's producers).
        attributes: Further span attributes.

    Yields:
        The span (non-recording when tracing is off).

    Raises:
        ValueError: ``operation_type`` is not one of the five convention values.
    """
    if operation_type not in _OPERATION_TYPES:
        raise ValueError(
            f"operation_type must be one of {sorted(_OPERATION_TYPES)}, got {operation_type!r}"
        )
    attrs: dict[str, AttributeValue] = {
        "messaging.system": system,
        "messaging.operation.name": operation_name,
        "messaging.operation.type": operation_type,
        "messaging.destination.name": destination,
    }
    if consumer_group is not None:
        attrs["messaging.consumer.group.name"] = consumer_group
    if message_id is not None:
        attrs["messaging.message.id"] = message_id
    if attributes:
        attrs.update(attributes)
    name = f"{operation_name} {destination}" if destination else operation_name
    with _start(
        name,
        kind=kind if kind is not None else _DEFAULT_KINDS[operation_type],
        attributes=attrs,
        context=context,
        links=links,
    ) as current:
        yield current


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, AttributeValue] | None = None,
    /,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    context: Context | None = None,
    links: Sequence[Link] | None = None,
    **more_attributes: AttributeValue,
) -> Iterator[Span]:
    """Run the block in a span called ``name`` (notification send, WebSocket deliver).

    Failures are recorded as in :func:`messaging_span`.

    Args:
        name: Span name, low-cardinality (``"notification.send"``).
        attributes: Span attributes whose keys are not identifiers (``{"dotmac.channel": ...}``).
        kind: Span kind (INTERNAL by default).
        context: Parent context; ``None`` uses the current context.
        links: Links to other spans.
        **more_attributes: Further attributes given as keywords.

    Yields:
        The span (non-recording when tracing is off).
    """
    attrs: dict[str, AttributeValue] = dict(attributes or {})
    attrs.update(more_attributes)
    with _start(name, kind=kind, attributes=attrs, context=context, links=links) as current:
        yield current


def inject_context(
    carrier: MutableMapping[str, str], context: Context | None = None
) -> MutableMapping[str, str]:
    """Write the current (or given) trace context into ``carrier`` as W3C headers.

    Uses the global propagator: W3C ``traceparent``/``tracestate`` and ``baggage`` unless the host
    chose others through ``OTEL_PROPAGATORS``.

    Args:
        carrier: Headers of an outgoing event or message; updated in place.
        context: Context to inject; ``None`` uses the current one.

    Returns:
        ``carrier``, for chaining.
    """
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> Context:
    """Read the trace context that :func:`inject_context` wrote into ``carrier``.

    Args:
        carrier: Headers of an incoming event or message.

    Returns:
        A context to pass as ``context=`` to :func:`messaging_span` so the consumer's span
        continues the producer's trace; an empty context when the headers carry none.
    """
    return propagate.extract(carrier)


def current_traceparent() -> str | None:
    """Return the W3C ``traceparent`` of the current span, or ``None`` outside a valid span."""
    carrier: dict[str, str] = {}
    _traceparent.inject(carrier)
    return carrier.get("traceparent")
