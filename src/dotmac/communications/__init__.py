"""dotmac-communications: notifications, a WebSocket gateway and an event bus for asyncio apps."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    BackendError,
    BackendUnavailableError,
    CircuitOpenError,
    CommunicationsError,
    ConfigurationError,
    DeliveryError,
    EventError,
    NotificationError,
    OperationTimeoutError,
    PermanentDeliveryError,
    RateLimitedError,
    TemplateError,
    WebSocketError,
)

try:
    __version__ = version("dotmac-communications")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "CircuitOpenError",
    "CommunicationsError",
    "ConfigurationError",
    "DeliveryError",
    "EventError",
    "NotificationError",
    "OperationTimeoutError",
    "PermanentDeliveryError",
    "RateLimitedError",
    "TemplateError",
    "WebSocketError",
    "__version__",
]
