"""Per-call overhead of the resilience toolkit beside the raw operation it wraps.

Prints a table of medians over several rounds: calls/s and the ratio to the raw baseline.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from dotmac.communications._redis import create_redis_client
from dotmac.communications.resilience import CircuitBreaker, RateLimiter, RetryPolicy

ROUNDS = 5
CALLS = 50_000
REDIS_CALLS = 5_000


async def _noop() -> int:
    return 1


async def _rate(fn: Callable[[], Awaitable[object]], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await fn()
    return calls / (time.perf_counter() - start)


async def _median(fn: Callable[[], Awaitable[object]], calls: int) -> float:
    await _rate(fn, min(calls, 1000))  # warm up
    return statistics.median([await _rate(fn, calls) for _ in range(ROUNDS)])


async def main() -> None:
    policy = RetryPolicy(max_attempts=3)
    breaker = CircuitBreaker("bench")
    limiter = RateLimiter("bench", rate=1e12, capacity=1e12)
    rows: list[tuple[str, float, float]] = []
    raw = await _median(_noop, CALLS)
    rows.append(("raw await", raw, raw))
    rows.append(("RetryPolicy.call", await _median(lambda: policy.call(_noop), CALLS), raw))
    rows.append(("CircuitBreaker.call", await _median(lambda: breaker.call(_noop), CALLS), raw))
    rows.append(("RateLimiter memory", await _median(limiter.try_acquire, CALLS), raw))

    url = os.environ.get("DOTMAC_BENCH_REDIS_URL")
    if url:
        client = create_redis_client(url)
        script = client.register_script("return 1")
        raw_redis = await _median(lambda: script(keys=["{bench}:k"]), REDIS_CALLS)
        rows.append(("raw EVALSHA", raw_redis, raw_redis))
        shared = RateLimiter("bench", rate=1e9, capacity=1e9, redis_client=client)
        limited = await _median(shared.try_acquire, REDIS_CALLS)
        rows.append(("RateLimiter redis", limited, raw_redis))
        await client.aclose()

    print(f"{'operation':<22} {'calls/s':>12} {'vs raw':>8}")
    for name, rate, base in rows:
        print(f"{name:<22} {rate:>12,.0f} {rate / base:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
