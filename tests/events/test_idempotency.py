"""Idempotency stores: leases, renewal, completion and release, in memory and on Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dotmac.communications.errors import BackendUnavailableError
from dotmac.communications.events import (
    DuplicateInProgressError,
    Event,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    idempotent,
)
from dotmac.communications.testing import FakeClock


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    """A memory store, then a Redis store on the real test server."""
    if request.param == "memory":
        yield MemoryIdempotencyStore()
        return
    redis_store = RedisIdempotencyStore(request.getfixturevalue("redis_url"))
    yield redis_store
    await redis_store.aclose()


async def test_lease_lifecycle(store: IdempotencyStore) -> None:
    """acquired → busy for others (with time left) → done after complete; release frees it."""
    assert await store.claim("k1", "a", 10) == ("acquired", 0.0)
    state, remaining = await store.claim("k1", "b", 10)
    assert state == "busy"
    assert 5 < remaining <= 10
    await store.complete("k1", "a", 60)
    assert await store.claim("k1", "b", 10) == ("done", 0.0)
    assert (await store.claim("k2", "a", 10))[0] == "acquired"
    await store.release("k2", "b")  # not the holder: no effect
    assert (await store.claim("k2", "b", 10))[0] == "busy"
    await store.release("k2", "a")
    assert (await store.claim("k2", "b", 10))[0] == "acquired"


async def test_only_the_holder_renews(store: IdempotencyStore) -> None:
    """extend() renews the holder's lease and ignores anyone else."""
    assert (await store.claim("k", "a", 1))[0] == "acquired"
    await store.extend("k", "a", 30)
    assert (await store.claim("k", "b", 1))[1] > 5
    await store.extend("k", "b", 1000)
    assert (await store.claim("k", "c", 1))[1] <= 30


async def test_lapsed_lease_can_be_taken_over() -> None:
    """A holder that stopped renewing loses the key after its lease (memory, fake clock)."""
    clock = FakeClock()
    store = MemoryIdempotencyStore(clock=clock)
    assert (await store.claim("k", "crashed", 10))[0] == "acquired"
    clock.advance(10.01)
    assert (await store.claim("k", "next", 10))[0] == "acquired"


async def test_duplicate_in_progress_says_when_to_retry() -> None:
    """A concurrent duplicate raises a transient error carrying the holder's remaining lease."""
    store = MemoryIdempotencyStore()
    event = Event("a.b", 1)
    await store.claim(f"h:{event.id}", "other", 8)

    @idempotent(store, namespace="h", lease=8)
    async def handler(e: Event) -> None:
        raise AssertionError("must not run")

    with pytest.raises(DuplicateInProgressError) as info:
        await handler(event)
    assert info.value.transient
    assert info.value.retry_after is not None
    assert 0 < info.value.retry_after <= 8


class _CompleteFails(MemoryIdempotencyStore):
    """A user store whose complete() hits an outage."""

    async def complete(self, key: str, token: str, ttl: float) -> None:
        raise BackendUnavailableError("store went away")


async def test_a_failed_completion_does_not_rerun_the_handler() -> None:
    """When marking done fails after the handler succeeded, the result still stands."""
    calls: list[int] = []

    @idempotent(_CompleteFails(), namespace="h")
    async def handler(e: Event) -> str:
        calls.append(e.attempt)
        return "charged"

    assert await handler(Event("a.b", 1)) == "charged"
    assert calls == [1]


async def test_a_full_memory_store_forgets_its_oldest_finished_keys() -> None:
    """At max_keys the oldest done keys are evicted instead of refusing new events."""
    store = MemoryIdempotencyStore(max_keys=3)
    for n in range(3):
        assert (await store.claim(f"k{n}", "t", 10))[0] == "acquired"
        await store.complete(f"k{n}", "t", 3600)
    assert (await store.claim("k3", "t", 10))[0] == "acquired"
    assert (await store.claim("k0", "t", 10))[0] == "acquired"  # the oldest was forgotten
    assert (await store.claim("k2", "u", 10))[0] == "done"
