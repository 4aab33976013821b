"""In-memory RateLimiter: burst, refill, waiting, timeouts, validation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dotmac.communications.errors import ConfigurationError, RateLimitedError
from dotmac.communications.observability import metrics
from dotmac.communications.resilience import RateLimiter
from dotmac.communications.testing import FakeClock


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


async def test_burst_up_to_capacity_then_refusal(clock: FakeClock) -> None:
    """A full bucket grants capacity tokens at once, then refuses."""
    limiter = RateLimiter("sms", rate=1.0, capacity=5, clock=clock)
    assert [await limiter.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    assert metrics.value("dotmac.resilience.rate_limit.rejections", {"name": "sms"}) == 1


async def test_refill_by_rate_on_the_clock(clock: FakeClock) -> None:
    """Tokens come back at rate per second, never above capacity."""
    limiter = RateLimiter("sms", rate=2.0, capacity=4, clock=clock)
    assert await limiter.try_acquire(4)
    clock.advance(0.5)
    assert await limiter.try_acquire()
    assert not await limiter.try_acquire()
    clock.advance(100.0)
    assert await limiter.try_acquire(4)
    assert not await limiter.try_acquire()


async def test_acquire_waits_exactly_the_needed_time(clock: FakeClock) -> None:
    """Acquiring sleeps on the clock for just the missing tokens' refill time."""
    limiter = RateLimiter("email", rate=4.0, capacity=2, clock=clock)
    await limiter.acquire(2)
    await limiter.acquire()
    assert clock.sleeps == [0.25]
    await limiter.acquire(2)
    assert clock.sleeps == [0.25, 0.5]


async def test_timeout_raises_without_waiting(clock: FakeClock) -> None:
    """A wait longer than the timeout raises RateLimitedError at once, with retry_after."""
    limiter = RateLimiter("push", rate=0.5, capacity=1, clock=clock)
    await limiter.acquire()
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire(timeout=1.0)
    assert info.value.retry_after == pytest.approx(2.0)
    assert info.value.transient
    assert clock.sleeps == []
    await limiter.acquire(timeout=2.0)
    assert clock.sleeps == [2.0]


@given(
    rate=st.floats(min_value=0.01, max_value=1000.0),
    capacity=st.integers(min_value=1, max_value=50),
    requests=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=5.0), st.integers(1, 50)), max_size=30
    ),
)
async def test_grants_never_exceed_capacity_plus_refill(
    rate: float, capacity: int, requests: list[tuple[float, int]]
) -> None:
    """Over any schedule, tokens granted <= capacity + rate * elapsed time."""
    clock = FakeClock()
    limiter = RateLimiter("prop", rate=rate, capacity=capacity, clock=clock)
    granted = 0
    for pause, tokens in requests:
        clock.advance(pause)
        wanted = min(tokens, capacity)
        if await limiter.try_acquire(wanted):
            granted += wanted
    elapsed = clock.monotonic() - 1000.0
    assert granted <= capacity + rate * elapsed + 1e-6


async def test_same_name_in_memory_does_not_share(clock: FakeClock) -> None:
    """Two in-memory limiters have their own buckets, whatever their names."""
    first = RateLimiter("sms", rate=1.0, capacity=1, clock=clock)
    second = RateLimiter("sms", rate=1.0, capacity=1, clock=clock)
    assert await first.try_acquire()
    assert await second.try_acquire()
    assert first.key is None


@pytest.mark.parametrize("tokens", [0, -1, 6, float("nan")])
async def test_bad_token_counts_raise_value_error(clock: FakeClock, tokens: float) -> None:
    """A token count must be positive and at most capacity."""
    limiter = RateLimiter("sms", rate=1.0, capacity=5, clock=clock)
    with pytest.raises(ValueError, match="tokens"):
        await limiter.try_acquire(tokens)
    with pytest.raises(ValueError, match="tokens"):
        await limiter.acquire(tokens)


async def test_negative_timeout_is_rejected(clock: FakeClock) -> None:
    """A negative timeout is a ValueError."""
    limiter = RateLimiter("sms", rate=1.0, capacity=5, clock=clock)
    with pytest.raises(ValueError, match="timeout"):
        await limiter.acquire(timeout=-1)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": "", "rate": 1, "capacity": 1}, "name"),
        ({"name": "a{b}", "rate": 1, "capacity": 1}, "name"),
        ({"name": "a", "rate": 0, "capacity": 1}, "rate"),
        ({"name": "a", "rate": float("inf"), "capacity": 1}, "rate"),
        ({"name": "a", "rate": 1, "capacity": 0.5}, "capacity"),
        ({"name": "a", "rate": 1, "capacity": 1, "key_prefix": ""}, "key_prefix"),
        ({"name": "a", "rate": 1, "capacity": 1, "redis_url": "http://x"}, "redis_url"),
    ],
)
def test_invalid_parameters_are_named(kwargs: dict[str, object], param: str) -> None:
    """Bad parameters raise ConfigurationError naming the parameter."""
    with pytest.raises(ConfigurationError, match=param):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


async def test_aclose_without_redis_is_harmless(clock: FakeClock) -> None:
    """An in-memory limiter works as an async context manager."""
    async with RateLimiter("sms", rate=1.0, capacity=1, clock=clock) as limiter:
        assert await limiter.try_acquire()
