"""dotmac-communications: notifications, a WebSocket gateway and an event bus for asyncio apps."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from .config import CommunicationsConfig
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
    __version__ = _version("dotmac-communications")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "CircuitOpenError",
    "CommunicationsConfig",
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
