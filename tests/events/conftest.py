"""Fixtures for the event-bus contract suite: one test body, both backends."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from dotmac.communications.events import EventBus, MemoryBackend, RedisStreamsBackend
from dotmac.communications.events.backends import EventBackend

BusFactory = Callable[..., EventBus]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend_kind(request: pytest.FixtureRequest) -> str:
    """Run the test once on the memory backend and once on Redis Streams."""
    return str(request.param)


@pytest.fixture
async def make_bus(request: pytest.FixtureRequest, backend_kind: str) -> AsyncIterator[BusFactory]:
    """Build buses on the backend under test; buses made here share it like processes would.

    On memory every bus shares one MemoryBackend object (several consumers of the same groups);
    on Redis each bus gets its own RedisStreamsBackend and connection pool.
    """
    redis_url = request.getfixturevalue("redis_url") if backend_kind == "redis" else ""
    shared: dict[str, MemoryBackend] = {}
    buses: list[EventBus] = []

    def factory(*, claim_idle: float = 5.0, maxlen: int = 10_000, **kwargs: Any) -> EventBus:
        backend: EventBackend
        if backend_kind == "memory":
            if "memory" not in shared:
                shared["memory"] = MemoryBackend(claim_idle=claim_idle, maxlen=maxlen)
            backend = shared["memory"]
        else:
            backend = RedisStreamsBackend(
                redis_url, claim_idle=claim_idle, maxlen=maxlen, discovery_interval=0.05,
                trim_interval=0.5,
            )  # fmt: skip
        kwargs.setdefault("poll_interval", 0.05)
        kwargs.setdefault("shutdown_timeout", 2.0)
        bus = EventBus(backend, **kwargs)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop()


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test so a leaked connection is blamed on the test that leaked it."""
    yield
    gc.collect()
