"""redis_check against a real redis-server: pass, fail while it is down, pass again after."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from _support.redis_server import RedisServer
from dotmac.communications.observability import CheckResult, HealthRegistry, redis_check

pytestmark = pytest.mark.redis


async def test_redis_check_passes_with_latency(redis_url: str) -> None:
    """PING on a live server passes and reports the round trip in ms."""
    registry = HealthRegistry()
    registry.register("redis:ping", redis_check(redis_url))
    report = await registry.check()
    assert report.status == "pass"
    [entry] = report.to_dict()["checks"]["redis:ping"]
    assert entry["componentType"] == "datastore"
    assert entry["observedUnit"] == "ms"
    assert 0 <= entry["observedValue"] < 2000


async def test_redis_check_reuses_a_given_client(aredis: aioredis.Redis) -> None:
    """A ready client is pinged and left open for its owner."""
    check = redis_check(aredis)
    for _ in range(2):
        result = await check()
        assert isinstance(result, CheckResult)
        assert result.status == "pass"
    assert await aredis.ping()


async def test_redis_check_fails_while_down_and_recovers(
    redis_server_factory: type[RedisServer],
) -> None:
    """A stopped server makes the check fail (not raise); after a restart it passes again."""
    server = redis_server_factory()
    server.start()
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
    registry = HealthRegistry()
    registry.register("redis:ping", redis_check(server.url))
    registry.register("redis:client", redis_check(client, name="redis:client"))
    try:
        assert (await registry.check()).status == "pass"

        server.stop()
        down = await registry.check()
        assert down.status == "fail"
        assert down.http_status == 503
        for name in ("redis:ping", "redis:client"):
            outcome = down.checks[name]
            assert outcome.status == "fail"
            assert outcome.output is not None
            assert f"health check {name}: Redis is unavailable" in outcome.output

        server.start()
        up = await registry.check()
        assert up.status == "pass", up.to_dict()
    finally:
        await client.aclose()
