"""Retry, circuit breaking and rate limiting, shared by every part of the library.

All three take an injectable clock (:class:`~dotmac.communications.testing.FakeClock` in tests).
"""

from __future__ import annotations

from .circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerOptions,
    CircuitBreakerRegistry,
    CircuitBreakerSnapshot,
    CircuitState,
    Permit,
    StateChange,
    circuit_breakers,
    default_record_on,
)
from .rate_limit import RateLimiter
from .retry import RetryAttempt, RetryOn, RetryPolicy, backoff_delay

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerOptions",
    "CircuitBreakerRegistry",
    "CircuitBreakerSnapshot",
    "CircuitState",
    "Permit",
    "RateLimiter",
    "RetryAttempt",
    "RetryOn",
    "RetryPolicy",
    "StateChange",
    "backoff_delay",
    "circuit_breakers",
    "default_record_on",
]
