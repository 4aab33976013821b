"""RetryPolicy: backoff, retry classification, retry_after, deadline, decorator."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dotmac.communications.errors import (
    BackendUnavailableError,
    CircuitOpenError,
    ConfigurationError,
    OperationTimeoutError,
    PermanentDeliveryError,
    RateLimitedError,
)
from dotmac.communications.observability import metrics
from dotmac.communications.resilience import RetryAttempt, RetryPolicy, backoff_delay
from dotmac.communications.testing import FakeClock


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


class Flaky:
    """An async callable failing with the queued exceptions, then returning "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, *args: object, **kwargs: object) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


delays = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@given(
    attempt=st.integers(min_value=1, max_value=2000),
    initial=delays,
    extra=delays,
    multiplier=st.floats(min_value=1.0, max_value=10.0),
    seed=st.integers(),
)
def test_backoff_delay_within_bounds(
    attempt: int, initial: float, extra: float, multiplier: float, seed: int
) -> None:
    """Jittered delay lies in [0, cap] and the unjittered delay equals the cap."""
    max_delay = initial + extra
    try:
        cap = min(max_delay, initial * multiplier ** (attempt - 1))
    except OverflowError:
        cap = max_delay

    def delay(*, jitter: bool) -> float:
        return backoff_delay(
            attempt,
            initial_delay=initial,
            max_delay=max_delay,
            multiplier=multiplier,
            jitter=jitter,
            random=random.Random(seed),
        )

    assert 0.0 <= delay(jitter=True) <= cap
    assert delay(jitter=False) == cap


@given(max_attempts=st.integers(min_value=1, max_value=12), failures=st.integers(0, 20))
async def test_attempts_never_exceed_max(max_attempts: int, failures: int) -> None:
    """However many transient failures come, fn is called at most max_attempts times."""
    clock = FakeClock()
    flaky = Flaky(*(ConnectionError("blip") for _ in range(failures)))
    policy = RetryPolicy(max_attempts=max_attempts, clock=clock, random=random.Random(0))
    if failures < max_attempts:
        assert await policy.call(flaky) == "ok"
        assert flaky.calls == failures + 1
    else:
        with pytest.raises(ConnectionError):
            await policy.call(flaky)
        assert flaky.calls == max_attempts
    assert len(clock.sleeps) == flaky.calls - 1


def test_delays_lists_one_wait_per_retry() -> None:
    """delays() yields max_attempts - 1 exponential caps without jitter."""
    policy = RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=3.0, jitter=False)
    assert list(policy.delays()) == [0.5, 1.0, 2.0, 3.0]


def test_backoff_delay_rejects_attempt_zero() -> None:
    """Attempts count from 1."""
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"initial_delay": -1}, "initial_delay"),
        ({"initial_delay": 5, "max_delay": 1}, "max_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
        ({"retry_on": 42}, "retry_on"),
        ({"retry_on": int}, "retry_on"),
        ({"retry_on": ()}, "retry_on"),
    ],
)
def test_invalid_parameters_are_named(kwargs: dict[str, object], param: str) -> None:
    """Bad parameters raise ConfigurationError (a ValueError) naming the parameter."""
    with pytest.raises(ConfigurationError, match=param):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


async def test_transient_error_is_retried(clock: FakeClock) -> None:
    """A transient error is retried, waiting the backoff on the clock."""
    flaky = Flaky(BackendUnavailableError("down"), ConnectionError("reset"))
    policy = RetryPolicy(max_attempts=3, initial_delay=0.5, jitter=False, clock=clock)
    assert await policy.call(flaky) == "ok"
    assert flaky.calls == 3
    assert clock.sleeps == [0.5, 1.0]


async def test_permanent_error_is_not_retried(clock: FakeClock) -> None:
    """A permanent error propagates after one attempt, without notes."""
    error = PermanentDeliveryError("bad recipient")
    flaky = Flaky(error)
    with pytest.raises(PermanentDeliveryError) as info:
        await RetryPolicy(clock=clock).call(flaky)
    assert info.value is error
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert not getattr(error, "__notes__", [])


async def test_exhaustion_reraises_last_exception_with_note(clock: FakeClock) -> None:
    """After the last attempt the last exception is re-raised as is, noting the attempts."""
    last = ConnectionError("third")
    flaky = Flaky(ConnectionError("first"), ConnectionError("second"), last)
    with pytest.raises(ConnectionError) as info:
        await RetryPolicy(max_attempts=3, clock=clock, name="smtp").call(flaky)
    assert info.value is last
    assert info.value.__notes__ == ["retry policy 'smtp': gave up after 3 attempts"]


async def test_cancelled_error_is_not_retried(clock: FakeClock) -> None:
    """CancelledError from the call propagates at once and is not retried."""
    flaky = Flaky(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await RetryPolicy(retry_on=BaseException, clock=clock).call(flaky)
    assert flaky.calls == 1


async def test_cancelling_the_caller_stops_retrying() -> None:
    """Cancelling a task mid-backoff cancels it; the policy does not swallow it."""
    started = asyncio.Event()
    flaky = Flaky(*(ConnectionError() for _ in range(10)))

    async def observed() -> str:
        started.set()
        return await flaky()

    policy = RetryPolicy(max_attempts=10, initial_delay=60.0, max_delay=60.0, jitter=False)
    task = asyncio.create_task(policy.call(observed))
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flaky.calls == 1


@pytest.mark.parametrize(
    "error",
    [
        RateLimitedError("slow down", retry_after=4.0),
        CircuitOpenError("smtp", retry_after=4.0),
        BackendUnavailableError("busy", retry_after=4.0),
    ],
)
async def test_retry_after_is_honoured(clock: FakeClock, error: Exception) -> None:
    """The wait is at least the error's retry_after."""
    flaky = Flaky(error)
    policy = RetryPolicy(initial_delay=0.1, max_delay=10.0, jitter=False, clock=clock)
    assert await policy.call(flaky) == "ok"
    assert clock.sleeps == [4.0]


async def test_retry_after_of_foreign_exception_is_honoured(clock: FakeClock) -> None:
    """A non-library exception with a numeric retry_after is honoured too."""

    class HTTPStatusError(Exception):
        retry_after = 2.5

    policy = RetryPolicy(retry_on=HTTPStatusError, jitter=False, clock=clock)
    assert await policy.call(Flaky(HTTPStatusError())) == "ok"
    assert clock.sleeps == [2.5]


async def test_retry_after_beyond_max_delay_gives_up(clock: FakeClock) -> None:
    """A retry_after longer than max_delay stops at once instead of waiting."""
    error = RateLimitedError("tomorrow", retry_after=3600.0)
    flaky = Flaky(error)
    with pytest.raises(RateLimitedError) as info:
        await RetryPolicy(max_delay=10.0, clock=clock).call(flaky)
    assert info.value is error
    assert flaky.calls == 1
    assert clock.sleeps == []
    assert "exceeds max_delay" in info.value.__notes__[0]


async def test_deadline_stops_before_a_pointless_wait(clock: FakeClock) -> None:
    """No wait is started that would pass the overall deadline."""
    flaky = Flaky(*(ConnectionError() for _ in range(10)))
    policy = RetryPolicy(
        max_attempts=10, initial_delay=1.0, max_delay=100.0, jitter=False, deadline=5.0, clock=clock
    )
    with pytest.raises(ConnectionError) as info:
        await policy.call(flaky)
    assert clock.sleeps == [1.0, 2.0]  # 1 + 2 = 3 s; the next 4 s would end at 7 s > 5 s
    assert flaky.calls == 3
    assert "deadline" in info.value.__notes__[0]


async def test_deadline_bounds_a_running_attempt() -> None:
    """An attempt still running at the deadline is cut off with a chained OperationTimeoutError."""
    hang = asyncio.Event()

    async def stuck() -> None:
        await hang.wait()

    with pytest.raises(OperationTimeoutError) as info:
        await RetryPolicy(deadline=0.02).call(stuck)
    assert isinstance(info.value.__cause__, TimeoutError)


async def test_own_timeout_error_is_retried_within_deadline(clock: FakeClock) -> None:
    """A TimeoutError raised by the call itself is a transient error, not the deadline."""
    flaky = Flaky(TimeoutError("read timed out"))
    assert await RetryPolicy(deadline=60.0, clock=clock).call(flaky) == "ok"
    assert flaky.calls == 2


@pytest.mark.parametrize(
    ("retry_on", "retried"),
    [
        (KeyError, True),
        ((ValueError, KeyError), True),
        (ValueError, False),
        (lambda exc: isinstance(exc, KeyError), True),
        (lambda exc: False, False),
    ],
)
async def test_retry_on_accepts_types_tuples_and_predicates(
    clock: FakeClock, retry_on: object, retried: bool
) -> None:
    """retry_on may be an exception type, a tuple of types or a predicate."""
    flaky = Flaky(KeyError("x"))
    policy = RetryPolicy(retry_on=retry_on, clock=clock)  # type: ignore[arg-type]
    if retried:
        assert await policy.call(flaky) == "ok"
    else:
        with pytest.raises(KeyError):
            await policy.call(flaky)
    assert flaky.calls == (2 if retried else 1)


async def test_decorator_retries_and_keeps_metadata(clock: FakeClock) -> None:
    """@policy wraps an async function, keeps its name and docstring, and passes arguments."""
    flaky = Flaky(ConnectionError())
    seen: list[tuple[str, int]] = []

    @RetryPolicy(clock=clock)
    async def send_email(to: str, *, priority: int = 0) -> str:
        """Send one email."""
        seen.append((to, priority))
        return await flaky()

    assert send_email.__name__ == "send_email"
    assert send_email.__doc__ == "Send one email."
    assert await send_email("a@example.com", priority=2) == "ok"
    assert seen == [("a@example.com", 2), ("a@example.com", 2)]


def test_decorator_refuses_sync_functions() -> None:
    """Decorating a plain function is a TypeError, not a silent non-retry."""
    with pytest.raises(TypeError, match="async"):
        RetryPolicy()(len)  # type: ignore[arg-type]


async def test_on_retry_hook_and_metric(clock: FakeClock) -> None:
    """on_retry gets one RetryAttempt per wait and retries are counted by policy name."""
    error = ConnectionError("blip")
    attempts: list[RetryAttempt] = []
    policy = RetryPolicy(
        initial_delay=0.25, jitter=False, clock=clock, name="sms", on_retry=attempts.append
    )
    assert await policy.call(Flaky(error)) == "ok"
    assert attempts == [RetryAttempt(attempt=1, delay=0.25, exception=error, policy="sms")]
    assert metrics.value("dotmac.resilience.retries", {"policy": "sms"}) == 1


async def test_jitter_uses_injected_random() -> None:
    """The same seed gives the same waits."""
    errors = [ConnectionError() for _ in range(4)]
    first = FakeClock()
    await RetryPolicy(max_attempts=5, clock=first, random=random.Random(7)).call(Flaky(*errors))
    second = FakeClock()
    await RetryPolicy(max_attempts=5, clock=second, random=random.Random(7)).call(Flaky(*errors))
    assert first.sleeps == second.sleeps
    assert len(first.sleeps) == 4


def test_policy_is_frozen() -> None:
    """A policy cannot be changed after creation."""
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 5  # type: ignore[misc]
