"""Token-bucket rate limiting, in memory or shared across processes through Redis.

A bucket holds up to ``capacity`` tokens and gains ``rate`` tokens per second; it starts full,
so bursts of ``capacity`` pass at once. In memory, each :class:`RateLimiter` has its own bucket
(two in-memory limiters with the same name do **not** share). With Redis, every limiter with the
same ``key_prefix`` and ``name`` shares one bucket, updated atomically by a Lua script.

**Time with Redis.** By default the script refills by the Redis server's own clock (``TIME``), so
processes on hosts whose clocks disagree still share one honest budget. When a ``clock`` is
injected (tests), its ``time()`` is sent instead. Either way a lagging reading never refills the
bucket backwards.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Protocol

import redis.asyncio as aioredis

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications._redis import create_redis_client, redis_errors, tagged_key
from dotmac.communications.errors import ConfigurationError, RateLimitedError
from dotmac.communications.observability import metrics

__all__ = ["RateLimiter"]

_REJECTIONS = "dotmac.resilience.rate_limit.rejections"
_EPSILON = 1e-9  # float refill arithmetic may leave a hair under a whole token

# KEYS[1]: bucket hash. ARGV: rate (tokens/s), capacity, now (s; "" = the server's TIME),
# tokens wanted, TTL (ms).
# Returns {1, "0"} when the tokens were taken, else {0, "<seconds until they will be there>"}
# (a string: Redis truncates Lua numbers to integers).
_TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local wanted = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local allowed = 0
local wait = 0
if tokens + 1e-9 >= wanted then
  tokens = math.max(0, tokens - wanted)
  allowed = 1
else
  wait = (wanted - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {allowed, string.format('%.17g', wait)}
"""


class _Bucket(Protocol):
    async def take(self, tokens: float) -> float:
        """Take ``tokens`` if there; return 0.0, else the seconds until they will be."""
        ...


class _MemoryBucket:
    __slots__ = ("_capacity", "_clock", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, capacity: float, clock: Clock) -> None:
        self._rate = rate
        self._capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._updated = clock.monotonic()

    async def take(self, tokens: float) -> float:
        now = self._clock.monotonic()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
        self._updated = now
        if self._tokens + _EPSILON >= tokens:
            self._tokens = max(0.0, self._tokens - tokens)
            return 0.0
        return (tokens - self._tokens) / self._rate


class _RedisBucket:
    __slots__ = ("_args", "_clock", "_key", "_name", "_script", "_server_time")

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key: str,
        name: str,
        rate: float,
        capacity: float,
        clock: Clock,
        server_time: bool,
    ) -> None:
        self._server_time = server_time
        self._key = key
        self._name = name
        self._clock = clock
        self._script = client.register_script(_TAKE_SCRIPT)
        # Idle buckets expire once they would have refilled completely (plus a second's margin),
        # which is indistinguishable from a full bucket.
        ttl_ms = math.ceil(capacity / rate * 1000) + 1000
        self._args = (rate, capacity, ttl_ms)

    async def take(self, tokens: float) -> float:
        rate, capacity, ttl_ms = self._args
        with redis_errors(f"rate limiter {self._name!r}"):
            allowed, wait = await self._script(
                keys=[self._key],
                args=[
                    rate,
                    capacity,
                    "" if self._server_time else self._clock.time(),
                    tokens,
                    ttl_ms,
                ],
            )
        return 0.0 if int(allowed) else max(float(wait), 0.0)


def _check_number(value: object, name: str, minimum: float, *, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"RateLimiter: {name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ConfigurationError(f"RateLimiter: {name} must be {relation} {minimum}, got {value!r}")
    return float(value)


class RateLimiter:
    """A token bucket: ``rate`` tokens per second, bursts of up to ``capacity``.

    Args:
        name: The limit's name (metrics, errors and the Redis key); no braces.
        rate: Tokens added per second (> 0).
        capacity: Most tokens the bucket holds (>= 1); it starts full.
        redis_url: Share the bucket through this Redis; the limiter owns the client it creates.
        clock: Clock to wait on and refill by (default: the system clock). With Redis, an
            injected clock's ``time()`` refills the shared bucket; without one, the Redis
            server's clock does, so hosts need not agree on the time.
        redis_client: A ready client to share the bucket through; the caller keeps ownership.
        key_prefix: Prefix of the Redis key, which is ``{<key_prefix>:<name>}`` (hash-tagged).

    Raises:
        ConfigurationError: A parameter is invalid, or both ``redis_url`` and ``redis_client``
            were given.
    """

    def __init__(
        self,
        name: str,
        rate: float,
        capacity: float,
        *,
        redis_url: str | None = None,
        clock: Clock | None = None,
        redis_client: aioredis.Redis | None = None,
        key_prefix: str = "dotmac:ratelimit",
    ) -> None:
        if not isinstance(name, str) or not name or "{" in name or "}" in name:
            raise ConfigurationError(
                f"RateLimiter: name must be a non-empty str without braces, got {name!r}"
            )
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(
                f"RateLimiter: key_prefix must be non-empty and brace-free, got {key_prefix!r}"
            )
        if redis_url is not None and redis_client is not None:
            raise ConfigurationError("RateLimiter: pass redis_url or redis_client, not both")
        self.name = name
        self.rate = _check_number(rate, "rate", 0.0, strict=True)
        self.capacity = _check_number(capacity, "capacity", 1.0, strict=False)
        self.clock: Clock = clock or system_clock
        self.key: str | None = None
        """The Redis key of the shared bucket (``None`` in memory)."""
        self._owned_client: aioredis.Redis | None = None
        self._bucket: _Bucket
        if redis_url is not None:
            redis_client = self._owned_client = create_redis_client(redis_url)
        if redis_client is None:
            self._bucket = _MemoryBucket(self.rate, self.capacity, self.clock)
        else:
            self.key = tagged_key(f"{key_prefix}:{name}")
            self._bucket = _RedisBucket(
                redis_client,
                key=self.key,
                name=name,
                rate=self.rate,
                capacity=self.capacity,
                clock=self.clock,
                server_time=clock is None,
            )

    def __repr__(self) -> str:
        where = "memory" if self.key is None else f"redis key {self.key!r}"
        return f"<RateLimiter {self.name!r} {self.rate}/s burst {self.capacity} in {where}>"

    async def try_acquire(self, tokens: float = 1) -> bool:
        """Take ``tokens`` if the bucket has them now; never wait.

        Args:
            tokens: How many tokens to take (> 0, <= capacity).

        Returns:
            ``True`` if taken, ``False`` if the bucket has too few.

        Raises:
            ValueError: ``tokens`` is not positive or exceeds ``capacity``.
            BackendUnavailableError: Redis could not be reached (Redis limiters only).
        """
        self._check_tokens(tokens)
        if await self._bucket.take(tokens) == 0.0:
            return True
        self._reject()
        return False

    # The timeout is measured on the injected clock and refuses up front rather than cancelling
    # a wait, which asyncio.timeout (on the loop's real time) could not do.
    async def acquire(self, tokens: float = 1, timeout: float | None = None) -> None:
        """Take ``tokens``, waiting on the clock until the bucket has them.

        Args:
            tokens: How many tokens to take (> 0, <= capacity).
            timeout: Longest wait in seconds; ``None`` waits as long as needed.

        Raises:
            ValueError: ``tokens`` is not positive or exceeds ``capacity``, or ``timeout`` < 0.
            RateLimitedError: The tokens would not be there within ``timeout``; raised at once,
                without waiting, with ``retry_after`` set to the wait needed.
            BackendUnavailableError: Redis could not be reached (Redis limiters only).
        """
        self._check_tokens(tokens)
        if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
            raise ValueError(f"timeout must be a finite number >= 0 or None, got {timeout!r}")
        start = self.clock.monotonic()
        while True:
            wait = await self._bucket.take(tokens)
            if wait == 0.0:
                return
            if timeout is not None and self.clock.monotonic() - start + wait > timeout:
                self._reject()
                raise RateLimitedError(
                    f"rate limit {self.name!r}: {tokens} token(s) not available within "
                    f"{timeout}s (next in {wait:.3f}s)",
                    retry_after=wait,
                )
            await self.clock.sleep(wait)

    async def aclose(self) -> None:
        """Close the Redis client the limiter created (an injected client is left open)."""
        if self._owned_client is not None:
            client, self._owned_client = self._owned_client, None
            await client.aclose()

    async def __aenter__(self) -> RateLimiter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_tokens(self, tokens: float) -> None:
        if isinstance(tokens, bool) or not isinstance(tokens, int | float):
            raise TypeError(f"tokens must be a number, got {tokens!r}")
        if not 0 < tokens <= self.capacity:
            raise ValueError(
                f"rate limiter {self.name!r}: tokens must be > 0 and <= capacity "
                f"({self.capacity}), got {tokens!r}"
            )

    def _reject(self) -> None:
        metrics.counter(_REJECTIONS, description="Calls refused by a rate limiter").add(
            1, {"name": self.name}
        )
