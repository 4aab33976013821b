"""A circuit breaker on the Resilience4j model, and a registry of breakers by name.

States and transitions::

    closed ──(>= minimum_calls in window and failure or slow-call rate over threshold)──▶ open
    open ──(reset_timeout passed; the next call becomes a trial)──▶ half_open
    half_open ──(all half_open_max_calls trials done; rates over threshold)──▶ open
    half_open ──(all half_open_max_calls trials done; rates under threshold)──▶ closed

The breaker is never stuck in half-open and never runs more than ``half_open_max_calls`` trials
at once: a cancelled trial releases its slot, and a trial still unreported ``reset_timeout`` after
it started is presumed lost and recorded as a failure (a call hanging that long is as bad a sign
as an error) when the next call asks for permission. Its late outcome is then ignored; a trial not
yet written off counts whenever it reports.

A breaker belongs to one event loop and is not thread-safe; its bookkeeping never awaits.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypedDict, TypeVar, Unpack

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import CircuitOpenError, CommunicationsError, ConfigurationError
from dotmac.communications.observability import metrics

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerOptions",
    "CircuitBreakerRegistry",
    "CircuitBreakerSnapshot",
    "CircuitState",
    "Permit",
    "StateChange",
    "circuit_breakers",
    "default_record_on",
]

P = ParamSpec("P")
T = TypeVar("T")

CircuitState = Literal["closed", "open", "half_open"]
"""The three states of a breaker."""

_log = logging.getLogger(__name__)
_STATE_CHANGES = "dotmac.resilience.circuit_breaker.state_changes"
_CALLS = "dotmac.resilience.circuit_breaker.calls"
_Outcome = tuple[bool, bool]  # (failed, slow)


def default_record_on(exc: BaseException) -> bool:
    """Count ``exc`` as a failure unless it is a permanent library error.

    A :class:`~dotmac.communications.errors.CommunicationsError` with ``transient=False`` (a 4xx,
    a rejected recipient, a bad template) shows the downstream service answered, so it counts as
    a success; every other exception counts as a failure.

    Args:
        exc: The exception a guarded call raised.

    Returns:
        ``True`` when the breaker records ``exc`` as a failure.
    """
    return not (isinstance(exc, CommunicationsError) and not exc.transient)


@dataclass(frozen=True, slots=True)
class StateChange:
    """What a state-change listener receives.

    Attributes:
        name: The breaker's name.
        old: State before the change.
        new: State after the change.
        at: Wall-clock time of the change (``clock.time()``).
    """

    name: str
    old: CircuitState
    new: CircuitState
    at: float


@dataclass(frozen=True, slots=True)
class CircuitBreakerSnapshot:
    """A breaker's state and window statistics, for health checks and dashboards.

    Attributes:
        name: The breaker's name.
        state: Current state.
        calls: Outcomes in the sliding window (closed state) or trials done (half-open).
        failures: Failed calls among them.
        slow_calls: Slow calls among them.
        failure_rate: ``failures / calls`` (0.0 without calls).
        slow_call_rate: ``slow_calls / calls`` (0.0 without calls).
        half_open_in_flight: Trial calls currently out.
        retry_after: Seconds until an open breaker admits a trial; ``None`` unless open.
    """

    name: str
    state: CircuitState
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float
    slow_call_rate: float
    half_open_in_flight: int
    retry_after: float | None


class CircuitBreakerOptions(TypedDict, total=False):
    """Keyword arguments of :class:`CircuitBreaker` after ``name``."""

    failure_rate_threshold: float
    minimum_calls: int
    window_size: int
    reset_timeout: float
    half_open_max_calls: int
    slow_call_duration: float | None
    slow_call_rate_threshold: float
    record_on: Callable[[BaseException], bool] | None
    clock: Clock | None


class Permit:
    """Permission for one call, from :meth:`CircuitBreaker.allow`; report its outcome once.

    Use it as a context manager (``with breaker.allow(): await send()``), which records a
    success, a failure (as ``record_on`` decides) or, on cancellation, a release; or call
    :meth:`record_success`, :meth:`record_failure` or :meth:`release` yourself. Only the first
    report counts; a half-open trial still unreported ``reset_timeout`` after it was granted is
    recorded as failed by the breaker, and its own later report is ignored.
    """

    __slots__ = ("_breaker", "_done", "_generation", "_started", "is_trial")

    def __init__(
        self, breaker: CircuitBreaker, generation: int, started: float, trial: bool
    ) -> None:
        self._breaker = breaker
        self._generation = generation
        self._started = started
        self._done = False
        self.is_trial = trial
        """Whether this is a half-open trial call."""

    @property
    def active(self) -> bool:
        """Whether the permit is unreported and still counts for its breaker's current state."""
        breaker = self._breaker
        if self.is_trial:
            return self in breaker._trials_out  # written-off and stale trials are not
        return not self._done and self._generation == breaker._generation

    def record_success(self) -> None:
        """Report that the call succeeded (it may still count as slow)."""
        self._finish(failed=False)

    def record_failure(self) -> None:
        """Report that the call failed."""
        self._finish(failed=True)

    def release(self) -> None:
        """Give the permit back without an outcome (the call was cancelled or never made)."""
        if not self._done:
            self._done = True
            self._breaker._release(self)

    def _finish(self, *, failed: bool) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(self, failed=failed, started=self._started)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.record_success()
        elif not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt: no verdict
            self.release()
        else:
            failed: bool | None = None
            try:
                failed = bool(self._breaker.record_on(exc))
            finally:
                if failed is None:  # record_on raised: free the (trial) slot, let its error out
                    self.release()
            self._finish(failed=failed)


def _count(outcomes: Collection[_Outcome]) -> tuple[int, int, int]:
    return (
        len(outcomes),
        sum(failed for failed, _ in outcomes),
        sum(slow for _, slow in outcomes),
    )


def _rate(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigurationError(f"CircuitBreaker: {name} must be in (0, 1], got {value!r}")
    return float(value)


def _positive(value: object, name: str, *, integer: bool = False) -> float:
    kinds = int if integer else int | float
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)
        or value <= 0
    ):
        kind = "an int" if integer else "a finite number"
        raise ConfigurationError(f"CircuitBreaker: {name} must be {kind} > 0, got {value!r}")
    return value


class CircuitBreaker:
    """Stop calling a failing dependency for a while, then probe it with a few trial calls.

    Guard calls with ``await breaker.call(fn, *args)``, the ``@breaker`` decorator, or
    ``with breaker.allow(): ...``. While open (or while the half-open trial slots are taken) a
    call raises :class:`~dotmac.communications.errors.CircuitOpenError` without running.

    Args:
        name: Name for errors, metrics and the registry.
        failure_rate_threshold: Failure rate in (0, 1] at or above which the breaker opens.
        minimum_calls: Outcomes needed in the window before the rates are judged.
        window_size: Number of most recent outcomes kept (count-based sliding window).
        reset_timeout: Seconds the breaker stays open before admitting trial calls.
        half_open_max_calls: Trial calls admitted per half-open period; each must report, or is
            recorded as failed once unreported for ``reset_timeout``.
        slow_call_duration: Calls lasting longer (on ``clock``) count as slow; ``None``: never.
        slow_call_rate_threshold: Slow-call rate in (0, 1] at or above which the breaker opens.
        record_on: Decides which exceptions count as failures; default
            :func:`default_record_on` (everything but permanent library errors). Exceptions not
            recorded count as successes; cancellations count as nothing.
        clock: Clock for the reset timeout and call durations (default: the system clock).

    Raises:
        ConfigurationError: A parameter is out of range (the message names it).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_rate_threshold: float = 0.5,
        minimum_calls: int = 10,
        window_size: int = 20,
        reset_timeout: float = 30.0,
        half_open_max_calls: int = 3,
        slow_call_duration: float | None = None,
        slow_call_rate_threshold: float = 1.0,
        record_on: Callable[[BaseException], bool] | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"CircuitBreaker: name must be a non-empty str, got {name!r}")
        self.name = name
        self.failure_rate_threshold = _rate(failure_rate_threshold, "failure_rate_threshold")
        self.slow_call_rate_threshold = _rate(slow_call_rate_threshold, "slow_call_rate_threshold")
        self.window_size = int(_positive(window_size, "window_size", integer=True))
        self.minimum_calls = int(_positive(minimum_calls, "minimum_calls", integer=True))
        if self.minimum_calls > self.window_size:
            raise ConfigurationError(
                f"CircuitBreaker: minimum_calls ({minimum_calls}) must be <= window_size "
                f"({window_size}), or the breaker could never open"
            )
        self.reset_timeout = float(_positive(reset_timeout, "reset_timeout"))
        self.half_open_max_calls = int(
            _positive(half_open_max_calls, "half_open_max_calls", integer=True)
        )
        self.slow_call_duration = (
            None
            if slow_call_duration is None
            else float(_positive(slow_call_duration, "slow_call_duration"))
        )
        self.record_on: Callable[[BaseException], bool] = record_on or default_record_on
        self.clock: Clock = clock or system_clock
        self._listeners: list[Callable[[StateChange], None]] = []
        self._state: CircuitState = "closed"
        self._generation = 0
        self._window: deque[_Outcome] = deque(maxlen=self.window_size)
        self._opened_at = 0.0
        # Trial permits of the current half-open period not yet reported nor written off, in
        # the order granted, each with the time it will be presumed lost.
        self._trials_out: dict[Permit, float] = {}
        self._trials: list[_Outcome] = []
        self._call_counters: dict[str, metrics.BoundCounter] = {}  # by outcome

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._state}>"

    @property
    def state(self) -> CircuitState:
        """Current state; an open breaker turns half-open at the first call after the timeout."""
        return self._state

    def on_state_change(
        self, callback: Callable[[StateChange], None]
    ) -> Callable[[StateChange], None]:
        """Register ``callback`` to run on every state change (usable as a decorator).

        Args:
            callback: Receives a :class:`StateChange`; its exceptions are logged, not raised.

        Returns:
            ``callback`` itself.
        """
        self._listeners.append(callback)
        return callback

    def allow(self) -> Permit:
        """Ask permission for one call.

        Returns:
            A :class:`Permit` to report the call's outcome on.

        Raises:
            CircuitOpenError: The breaker is open (``retry_after``: seconds until a trial is
                admitted) or every half-open trial slot is taken (``retry_after`` is ``None``).
        """
        now = self.clock.monotonic()
        if self._state == "half_open":
            self._write_off_lost_trials(now)  # may reopen the breaker
        if self._state == "open":
            remaining = self._opened_at + self.reset_timeout - now
            if remaining > 0:
                self._count_call("rejected")
                raise CircuitOpenError(self.name, retry_after=remaining)
            self._transition("half_open")
        if self._state == "half_open":
            if len(self._trials_out) + len(self._trials) >= self.half_open_max_calls:
                self._count_call("rejected")
                raise CircuitOpenError(self.name)
            permit = Permit(self, self._generation, now, trial=True)
            # Kept as a deadline rather than compared as `now - started`, so that a clock
            # advanced by exactly reset_timeout always reaches it despite float rounding.
            self._trials_out[permit] = now + self.reset_timeout
            return permit
        return Permit(self, self._generation, now, trial=False)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` if the breaker allows it, and record the outcome.

        Args:
            fn: The async callable to guard.
            *args: Positional arguments for ``fn``.
            **kwargs: Keyword arguments for ``fn``.

        Returns:
            What ``fn`` returned.

        Raises:
            CircuitOpenError: The breaker refused the call; ``fn`` was not called.
        """
        with self.allow():
            return await fn(*args, **kwargs)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an ``async def`` so that each call goes through :meth:`call`.

        Args:
            fn: The coroutine function to guard.

        Returns:
            A coroutine function with ``fn``'s name, docstring and signature.

        Raises:
            TypeError: ``fn`` is not a coroutine function.
        """
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"CircuitBreaker decorates async functions only, got {fn!r}")

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return wrapper

    def reset(self) -> None:
        """Close the breaker with an empty window; outcomes of calls still out are ignored."""
        self._transition("closed")
        self._generation += 1
        self._window.clear()

    def snapshot(self) -> CircuitBreakerSnapshot:
        """Return the current state and statistics.

        Returns:
            A :class:`CircuitBreakerSnapshot`.
        """
        calls, failures, slow = _count(self._trials if self._state == "half_open" else self._window)
        retry_after = None
        if self._state == "open":
            retry_after = max(0.0, self._opened_at + self.reset_timeout - self.clock.monotonic())
        return CircuitBreakerSnapshot(
            name=self.name,
            state=self._state,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_rate=failures / calls if calls else 0.0,
            slow_call_rate=slow / calls if calls else 0.0,
            half_open_in_flight=len(self._trials_out),
            retry_after=retry_after,
        )

    def _record(self, permit: Permit, *, failed: bool, started: float) -> None:
        duration = self.clock.monotonic() - started
        slow = self.slow_call_duration is not None and duration > self.slow_call_duration
        self._count_call("failure" if failed else "success")
        if permit.is_trial:
            if self._trials_out.pop(permit, None) is None:
                return  # stale: the half-open period it belonged to is over
            self._trials.append((failed, slow))
            if len(self._trials) >= self.half_open_max_calls:
                self._transition("open" if self._over_threshold(self._trials) else "closed")
            return
        if permit._generation != self._generation:
            return  # the state changed since the permit was granted; the outcome is stale
        self._window.append((failed, slow))
        calls = len(self._window)
        # A fast, successful call cannot raise either rate above what the previous call was
        # judged at (it replaces an outcome at least as good), so only the first judgement and
        # bad outcomes need the window counted.
        if calls < self.minimum_calls or (calls > self.minimum_calls and not (failed or slow)):
            return
        if self._over_threshold(self._window):
            self._transition("open")

    def _release(self, permit: Permit) -> None:
        self._trials_out.pop(permit, None)

    def _write_off_lost_trials(self, now: float) -> None:
        for permit, deadline in list(self._trials_out.items()):
            if deadline > now or self._state != "half_open":
                return  # granted in order, so later ones are younger; or a verdict was reached
            permit._done = True  # the breaker reports for it; its own report comes too late
            self._record(permit, failed=True, started=permit._started)

    def _over_threshold(self, outcomes: Collection[_Outcome]) -> bool:
        calls, failures, slow = _count(outcomes)
        return failures / calls >= self.failure_rate_threshold or (
            self.slow_call_duration is not None and slow / calls >= self.slow_call_rate_threshold
        )

    def _transition(self, new: CircuitState) -> None:
        old = self._state
        if old == new:
            return
        now = self.clock.monotonic()
        self._state = new
        self._generation += 1
        self._trials_out = {}
        self._trials = []
        if new == "open":
            self._opened_at = now
        elif new == "closed":
            self._window.clear()
        metrics.counter(_STATE_CHANGES, description="Circuit breaker state changes").add(
            1, {"name": self.name, "from": old, "to": new}
        )
        change = StateChange(self.name, old, new, self.clock.time())
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # noqa: BLE001
                # A broken listener (a logger, a metrics hook) must not fail the guarded call
                # nor stop the others; the breaker's state has already changed.
                _log.exception("circuit breaker %r: state-change listener failed", self.name)

    def _count_call(self, outcome: str) -> None:
        bound = self._call_counters.get(outcome)
        if bound is None:  # four outcomes at most: bound once each, not keyed per call
            counter = metrics.counter(_CALLS, description="Calls seen by circuit breakers")
            bound = self._call_counters[outcome] = counter.bind(
                {"name": self.name, "outcome": outcome}
            )
        bound.add()


class CircuitBreakerRegistry:
    """Circuit breakers by name, so every part of an app guarding one dependency shares one."""

    def __init__(self) -> None:
        self._breakers: dict[str, CircuitBreaker] = {}

    def get_or_create(self, name: str, **kwargs: Unpack[CircuitBreakerOptions]) -> CircuitBreaker:
        """Return the breaker called ``name``, creating it with ``kwargs`` the first time.

        Args:
            name: The breaker's name.
            **kwargs: :class:`CircuitBreaker` options, used when creating it.

        Returns:
            The one breaker with that name.

        Raises:
            ConfigurationError: The breaker exists with a different value for an option given.
        """
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = CircuitBreaker(name, **kwargs)
            return breaker
        for option, wanted in kwargs.items():
            have = getattr(breaker, option)
            if wanted is not None and have != wanted:
                raise ConfigurationError(
                    f"circuit breaker {name!r} already exists with {option}={have!r}, "
                    f"not {wanted!r}"
                )
        return breaker

    def get(self, name: str) -> CircuitBreaker | None:
        """Return the breaker called ``name``, or ``None``."""
        return self._breakers.get(name)

    def snapshots(self) -> dict[str, CircuitBreakerSnapshot]:
        """Return a snapshot of every breaker, by name."""
        return {name: breaker.snapshot() for name, breaker in self._breakers.items()}

    def clear(self) -> None:
        """Forget every breaker (tests)."""
        self._breakers.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._breakers


circuit_breakers = CircuitBreakerRegistry()
"""The process-wide default registry."""
