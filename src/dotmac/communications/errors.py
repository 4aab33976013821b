"""The one exception tree of dotmac-communications.

Every error the library raises derives from :class:`CommunicationsError`. Vendor exceptions (redis,
aiosmtplib, httpx, websockets) are translated at the boundary into the most specific type below and
chained with ``raise ... from exc``, so callers never have to catch a vendor type::

    CommunicationsError
    ├── ConfigurationError              (also ValueError)   bad or missing configuration
    ├── BackendError                                        a backing service misbehaved
    │   └── BackendUnavailableError     transient           cannot reach Redis / a server
    ├── OperationTimeoutError           transient           (also TimeoutError) a deadline passed
    ├── CircuitOpenError                transient           a circuit breaker refused the call
    ├── RateLimitedError                transient           a rate limit refused the call
    ├── NotificationError                                   notifications sub-root
    │   ├── DeliveryError               transient           a send failed and may succeed later
    │   ├── PermanentDeliveryError                          a send failed and never will succeed
    │   │   ├── InvalidRecipientError   (also ValueError)   bad address / number / header value
    │   │   ├── RecipientUnregisteredError                  provider says the recipient is gone
    │   │   └── RecipientOfflineError                       in-app user has no live connection
    │   └── TemplateError                                   a template failed to render
    ├── EventError                                          events sub-root
    │   ├── InvalidTopicError           (also ValueError)   bad topic name at publish
    │   ├── InvalidPatternError         (also ValueError)   bad subscription pattern
    │   ├── EventSerializationError     (also ValueError)   data is not JSON-serialisable
    │   ├── EventTooLargeError          (also ValueError)   serialised event over the limit
    │   ├── EventDecodeError                                a stream entry is not a valid event
    │   ├── UnknownBackendError         (also ConfigurationError) events.backend unusable
    │   └── PublishTimeoutError         transient           a full backend stayed full
    └── WebSocketError                                      gateway sub-root
        ├── AuthenticationError                             handshake refused (HTTP 401/403)
        │   └── MissingCredentialsError                     no token or session presented
        ├── ProtocolError                                   the protocol layer was misused (a bug)
        ├── InvalidChannelError         (also ValueError)   bad channel name at publish
        └── MessageSerializationError   (also ValueError)   data is not JSON-serialisable

**Transient vs permanent.** Each error carries ``transient``: ``True`` when the same call may
succeed if tried again later (network blips, timeouts, 5xx, rate limits), ``False`` when it never
will (bad input, 4xx, a rejected recipient). :class:`~dotmac.communications.resilience.RetryPolicy`
retries only transient errors by default; :func:`is_transient` classifies any exception,
including built-in ``ConnectionError``/``TimeoutError`` raised by code outside the library.

An error may also carry ``retry_after`` (seconds): a server's ``Retry-After``, the time until a rate
limit has a token again, or until an open circuit lets a trial call through. Retry policies wait at
least that long before the next attempt.
"""

from __future__ import annotations

import asyncio

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BackendUnavailableError",
    "CircuitOpenError",
    "CommunicationsError",
    "ConfigurationError",
    "DeliveryError",
    "EventDecodeError",
    "EventError",
    "EventSerializationError",
    "EventTooLargeError",
    "InvalidChannelError",
    "InvalidPatternError",
    "InvalidRecipientError",
    "InvalidTopicError",
    "MessageSerializationError",
    "MissingCredentialsError",
    "NotificationError",
    "OperationTimeoutError",
    "PermanentDeliveryError",
    "ProtocolError",
    "PublishTimeoutError",
    "RateLimitedError",
    "RecipientOfflineError",
    "RecipientUnregisteredError",
    "TemplateError",
    "UnknownBackendError",
    "WebSocketError",
    "is_transient",
]


class CommunicationsError(Exception):
    """Root of every error raised by dotmac-communications.

    Args:
        message: What went wrong, naming the bad value or the failing component.
        transient: Override the class default: may the same call succeed later?
        retry_after: Seconds to wait before trying again, when the cause says so.
    """

    transient: bool = False
    retry_after: float | None = None

    def __init__(
        self,
        message: str = "",
        *,
        transient: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient
        if retry_after is not None:
            if retry_after < 0:
                raise ValueError(f"retry_after must be >= 0, got {retry_after!r}")
            self.retry_after = retry_after


class ConfigurationError(CommunicationsError, ValueError):
    """The configuration is invalid or incomplete; the message lists every bad field."""


class BackendError(CommunicationsError):
    """A backing service (Redis, a provider) answered with an error."""


class BackendUnavailableError(BackendError):
    """A backing service could not be reached; retrying later may succeed."""

    transient = True


class OperationTimeoutError(CommunicationsError, TimeoutError):
    """An I/O operation did not finish before its deadline."""

    transient = True


class CircuitOpenError(CommunicationsError):
    """A circuit breaker is open (or its half-open trial slots are taken) and refused the call.

    ``retry_after`` is the time until the breaker lets a trial call through.
    """

    transient = True

    def __init__(self, name: str, *, retry_after: float | None = None) -> None:
        self.breaker_name = name
        super().__init__(f"circuit breaker {name!r} is open", retry_after=retry_after)


class RateLimitedError(CommunicationsError):
    """A rate limit refused the call; ``retry_after`` says when a token will be available."""

    transient = True


class NotificationError(CommunicationsError):
    """Root of notification errors."""


class DeliveryError(NotificationError):
    """Sending a notification failed in a way that may succeed on a later attempt."""

    transient = True


class PermanentDeliveryError(NotificationError):
    """Sending a notification failed and retrying will not help (bad recipient, 4xx, refused)."""


class InvalidRecipientError(PermanentDeliveryError, ValueError):
    """A recipient or header value is malformed; refused before any connection is made."""


class RecipientUnregisteredError(PermanentDeliveryError):
    """The provider says the recipient no longer exists (push token unregistered: 404/410).

    The service marks the recipient ``suppressed`` and skips it from then on.
    """


class RecipientOfflineError(PermanentDeliveryError):
    """An in-app (WebSocket) recipient has no live connection; the fallback channel is used."""


class TemplateError(NotificationError):
    """A template is missing, invalid, or referenced an undefined variable."""


class EventError(CommunicationsError):
    """Root of event-bus errors."""


class InvalidTopicError(EventError, ValueError):
    """A topic name is empty, too long, or has characters outside ``[A-Za-z0-9_-]`` segments."""


class InvalidPatternError(EventError, ValueError):
    """A subscription pattern is malformed (``#`` not last, a wildcard inside a segment...)."""


class EventSerializationError(EventError, ValueError):
    """Event data (or headers) cannot be serialised to JSON."""


class EventTooLargeError(EventError, ValueError):
    """A serialised event exceeds the configured ``max_event_bytes``."""


class EventDecodeError(EventError):
    """An entry found in a stream is not a valid event (written by something else, or corrupt)."""


class UnknownBackendError(EventError, ConfigurationError):
    """``events.backend`` names no backend, or one whose settings are missing."""


class PublishTimeoutError(EventError):
    """The backend stayed full (backpressure) past the publish timeout."""

    transient = True


class WebSocketError(CommunicationsError):
    """Root of WebSocket gateway errors."""


class AuthenticationError(WebSocketError):
    """A WebSocket handshake was refused before the upgrade.

    ``status`` is the HTTP status the gateway answers with: 401 for a missing, expired or invalid
    credential, 403 for a refused ``Origin``. The message is for logs; it never contains the token.

    Args:
        message: Why the handshake was refused.
        status: HTTP status for the refusal, 400 to 499.
    """

    def __init__(self, message: str = "", *, status: int = 401) -> None:
        if not 400 <= status <= 499:
            raise ValueError(f"status must be an HTTP 4xx code, got {status!r}")
        super().__init__(message)
        self.status = status


class MissingCredentialsError(AuthenticationError):
    """The handshake carried no credential at all (no token, no session cookie).

    A chain of authenticators tries the next one only on this error; a credential that is
    present but invalid stops the chain.
    """


class ProtocolError(WebSocketError):
    """The sans-I/O protocol layer was misused: a bug in the caller, never a client's doing.

    Examples: confirming a subscribe that was never requested, a non-finite clock reading, or
    an identity whose ids cannot name a channel. Bad client frames never raise; they are
    answered with error frames.
    """


class InvalidChannelError(WebSocketError, ValueError):
    """A channel name is malformed.

    Empty, longer than 200 characters, or with whitespace, an unprintable character or an empty
    ``:``-separated segment.
    """


class MessageSerializationError(WebSocketError, ValueError):
    """Data to send to WebSocket clients cannot be serialised to JSON."""


def is_transient(exc: BaseException) -> bool:
    """Tell whether retrying the call that raised ``exc`` may succeed.

    Args:
        exc: Any exception.

    Returns:
        ``exc.transient`` for library errors; ``True`` for built-in ``ConnectionError`` and
        ``TimeoutError`` (including ``asyncio.TimeoutError``); ``False`` for everything else,
        and always ``False`` for ``asyncio.CancelledError``.
    """
    if isinstance(exc, asyncio.CancelledError):
        return False
    if isinstance(exc, CommunicationsError):
        return exc.transient
    return isinstance(exc, ConnectionError | TimeoutError)
