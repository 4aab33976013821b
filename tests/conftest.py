"""Shared fixtures: a real redis-server, a fake clock, and no leaked global state."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from _support.redis_server import RedisServer, in_ci, redis_server_binary
from dotmac.communications.observability import metrics
from dotmac.communications.testing import FakeClock

# Read once at import: tests that scrub DOTMAC_* variables must not hide the test server.
_TEST_REDIS_URL = os.environ.get("DOTMAC_TEST_REDIS_URL")


def _need_redis(reason: str) -> None:
    if in_ci():
        pytest.fail(f"Redis is required in CI and is missing: {reason}")
    pytest.skip(f"Redis not available: {reason}")


@pytest.fixture(scope="session")
def _redis_server_url() -> Iterator[str]:
    if _TEST_REDIS_URL:
        yield _TEST_REDIS_URL
        return
    if redis_server_binary() is None:
        _need_redis("set DOTMAC_TEST_REDIS_URL or install redis-server")
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def redis_url(_redis_server_url: str) -> str:
    """URL of a real, empty Redis database (flushed before each test)."""
    client = redis.Redis.from_url(_redis_server_url, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        _need_redis(f"{_redis_server_url} does not answer: {exc}")
    finally:
        client.close()
    return _redis_server_url


@pytest.fixture
def redis_server_factory() -> Iterator[type[RedisServer]]:
    """Start private redis-server processes a test may stop and restart; all are closed after."""
    if redis_server_binary() is None:
        _need_redis("install redis-server; this test restarts its own server")
    started: list[RedisServer] = []

    class _Tracked(RedisServer):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield _Tracked
    for server in started:
        server.close()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's DOTMAC_*/OTEL_* variables; metrics and breakers start empty."""
    from dotmac.communications.resilience import circuit_breakers

    for name in list(os.environ):
        if name.startswith(("DOTMAC_", "OTEL_")):
            monkeypatch.delenv(name)
    metrics.reset()
    circuit_breakers.clear()


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock: sleeping advances it instantly."""
    return FakeClock()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio redis-py client on the test database, for checking what the library wrote."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()
