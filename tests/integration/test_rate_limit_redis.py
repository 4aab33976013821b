"""Redis-backed RateLimiter: one budget across clients and processes, TTL, failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from _support.redis_server import RedisServer
from dotmac.communications._redis import create_redis_client
from dotmac.communications.errors import BackendUnavailableError, RateLimitedError
from dotmac.communications.resilience import RateLimiter
from dotmac.communications.testing import FakeClock

pytestmark = pytest.mark.redis


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """Two independent clients (two connection pools) on the test database."""
    first, second = create_redis_client(redis_url), create_redis_client(redis_url)
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_two_limiters_share_one_budget(
    clients: tuple[aioredis.Redis, aioredis.Redis], clock: FakeClock
) -> None:
    """Limiters with the same name on separate clients draw from one bucket."""
    first = RateLimiter("sms", rate=1.0, capacity=3, clock=clock, redis_client=clients[0])
    second = RateLimiter("sms", rate=1.0, capacity=3, clock=clock, redis_client=clients[1])
    granted = [await limiter.try_acquire() for limiter in (first, second, first, second)]
    assert granted == [True, True, True, False]
    other = RateLimiter("email", rate=1.0, capacity=3, clock=clock, redis_client=clients[1])
    assert await other.try_acquire()


async def test_refill_follows_the_injected_clock(redis_url: str, clock: FakeClock) -> None:
    """The script refills by the clock's time, so a fake clock drives a Redis bucket."""
    async with RateLimiter("push", rate=2.0, capacity=2, clock=clock, redis_url=redis_url) as lim:
        assert await lim.try_acquire(2)
        assert not await lim.try_acquire()
        clock.advance(0.5)
        assert await lim.try_acquire()
        assert not await lim.try_acquire()
        await lim.acquire()
        assert clock.sleeps == [pytest.approx(0.5)]
        with pytest.raises(RateLimitedError) as info:
            await lim.acquire(2, timeout=0.5)
        assert info.value.retry_after == pytest.approx(1.0)


async def test_without_a_clock_the_server_time_refills(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    """With no injected clock the bucket is stamped with the Redis server's TIME."""
    async with RateLimiter("server-time", rate=1.0, capacity=2, redis_url=redis_url) as lim:
        assert await lim.try_acquire()
        assert lim.key is not None
        stamped = float(await aredis.hget(lim.key, "ts") or 0)
    seconds, micros = await aredis.time()
    assert abs(seconds + micros / 1e6 - stamped) < 5


async def test_key_is_hash_tagged_and_expires(
    redis_url: str, aredis: aioredis.Redis, clock: FakeClock
) -> None:
    """The bucket lives in one hash-tagged key with a TTL of about a full refill."""
    async with RateLimiter("sms", rate=0.5, capacity=10, clock=clock, redis_url=redis_url) as lim:
        await lim.acquire(4)
        assert lim.key == "{dotmac:ratelimit:sms}"
        assert await aredis.keys("*") == [b"{dotmac:ratelimit:sms}"]
        assert await aredis.hget(lim.key, "tokens") == b"6"
        ttl_ms = await aredis.pttl(lim.key)
        assert 20_000 < ttl_ms <= 21_000


async def test_injected_client_is_not_closed(
    clients: tuple[aioredis.Redis, aioredis.Redis], clock: FakeClock
) -> None:
    """Closing the limiter leaves an injected client open."""
    limiter = RateLimiter("sms", rate=1.0, capacity=1, clock=clock, redis_client=clients[0])
    await limiter.aclose()
    assert await clients[0].ping()


async def test_redis_down_raises_backend_unavailable(
    redis_server_factory: type[RedisServer], clock: FakeClock
) -> None:
    """With Redis stopped, calls raise BackendUnavailableError chained to the redis error."""
    server = redis_server_factory()
    server.start()
    async with RateLimiter("sms", rate=1.0, capacity=5, clock=clock, redis_url=server.url) as lim:
        assert await lim.try_acquire()
        server.stop()
        with pytest.raises(BackendUnavailableError) as info:
            await lim.try_acquire()
        assert info.value.__cause__ is not None
        with pytest.raises(BackendUnavailableError):
            await lim.acquire(timeout=1.0)


_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from dotmac.communications.resilience import RateLimiter

    async def main() -> None:
        async with RateLimiter("shared", rate=0.001, capacity=25, redis_url=sys.argv[1]) as lim:
            granted = 0
            for _ in range(60):
                granted += await lim.try_acquire()
        sys.stdout.write(str(granted))

    asyncio.run(main())
    """
)


def test_separate_processes_share_one_budget(redis_url: str) -> None:
    """Three OS processes hammering one limiter are granted exactly its capacity in total."""
    started = time.monotonic()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, redis_url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    totals = []
    for worker in workers:
        out, _ = worker.communicate(timeout=30)
        assert worker.returncode == 0
        totals.append(int(out))
    # rate 0.001/s refills one token per 1000 s: the run cannot earn an extra one.
    assert time.monotonic() - started < 30
    assert sum(totals) == 25
