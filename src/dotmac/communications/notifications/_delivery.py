"""One provider's guarded send: rate limit, circuit breaker and retries on transient errors."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import (
    CircuitOpenError,
    CommunicationsError,
    InvalidRecipientError,
    PermanentDeliveryError,
    RecipientOfflineError,
    RecipientUnregisteredError,
)
from dotmac.communications.observability import metrics
from dotmac.communications.resilience import (
    CircuitBreaker,
    RateLimiter,
    RetryPolicy,
)

from ._models import OutboundMessage, SendReceipt
from .channels.base import Provider

__all__ = ["AttemptFailed", "GuardedProvider", "Outcome", "is_final_for_recipient"]

log = logging.getLogger("dotmac.communications.notifications")

AttemptFailed = Callable[[OutboundMessage, str, int, BaseException], Awaitable[None]]
"""Called after each failed attempt with the message, the provider's name, the attempt's number
and its error (status history)."""

_ATTEMPT_FAILURES = "dotmac.notifications.attempt.failures"


def _as_library_error(exc: Exception, provider: str) -> CommunicationsError:
    # A provider must raise library errors; anything else is a bug in it (or in a host's
    # CallbackProvider). Caught broadly so one bad provider cannot lose the results of the
    # other recipients: logged with its traceback, then treated as a permanent failure of this
    # provider (the chain moves on, nothing is retried).
    if isinstance(exc, CommunicationsError):
        return exc
    log.error("notifications: provider %s raised %r", provider, exc, exc_info=exc)
    error = PermanentDeliveryError(f"provider {provider} failed unexpectedly: {exc!r}")
    error.__cause__ = exc
    return error


_FINAL_FOR_RECIPIENT = (InvalidRecipientError, RecipientUnregisteredError, RecipientOfflineError)


def is_final_for_recipient(exc: BaseException | None) -> bool:
    """True when no other provider can do better for this recipient (no failover)."""
    return isinstance(exc, _FINAL_FOR_RECIPIENT)


class GuardedProvider:
    """A provider behind its rate limiter, circuit breaker and retry policy.

    Args:
        provider: The provider.
        retry: Retries transient errors (an open breaker is not waited for: the chain moves on).
        breaker: Circuit breaker of this provider.
        limiter: Rate limiter of this provider, if any.
        rate_limit_wait: Longest wait for a rate-limit token per attempt, in seconds.
        clock: Clock for backoff waits.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        retry: RetryPolicy,
        breaker: CircuitBreaker,
        limiter: RateLimiter | None = None,
        rate_limit_wait: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self.provider = provider
        self.retry = retry
        self.breaker = breaker
        self.limiter = limiter
        self.rate_limit_wait = rate_limit_wait
        self.clock = clock or system_clock

    @property
    def name(self) -> str:
        """The provider's name."""
        return self.provider.name

    async def send(self, message: OutboundMessage, on_failure: AttemptFailed) -> Outcome:
        """Send with retries; return the receipt, or the last error, and the attempts made.

        Retries stop at once for permanent errors and recipient-final ones, and on an open
        breaker (the chain moves on rather than waiting it out).
        """
        attempt = 0
        start = self.clock.monotonic()
        while True:
            attempt += 1
            try:
                if self.limiter is not None:
                    await self.limiter.acquire(1, timeout=self.rate_limit_wait)
                with self.breaker.allow():
                    receipt = await self.provider.send(
                        message
                        if attempt == message.attempt
                        else dataclasses.replace(message, attempt=attempt)
                    )
                return Outcome(attempt, receipt=receipt)
            except Exception as raw:  # noqa: BLE001 -- see _as_library_error
                exc = _as_library_error(raw, self.name)
                metrics.counter(_ATTEMPT_FAILURES, unit="{attempt}").add(
                    1,
                    {"notification.channel": message.channel, "notification.provider": self.name,
                     "error.type": type(exc).__qualname__},
                )  # fmt: skip
                await on_failure(message, self.name, attempt, exc)
                if isinstance(exc, CircuitOpenError) or is_final_for_recipient(exc):
                    return Outcome(attempt, error=exc)
                delay = self.retry.retry_delay(attempt, exc, elapsed=self.clock.monotonic() - start)
                if delay is None:
                    return Outcome(attempt, error=exc)
                try:
                    self.retry.record_retry(attempt, delay, exc, label=self.name)
                except Exception:
                    # Deliberately broad: a host's on_retry hook must not lose this send, or the
                    # results of the notification's other recipients.
                    log.exception("notifications: the retry policy's on_retry hook failed")
                log.info(
                    "notifications: %s attempt %d to %s failed (%s); retrying in %.2fs",
                    self.name, attempt, message.recipient, exc, delay,
                )  # fmt: skip
                await self.clock.sleep(delay)


class Outcome(NamedTuple):
    """What one provider achieved for one recipient.

    A named tuple rather than a frozen dataclass: one is built per send, and a tuple is
    immutable without a ``object.__setattr__`` call per field.
    """

    attempts: int
    receipt: SendReceipt | None = None
    error: CommunicationsError | None = None
