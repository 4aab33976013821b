"""Wire the library's metrics and spans to the OpenTelemetry SDK and, when asked, to OTLP/HTTP.

Nothing here runs at import. :func:`configure_telemetry` is called once at start-up (by the host or
the ``Communications`` facade). OTLP export switches on when an endpoint is configured
(``observability.otlp_endpoint``) or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
per-signal ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``) is set.

**Global providers.** OpenTelemetry lets a process set its global meter and tracer providers only
once. With ``set_global=True`` (the default) a provider is installed globally only when none is set
yet; when the host (or ``opentelemetry-instrument``) already installed one, the host owns
telemetry: nothing is attached for that signal, a warning is logged, and the library's metrics and
spans flow into the host's provider through the API. With ``set_global=False`` the providers stay
local: only this library's instruments and spans use them (handy for tests and for hosts that want
the library's telemetry kept apart), and :meth:`Telemetry.shutdown` unbinds them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, Self

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics._internal import _ProxyMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from dotmac.communications.observability import metrics, tracing
from dotmac.communications.observability.logging import get_logger

__all__ = ["Telemetry", "TelemetrySettings", "configure_telemetry"]

_log = get_logger(__name__)

DEFAULT_EXPORT_INTERVAL = 10.0
"""Seconds between metric exports when the settings do not say."""


class TelemetrySettings(Protocol):
    """What :func:`configure_telemetry` reads; ``CommunicationsConfig.observability`` fits.

    An optional ``export_interval_seconds: float`` (default 10) sets the metric export period.
    """

    @property
    def service_name(self) -> str:
        """``service.name`` of the resource."""
        ...

    @property
    def otlp_endpoint(self) -> str | None:
        """OTLP/HTTP base URL (``http://collector:4318``); ``/v1/traces`` etc. are appended."""
        ...

    @property
    def metrics_enabled(self) -> bool:
        """Record metrics at all."""
        ...

    @property
    def tracing_enabled(self) -> bool:
        """Create spans at all."""
        ...


@dataclass(eq=False)
class Telemetry:
    """Handle on the providers :func:`configure_telemetry` installed; shut it down at exit.

    Attributes:
        meter_provider: The SDK meter provider installed, or ``None`` (metrics off, nothing to
            export, or the host's global provider kept).
        tracer_provider: The SDK tracer provider installed, or ``None`` (likewise).
        metrics_endpoint: Full OTLP URL metrics are exported to, or ``None``.
        traces_endpoint: Full OTLP URL spans are exported to, or ``None``.
        scope: ``"global"`` when the providers were installed as the OTel globals, ``"local"``
            when only this library uses them.
    """

    meter_provider: MeterProvider | None
    tracer_provider: TracerProvider | None
    metrics_endpoint: str | None
    traces_endpoint: str | None
    scope: Literal["global", "local"]
    _closed: bool = False

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        """Export everything recorded so far.

        Returns:
            ``True`` when every provider flushed within the timeout.
        """
        ok = True
        if self.tracer_provider is not None:
            ok = self.tracer_provider.force_flush(timeout_millis) and ok
        if self.meter_provider is not None:
            ok = self.meter_provider.force_flush(timeout_millis) and ok
        return ok

    def shutdown(self) -> None:
        """Flush and stop the providers (idempotent); local providers are unbound."""
        if self._closed:
            return
        self._closed = True
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
            if self.scope == "local" and tracing._provider is self.tracer_provider:
                tracing.use_tracer_provider(None)
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
            if self.scope == "local" and metrics._meter_provider is self.meter_provider:
                metrics.use_meter_provider(None)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def configure_telemetry(
    config: TelemetrySettings,
    *,
    metric_readers: Iterable[MetricReader] = (),
    span_processors: Iterable[SpanProcessor] = (),
    set_global: bool = True,
) -> Telemetry:
    """Install SDK meter and tracer providers, exporting over OTLP/HTTP when configured.

    Sets :func:`metrics.set_enabled` and :func:`tracing.set_tracing_enabled` from ``config``. The
    resource carries ``service.name`` and ``service.version`` (this package's version). A
    provider is only created for a signal that is enabled and has somewhere to go (an OTLP
    endpoint or a reader/processor given here); ``OTEL_SDK_DISABLED=true`` creates none and
    ``OTEL_{TRACES,METRICS}_EXPORTER=none`` turns OTLP off for that signal.

    Args:
        config: The observability settings (see :class:`TelemetrySettings`).
        metric_readers: Extra metric readers (a Prometheus reader, an in-memory reader in tests).
        span_processors: Extra span processors.
        set_global: Install as the OTel global providers (if none is set yet) rather than for
            this library only; see the module docstring.

    Returns:
        A :class:`Telemetry` handle; call :meth:`Telemetry.shutdown` (or use ``with``) at exit.

    Raises:
        ValueError: ``export_interval_seconds`` is not positive.
    """
    interval = float(getattr(config, "export_interval_seconds", DEFAULT_EXPORT_INTERVAL))
    if not interval > 0:
        raise ValueError(f"export_interval_seconds must be > 0, got {interval}")
    metrics.set_enabled(config.metrics_enabled)
    tracing.set_tracing_enabled(config.tracing_enabled)
    readers = list(metric_readers)
    processors = list(span_processors)
    sdk_on = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
    base = str(config.otlp_endpoint) if config.otlp_endpoint else None
    metrics_endpoint = _signal_endpoint(base, "metrics") if config.metrics_enabled else None
    traces_endpoint = _signal_endpoint(base, "traces") if config.tracing_enabled else None

    from dotmac.communications import __version__  # noqa: PLC0415 -- __init__ may import us first

    resource = Resource.create({SERVICE_NAME: config.service_name, SERVICE_VERSION: __version__})
    scope: Literal["global", "local"] = "global" if set_global else "local"

    meter_provider: MeterProvider | None = None
    wants_metrics = sdk_on and config.metrics_enabled and (metrics_endpoint or readers)
    if wants_metrics and _slot_free("meter", set_global):
        if metrics_endpoint:
            exporter = OTLPMetricExporter(endpoint=metrics_endpoint)
            readers.append(
                PeriodicExportingMetricReader(exporter, export_interval_millis=interval * 1000)
            )
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        if set_global:
            otel_metrics.set_meter_provider(meter_provider)
        else:
            metrics.use_meter_provider(meter_provider)
    else:
        metrics_endpoint = None

    tracer_provider: TracerProvider | None = None
    wants_traces = sdk_on and config.tracing_enabled and (traces_endpoint or processors)
    if wants_traces and _slot_free("tracer", set_global):
        tracer_provider = TracerProvider(resource=resource)
        for processor in processors:
            tracer_provider.add_span_processor(processor)
        if traces_endpoint:
            tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_endpoint))
            )
        if set_global:
            trace.set_tracer_provider(tracer_provider)
        else:
            tracing.use_tracer_provider(tracer_provider)
    else:
        traces_endpoint = None

    return Telemetry(meter_provider, tracer_provider, metrics_endpoint, traces_endpoint, scope)


def _signal_endpoint(base: str | None, signal: Literal["metrics", "traces"]) -> str | None:
    # Precedence as in the OTel exporter spec: our setting (a base URL), then the per-signal
    # variable (used as is), then the generic base variable (signal path appended).
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower() == "none":
        return None
    if base:
        return f"{base.rstrip('/')}/v1/{signal}"
    specific = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if specific:
        return specific
    generic = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if generic:
        return f"{generic.rstrip('/')}/v1/{signal}"
    return None


def _slot_free(kind: Literal["meter", "tracer"], set_global: bool) -> bool:
    if not set_global:
        return True
    current: object
    if kind == "meter":
        # The API exposes no public "is a provider set?"; the proxy is what it returns until then.
        current = otel_metrics.get_meter_provider()
        free = isinstance(current, _ProxyMeterProvider)
    else:
        current = trace.get_tracer_provider()
        free = isinstance(current, trace.ProxyTracerProvider)
    if not free:
        _log.warning(
            "global OpenTelemetry provider already set; keeping it and attaching no exporter",
            provider_kind=kind,
            provider=type(current).__qualname__,
        )
    return free
