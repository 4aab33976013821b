"""Idempotent consumption: run a handler once per event id, even when delivered twice.

At-least-once delivery means a handler may see an event again (a consumer crashed after the
handler ran but before the acknowledgement). :func:`idempotent` wraps a handler so each event id
is handled once within a TTL. A key goes through two states: *in progress* (a short lease that the
running handler keeps renewing, so a consumer that crashes mid-handler blocks the event for at
most one lease) and *done*.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications._redis import create_redis_client, redis_errors, tagged_key
from dotmac.communications.errors import CommunicationsError, ConfigurationError, EventError

from ._event import Event
from ._subscription import Handler

__all__ = [
    "DuplicateInProgressError",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "RedisIdempotencyStore",
    "idempotent",
]

H = TypeVar("H", bound=Handler)
log = logging.getLogger("dotmac.communications.events")
ClaimState = Literal["acquired", "done", "busy"]
Claim = tuple[ClaimState, float]
"""The claim's outcome and, when ``busy``, the seconds left on the holder's lease."""


class DuplicateInProgressError(EventError):
    """Another consumer is handling the same event right now; retry later."""

    transient = True


class IdempotencyStore(ABC):
    """Where handled keys are remembered."""

    @abstractmethod
    async def claim(self, key: str, token: str, lease: float) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or leased by someone else."""

    @abstractmethod
    async def extend(self, key: str, token: str, lease: float) -> None:
        """Renew ``token``'s lease on ``key`` (no effect once it lost or completed it)."""

    @abstractmethod
    async def complete(self, key: str, token: str, ttl: float) -> None:
        """Mark ``key`` done for ``ttl`` seconds (if ``token`` still holds it)."""

    @abstractmethod
    async def release(self, key: str, token: str) -> None:
        """Give ``key`` up after a failure so a retry may take it."""


class MemoryIdempotencyStore(IdempotencyStore):
    """Keys in this process (bounded by expiry; expired keys are dropped as they are met)."""

    def __init__(self, *, clock: Clock | None = None, max_keys: int = 1_000_000) -> None:
        self._clock = clock or system_clock
        self._max_keys = max_keys
        self._keys: dict[str, tuple[str, float]] = {}  # key -> (token or "", expires at)

    def _live(self, key: str) -> tuple[str, float] | None:
        entry = self._keys.get(key)
        if entry is not None and entry[1] <= self._clock.monotonic():
            del self._keys[key]
            return None
        return entry

    async def claim(self, key: str, token: str, lease: float) -> Claim:
        """See :meth:`IdempotencyStore.claim`."""
        entry = self._live(key)
        if entry is not None:
            if entry[0] == "":
                return "done", 0.0
            return "busy", max(entry[1] - self._clock.monotonic(), 0.0)
        if len(self._keys) >= self._max_keys:
            now = self._clock.monotonic()
            self._keys = {k: v for k, v in self._keys.items() if v[1] > now}
            # Still full: forget the oldest finished keys (dicts keep insertion order), never
            # a key in progress. Forgetting early only weakens duplicate detection for those.
            for stale in [k for k, v in self._keys.items() if v[0] == ""]:
                if len(self._keys) < self._max_keys:
                    break
                del self._keys[stale]
            if len(self._keys) >= self._max_keys:
                raise EventError(
                    f"idempotency store is full: {self._max_keys} keys in progress", transient=True
                )
        self._keys[key] = (token, self._clock.monotonic() + lease)
        return "acquired", 0.0

    async def extend(self, key: str, token: str, lease: float) -> None:
        """See :meth:`IdempotencyStore.extend`."""
        entry = self._live(key)
        if entry is not None and entry[0] == token:
            self._keys[key] = (token, self._clock.monotonic() + lease)

    async def complete(self, key: str, token: str, ttl: float) -> None:
        """See :meth:`IdempotencyStore.complete`."""
        entry = self._live(key)
        if entry is None or entry[0] == token:
            self._keys[key] = ("", self._clock.monotonic() + ttl)

    async def release(self, key: str, token: str) -> None:
        """See :meth:`IdempotencyStore.release`."""
        entry = self._live(key)
        if entry is not None and entry[0] == token:
            del self._keys[key]


_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current == false then
  redis.call('SET', KEYS[1], 'p:' .. ARGV[1], 'PX', ARGV[2])
  return {'acquired', 0}
end
if current == 'd' then return {'done', 0} end
return {'busy', redis.call('PTTL', KEYS[1])}
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == 'p:' .. ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""
_COMPLETE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == 'p:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'd', 'PX', ARGV[2])
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == 'p:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisIdempotencyStore(IdempotencyStore):
    """Keys in Redis, shared by every process (each key its own hash tag).

    Args:
        url: Redis URL; or pass ``client``.
        client: A ready client (the caller keeps ownership).
        prefix: Key prefix; keys are ``{<prefix>:<key>}``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = "dotmac:idempotency",
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisIdempotencyStore: pass exactly one of url or client")
        self._owned = client is None
        self.client = client if client is not None else create_redis_client(url or "")
        self._prefix = prefix
        self._claim = self.client.register_script(_CLAIM)
        self._extend = self.client.register_script(_EXTEND)
        self._complete = self.client.register_script(_COMPLETE)
        self._release = self.client.register_script(_RELEASE)

    def _key(self, key: str) -> str:
        return tagged_key(f"{self._prefix}:{key}")

    async def claim(self, key: str, token: str, lease: float) -> Claim:
        """See :meth:`IdempotencyStore.claim`."""
        with redis_errors("idempotency claim"):
            state, ttl_ms = await self._claim(
                keys=[self._key(key)], args=[token, int(lease * 1000)]
            )
        text = state.decode() if isinstance(state, bytes) else str(state)
        if text == "acquired":
            return "acquired", 0.0
        if text == "done":
            return "done", 0.0
        return "busy", max(int(ttl_ms), 0) / 1000

    async def extend(self, key: str, token: str, lease: float) -> None:
        """See :meth:`IdempotencyStore.extend`."""
        with redis_errors("idempotency extend"):
            await self._extend(keys=[self._key(key)], args=[token, int(lease * 1000)])

    async def complete(self, key: str, token: str, ttl: float) -> None:
        """See :meth:`IdempotencyStore.complete`."""
        with redis_errors("idempotency complete"):
            await self._complete(keys=[self._key(key)], args=[token, int(ttl * 1000)])

    async def release(self, key: str, token: str) -> None:
        """See :meth:`IdempotencyStore.release`."""
        with redis_errors("idempotency release"):
            await self._release(keys=[self._key(key)], args=[token])

    async def aclose(self) -> None:
        """Close the client if this store created it."""
        if self._owned:
            await self.client.aclose()


def idempotent(
    store: IdempotencyStore,
    *,
    ttl: float = 86_400.0,
    lease: float = 10.0,
    key: Callable[[Event], str] | None = None,
    namespace: str | None = None,
) -> Callable[[H], H]:
    """Decorate a handler so it runs at most once per event id (per ``namespace``) within ``ttl``.

    A duplicate delivery of a handled event returns without calling the handler. A duplicate
    that arrives while another consumer is still handling it raises
    :class:`DuplicateInProgressError` (transient, ``retry_after`` = the holder's remaining
    lease), so the bus retries it later. A failing handler releases the key, so its retry runs.
    While the handler runs its lease is renewed every ``lease / 3`` seconds; a consumer that
    crashes stops renewing and its lease lapses within ``lease`` seconds.

    Args:
        store: :class:`MemoryIdempotencyStore` or :class:`RedisIdempotencyStore`.
        ttl: Seconds a handled key is remembered.
        lease: Seconds an "in progress" key survives without renewal.
        key: Derive the key from the event (default: ``event.id``).
        namespace: Separates handlers sharing a store (default: the handler's qualified name).
    """
    if not ttl > 0 or not lease > 0:
        raise ConfigurationError(f"idempotent: ttl and lease must be > 0, got {ttl}, {lease}")

    def decorator(handler: H) -> H:
        space = namespace or getattr(handler, "__qualname__", "handler")

        @functools.wraps(handler)
        async def wrapper(event: Event) -> Any:
            name = f"{space}:{key(event) if key else event.id}"
            token = os.urandom(8).hex()
            state, remaining = await store.claim(name, token, lease)
            if state == "done":
                return None
            if state == "busy":
                raise DuplicateInProgressError(
                    f"event {event.id} is being handled elsewhere", retry_after=remaining
                )
            renewal = asyncio.create_task(_renew(store, name, token, lease))
            try:
                result = await handler(event)
            except BaseException:
                renewal.cancel()
                await store.release(name, token)
                raise
            renewal.cancel()
            try:
                await store.complete(name, token, ttl)
            except CommunicationsError as exc:
                # The handler's work is done: failing now would run it again. The key stays
                # "in progress" until its lease lapses, so a duplicate is refused meanwhile.
                log.warning("events: could not mark %s done: %s", name, exc)
            return result

        return wrapper  # type: ignore[return-value]  # same call signature as the handler

    return decorator


async def _renew(store: IdempotencyStore, name: str, token: str, lease: float) -> None:
    while True:
        await asyncio.sleep(lease / 3)
        try:
            await store.extend(name, token, lease)
        except CommunicationsError as exc:  # the lease may lapse; the handler goes on
            log.warning("events: could not renew the idempotency lease of %s: %s", name, exc)
