"""Metrics, tracing, structured logging and health checks.

Nothing is configured on import: call :func:`configure_logging` and :func:`configure_telemetry`
at start-up. The metrics API lives in :mod:`~dotmac.communications.observability.metrics`
(``metrics.counter(...)``, ``metrics.snapshot()``).
"""

from __future__ import annotations

from . import metrics
from .health import (
    CONTENT_TYPE as HEALTH_CONTENT_TYPE,
)
from .health import (
    CheckOutcome,
    CheckResult,
    HealthRegistry,
    HealthReport,
    HealthStatus,
    redis_check,
)
from .logging import REDACTED, bind_context, configure_logging, get_logger, redact_secrets
from .metrics import PROMETHEUS_CONTENT_TYPE, render_prometheus
from .telemetry import Telemetry, TelemetrySettings, configure_telemetry
from .tracing import (
    MessagingOperationType,
    current_traceparent,
    extract_context,
    inject_context,
    messaging_span,
    set_tracing_enabled,
    span,
    use_tracer_provider,
)
from .tracing import (
    is_active as is_tracing_active,
)

__all__ = [
    "HEALTH_CONTENT_TYPE",
    "PROMETHEUS_CONTENT_TYPE",
    "REDACTED",
    "CheckOutcome",
    "CheckResult",
    "HealthRegistry",
    "HealthReport",
    "HealthStatus",
    "MessagingOperationType",
    "Telemetry",
    "TelemetrySettings",
    "bind_context",
    "configure_logging",
    "configure_telemetry",
    "current_traceparent",
    "extract_context",
    "get_logger",
    "inject_context",
    "is_tracing_active",
    "messaging_span",
    "metrics",
    "redact_secrets",
    "redis_check",
    "render_prometheus",
    "set_tracing_enabled",
    "span",
    "use_tracer_provider",
]
