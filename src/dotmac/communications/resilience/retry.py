"""Retry async calls with exponential backoff, full jitter and an overall deadline.

A :class:`RetryPolicy` retries only what its ``retry_on`` predicate accepts (by default
:func:`~dotmac.communications.errors.is_transient`), waits at least an error's ``retry_after``,
never waits past its ``deadline`` and never retries or swallows :class:`asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from random import Random
from typing import Any, ParamSpec, TypeVar

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import ConfigurationError, OperationTimeoutError, is_transient
from dotmac.communications.observability import metrics

__all__ = ["RetryAttempt", "RetryOn", "RetryPolicy", "backoff_delay"]

P = ParamSpec("P")
T = TypeVar("T")

RetryOn = Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...]
"""Which exceptions to retry: a predicate, an exception type, or a tuple of types."""

_RETRIES = "dotmac.resilience.retries"
_default_random = Random()  # noqa: S311 -- jitter spreads load; it needs no cryptographic strength


def backoff_delay(
    attempt: int,
    *,
    initial_delay: float = 0.1,
    max_delay: float = 10.0,
    multiplier: float = 2.0,
    jitter: bool = True,
    random: Random | None = None,
) -> float:
    """Compute the wait after failed attempt number ``attempt``.

    The cap is ``min(max_delay, initial_delay * multiplier ** (attempt - 1))``. With ``jitter``
    the delay is drawn uniformly from ``[0, cap]`` ("full jitter"); without, it is the cap.

    Args:
        attempt: The attempt that just failed, counting from 1.
        initial_delay: Cap after the first failure, in seconds.
        max_delay: Largest cap, in seconds.
        multiplier: Growth of the cap per attempt.
        jitter: Draw the delay uniformly below the cap.
        random: Source of randomness (tests pass a seeded :class:`random.Random`).

    Returns:
        The delay in seconds.

    Raises:
        ValueError: ``attempt`` is smaller than 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt!r}")
    try:
        cap = min(max_delay, initial_delay * multiplier ** (attempt - 1))
    except OverflowError:
        cap = max_delay
    if not jitter:
        return cap
    return (random or _default_random).uniform(0.0, cap)


@dataclass(frozen=True, slots=True)
class RetryAttempt:
    """What :attr:`RetryPolicy.on_retry` receives before each wait.

    Attributes:
        attempt: Number of the attempt that failed, counting from 1.
        delay: Seconds the policy will wait before the next attempt.
        exception: The exception that attempt raised.
        policy: The policy's ``name``, if it has one.
    """

    attempt: int
    delay: float
    exception: BaseException
    policy: str | None = None


def _number(value: object, name: str, *, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"RetryPolicy: {name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ConfigurationError(f"RetryPolicy: {name} must be {relation} {minimum}, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Retry an async call on transient errors, with exponential backoff and full jitter.

    Use it as ``await policy.call(fn, *args, **kwargs)`` or as a decorator ``@policy`` on an
    ``async def``. A failed attempt is retried when ``retry_on`` accepts its exception and
    attempts remain; the wait is :func:`backoff_delay`, raised to the exception's
    ``retry_after`` when it has one. The policy gives up (re-raising the last exception
    unchanged, with a note) when ``retry_after`` exceeds ``max_delay`` or the wait would reach
    the ``deadline``. :class:`asyncio.CancelledError` is never retried nor swallowed.

    With a ``deadline``, each attempt also runs under :func:`asyncio.timeout` for the time that
    remains; if it expires, :class:`~dotmac.communications.errors.OperationTimeoutError` is raised
    (chained to the cut-off attempt's error). Waiting is measured on ``clock``; the per-attempt
    bound uses the event loop's timer, since only the loop can interrupt a running attempt.

    Args:
        max_attempts: Total attempts, including the first (>= 1).
        initial_delay: Backoff cap after the first failure, in seconds (>= 0).
        max_delay: Largest wait, in seconds (>= initial_delay); a longer ``retry_after`` stops.
        multiplier: Growth of the backoff cap per attempt (>= 1).
        jitter: Draw each wait uniformly from ``[0, cap]`` instead of waiting the cap.
        deadline: Seconds from the first attempt after which no attempt starts or continues.
        retry_on: Predicate, exception type or tuple of types; default
            :func:`~dotmac.communications.errors.is_transient`.
        clock: Clock to sleep on and measure the deadline with (default: the system clock).
        random: Randomness for jitter (tests pass a seeded :class:`random.Random`).
        name: Name for metrics (attribute ``policy`` of ``dotmac.resilience.retries``) and hooks.
        on_retry: Called with a :class:`RetryAttempt` before each wait; its errors propagate.

    Raises:
        ConfigurationError: A parameter is out of range (the message names it).
    """

    max_attempts: int = 3
    initial_delay: float = 0.1
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: bool = True
    deadline: float | None = None
    retry_on: RetryOn | None = None
    clock: Clock | None = field(default=None, compare=False)
    random: Random | None = field(default=None, compare=False, repr=False)
    name: str | None = None
    on_retry: Callable[[RetryAttempt], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigurationError(
                f"RetryPolicy: max_attempts must be an int, got {self.max_attempts!r}"
            )
        if self.max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy: max_attempts must be >= 1, got {self.max_attempts!r}"
            )
        _number(self.initial_delay, "initial_delay", minimum=0.0)
        _number(self.max_delay, "max_delay", minimum=self.initial_delay)
        _number(self.multiplier, "multiplier", minimum=1.0)
        if self.deadline is not None:
            _number(self.deadline, "deadline", minimum=0.0, strict=True)
        if not _valid_retry_on(self.retry_on):
            raise ConfigurationError(
                "RetryPolicy: retry_on must be a predicate, an exception type or a tuple of "
                f"exception types, got {self.retry_on!r}"
            )

    def should_retry(self, exc: BaseException) -> bool:
        """Tell whether ``retry_on`` accepts ``exc`` (never for a cancellation).

        Args:
            exc: The exception an attempt raised.

        Returns:
            ``True`` when the policy would retry after ``exc``, attempts and deadline permitting.
        """
        if isinstance(exc, asyncio.CancelledError):
            return False
        retry_on = self.retry_on
        if retry_on is None:
            return is_transient(exc)
        if isinstance(retry_on, tuple | type):
            return isinstance(exc, retry_on)
        return bool(retry_on(exc))

    def delays(self) -> Iterator[float]:
        """Yield the backoff wait after each failed attempt but the last (``retry_after`` aside).

        Returns:
            An iterator of ``max_attempts - 1`` delays in seconds.
        """
        for attempt in range(1, self.max_attempts):
            yield self._backoff(attempt)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)``, retrying as the policy says.

        Args:
            fn: An async callable; it is called afresh for each attempt.
            *args: Positional arguments for ``fn``.
            **kwargs: Keyword arguments for ``fn``.

        Returns:
            What the first successful attempt returned.

        Raises:
            OperationTimeoutError: The deadline passed while an attempt was running.
            Exception: The last attempt's exception, unchanged, when the policy gives up.
        """
        clock = self.clock or system_clock
        start = clock.monotonic()
        attempt = 0
        while True:
            attempt += 1
            remaining = (
                None if self.deadline is None else self.deadline - (clock.monotonic() - start)
            )
            bound = asyncio.timeout(None if remaining is None else max(remaining, 0.0))
            try:
                async with bound:
                    return await fn(*args, **kwargs)
            except Exception as exc:
                if bound.expired():
                    raise OperationTimeoutError(
                        f"{self._label()}: deadline of {self.deadline}s passed during attempt "
                        f"{attempt}"
                    ) from exc
                delay = self.retry_delay(attempt, exc, elapsed=clock.monotonic() - start)
                if delay is None:
                    raise
                await self._before_retry(attempt, delay, exc, clock)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` so that each call goes through :meth:`call`.

        Args:
            fn: The coroutine function to wrap.

        Returns:
            A coroutine function with ``fn``'s name, docstring and signature.

        Raises:
            TypeError: ``fn`` is not a coroutine function.
        """
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"RetryPolicy decorates async functions only, got {fn!r}")

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return wrapper

    def retry_delay(
        self, attempt: int, exc: BaseException, *, elapsed: float = 0.0
    ) -> float | None:
        """Decide what follows a failed attempt, for callers that run attempts themselves.

        The event bus uses this to retry a handler without blocking other events.

        Args:
            attempt: The attempt that failed, counting from 1.
            exc: What it raised.
            elapsed: Seconds since the first attempt (for the deadline).

        Returns:
            Seconds to wait before the next attempt, or ``None`` to give up (``exc`` then has
            a note saying why, unless it was not retryable at all).
        """
        if not self.should_retry(exc):
            return None
        if attempt >= self.max_attempts:
            exc.add_note(f"{self._label()}: gave up after {_attempts(attempt)}")
            return None
        delay = self._backoff(attempt)
        retry_after = _retry_after(exc)
        if retry_after is not None:
            if retry_after > self.max_delay:
                exc.add_note(
                    f"{self._label()}: gave up after {_attempts(attempt)}; retry_after "
                    f"{retry_after}s exceeds max_delay {self.max_delay}s"
                )
                return None
            delay = max(delay, retry_after)
        if self.deadline is not None and elapsed + delay >= self.deadline:
            exc.add_note(
                f"{self._label()}: gave up after {_attempts(attempt)}; waiting {delay:.3f}s "
                f"would pass the {self.deadline}s deadline"
            )
            return None
        return delay

    async def _before_retry(self, attempt: int, delay: float, exc: Exception, clock: Clock) -> None:
        self.record_retry(attempt, delay, exc)
        await clock.sleep(delay)

    def record_retry(
        self, attempt: int, delay: float, exc: BaseException, *, label: str | None = None
    ) -> None:
        """Count a retry in ``dotmac.resilience.retries`` and call :attr:`on_retry`.

        :meth:`call` does this before each wait; callers that run attempts themselves with
        :meth:`retry_delay` call it so their retries are counted and hooked the same way.

        Args:
            attempt: Number of the attempt that failed.
            delay: Seconds until the next attempt.
            exc: The failed attempt's exception.
            label: The ``policy`` attribute of the metric when the policy has no ``name``.

        Raises:
            Exception: Whatever :attr:`on_retry` raises.
        """
        attributes = {"error.type": type(exc).__qualname__}
        policy = self.name or label
        if policy is not None:
            attributes["policy"] = policy
        metrics.counter(_RETRIES, description="Attempts retried by a RetryPolicy").add(
            1, attributes
        )
        if self.on_retry is not None:
            self.on_retry(RetryAttempt(attempt, delay, exc, self.name))

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(
            attempt,
            initial_delay=self.initial_delay,
            max_delay=self.max_delay,
            multiplier=self.multiplier,
            jitter=self.jitter,
            random=self.random,
        )

    def _label(self) -> str:
        return f"retry policy {self.name!r}" if self.name else "retry policy"


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def _valid_retry_on(value: object) -> bool:
    if isinstance(value, type):
        return issubclass(value, BaseException)
    if isinstance(value, tuple):
        return bool(value) and all(
            isinstance(t, type) and issubclass(t, BaseException) for t in value
        )
    return value is None or callable(value)


def _retry_after(exc: BaseException) -> float | None:
    # Library errors carry retry_after; third-party errors may too (an HTTP client's 429).
    value = getattr(exc, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value)
