"""Redis Streams event bus under faults: restarts, garbage entries, growth, and key layout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from _support.redis_server import RedisServer
from _support.waiting import eventually
from dotmac.communications.errors import BackendUnavailableError, OperationTimeoutError
from dotmac.communications.events import Event, EventBus, RedisStreamsBackend
from dotmac.communications.observability import CheckResult
from dotmac.communications.resilience import RetryPolicy

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def quick_backend(
    url: str, *, maxlen: int = 100_000, dead_letter_maxlen: int = 10_000
) -> RedisStreamsBackend:
    """A backend with test-sized intervals."""
    return RedisStreamsBackend(
        url,
        maxlen=maxlen,
        dead_letter_maxlen=dead_letter_maxlen,
        claim_idle=1.0,
        discovery_interval=0.1,
        trim_interval=0.2,
    )


@pytest.fixture
def server(redis_server_factory: type[RedisServer]) -> RedisServer:
    """A private, persistent (AOF, fsync always) redis-server the test may restart."""
    srv = redis_server_factory(appendonly=True)
    srv.start()
    return srv


async def restart(server: RedisServer, down_for: float) -> None:
    """Stop the server, keep it down for ``down_for`` seconds, start it again (same port, data)."""
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(down_for)
    await asyncio.to_thread(server.start)


async def test_acknowledged_publishes_are_handled_across_a_redis_restart(
    server: RedisServer,
) -> None:
    """Every publish that returned while Redis restarted is handled; consumers reconnect alone."""
    handled: set[str] = set()
    consumer = EventBus(quick_backend(server.url), poll_interval=0.1, shutdown_timeout=2.0)

    @consumer.subscribe("jobs.*", group="workers")
    async def handle(event: Event) -> None:
        handled.add(event.id)

    producer = EventBus(
        RedisStreamsBackend(server.url),
        publish_timeout=0.5,
        publish_retry=RetryPolicy(max_attempts=1),
    )
    acknowledged: list[str] = []
    refused = 0
    stop = asyncio.Event()

    async def publish_loop() -> None:
        nonlocal refused
        n = 0
        while not stop.is_set():
            try:
                event = await producer.publish("jobs.run", {"n": n})
            except (BackendUnavailableError, OperationTimeoutError):
                refused += 1
                await asyncio.sleep(0.05)
            else:
                acknowledged.append(event.id)
            n += 1
            await asyncio.sleep(0.005)

    async def published_more_than(count: int) -> bool:
        return len(acknowledged) > count

    async def all_handled() -> bool:
        return set(acknowledged) <= handled

    async with consumer, producer:
        publishing = asyncio.create_task(publish_loop())
        try:
            await eventually(lambda: published_more_than(50), timeout=10, what="50 publishes")
            await restart(server, down_for=1.5)
            before = len(acknowledged)
            await eventually(
                lambda: published_more_than(before + 50), timeout=15, what="publishing resumed"
            )
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await publishing
        await eventually(all_handled, timeout=20, what="every acknowledged event handled")

    assert refused > 0  # the outage was real: some publishes failed while Redis was down
    assert len(acknowledged) > 100
    assert set(acknowledged) <= handled


async def test_health_check_fails_while_redis_is_down_and_passes_after_restart(
    server: RedisServer,
) -> None:
    """health_check is pass before, fail while the server is stopped, and pass once it is back."""
    bus = EventBus(quick_backend(server.url), poll_interval=0.1, shutdown_timeout=2.0)

    @bus.subscribe("jobs.*", group="workers")
    async def handle(event: Event) -> None:
        """Never called."""

    last: list[CheckResult] = []

    def status_becomes(expected: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            last.append(await bus.health_check())
            return last[-1].status == expected

        return check

    async with bus:
        assert (await bus.health_check()).status == "pass"
        await asyncio.to_thread(server.stop)
        await eventually(status_becomes("fail"), timeout=15, what="health fails", every=0.1)
        assert last[-1].output is not None
        assert last[-1].output  # says why
        await asyncio.to_thread(server.start)
        await eventually(status_becomes("pass"), timeout=15, what="health passes", every=0.1)


async def test_undecodable_entries_are_dead_lettered_and_do_not_stall_the_consumer(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    """Foreign entries (bad JSON, no 'e' field) go to dead letters; later events are handled."""
    backend = quick_backend(redis_url)
    bus = EventBus(backend, poll_interval=0.1)
    handled: list[int] = []
    done = asyncio.Event()

    @bus.subscribe("billing.*", group="billing")
    async def handle(event: Event) -> None:
        handled.append(event.data["n"])
        if len(handled) == 6:
            done.set()

    async with bus:
        await bus.publish("billing.invoice", {"n": 0})  # registers the topic
        stream = backend.stream_key("billing.invoice")
        await aredis.xadd(stream, {b"e": b"not json"})
        await aredis.xadd(stream, {b"something": b"else"})
        for n in range(1, 6):
            await bus.publish("billing.invoice", {"n": n})
        async with asyncio.timeout(10):
            await done.wait()

        async def two_letters() -> bool:
            return len(await bus.dead_letters.list()) == 2

        await eventually(two_letters, timeout=5, what="two dead letters")
        letters = await bus.dead_letters.list()

    assert handled == [0, 1, 2, 3, 4, 5]
    errors = {letter.raw: letter.error for letter in letters}
    assert errors.keys() == {b"not json", b""}
    assert "not valid JSON" in errors[b"not json"], errors
    assert "no 'e' field" in errors[b""], errors
    assert all(letter.event is None for letter in letters)
    assert {(letter.group, letter.topic) for letter in letters} == {("billing", "billing.invoice")}


@pytest.mark.parametrize("maxlen", [100, 100_000])
async def test_acknowledged_entries_are_trimmed_from_the_stream(
    redis_url: str, aredis: aioredis.Redis, maxlen: int
) -> None:
    """1000 handled events leave a short stream: XADD MAXLEN and acked-entry trims bound it."""
    backend = quick_backend(redis_url, maxlen=maxlen)
    bus = EventBus(backend, poll_interval=0.1)
    handled: set[str] = set()

    @bus.subscribe("metrics.*", group="sink")
    async def handle(event: Event) -> None:
        handled.add(event.id)

    published: set[str] = set()
    stream = backend.stream_key("metrics.sample")
    async with bus:
        for start in range(0, 1000, 50):
            batch = await bus.publish_many([("metrics.sample", {"n": n}) for n in range(50)])
            published |= {event.id for event in batch}

            async def caught_up(count: int = start + 50) -> bool:
                return len(handled) >= count

            # The consumer keeps up, so MAXLEN never drops an entry before it is handled.
            await eventually(caught_up, timeout=10, what=f"{start + 50} handled")

        async def trimmed() -> bool:
            return await aredis.xlen(stream) <= 300

        await eventually(trimmed, timeout=5, what="stream trimmed to <= 300 entries")

    assert handled == published
    assert len(published) == 1000


async def test_dead_letter_stream_is_capped_near_dead_letter_maxlen(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    """500 dead letters with dead_letter_maxlen=50 leave roughly 50 (approximate trimming)."""
    backend = quick_backend(redis_url, dead_letter_maxlen=50)
    bus = EventBus(backend, poll_interval=0.1)
    attempts = 0

    @bus.subscribe("fail.*", group="doomed", retry=RetryPolicy(max_attempts=1))
    async def handle(event: Event) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("always fails")

    stream = backend.stream_key("fail.now")
    async with bus:
        for start in range(0, 500, 100):
            await bus.publish_many([("fail.now", {"n": n}) for n in range(start, start + 100)])

        async def all_dead() -> bool:
            if attempts < 500:
                return False
            pending = await aredis.xpending(stream, "doomed|fail.*")
            return int(pending["pending"]) == 0

        await eventually(all_dead, timeout=15, what="500 events dead-lettered")
        letters = await bus.dead_letters.list(limit=1000)

    length = await aredis.xlen(backend.dead_letter_key("fail.now"))
    assert attempts == 500
    assert 50 <= length <= 200
    assert len(letters) == length


async def test_every_key_of_a_topic_shares_one_hash_tag(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    """The stream, its dead letters and failure counts of a topic all share the {prefix:topic} tag."""
    backend = quick_backend(redis_url)
    bus = EventBus(backend, poll_interval=0.1)
    retried = asyncio.Event()
    release = asyncio.Event()
    retry = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.05, retry_on=Exception)

    @bus.subscribe("tags.*", group="g", retry=retry, concurrency=2)
    async def handle(event: Event) -> None:
        if event.data == "doomed" or event.attempt == 1:
            raise RuntimeError(f"{event.data} attempt {event.attempt}")
        retried.set()
        await release.wait()  # hold the retry so its failure count stays recorded

    tag = "{dotmac:events:tags.item}"
    async with bus:
        await bus.publish("tags.item", "doomed")
        await bus.publish("tags.item", "flaky")
        async with asyncio.timeout(10):
            await retried.wait()

        async def dead_lettered() -> bool:
            return len(await bus.dead_letters.list()) == 1

        await eventually(dead_lettered, timeout=5, what="the doomed event dead-lettered")
        keys = sorted([key.decode() async for key in aredis.scan_iter(match="*tags.item*")])
        release.set()

    lanes = [backend.lane_key("tags.item", n) for n in range(backend.key_lanes)]
    leases = [k for k in keys if k.startswith(f"{tag}:lease:g|tags.*:")]
    assert leases  # the consumer holds the lanes it reads
    assert keys == sorted(
        [
            backend.stream_key("tags.item"),
            backend.dead_letter_key("tags.item"),
            f"{tag}:failures:g|tags.*",
            *lanes,
            *leases,
        ]
    )
    assert all(key.startswith(tag) for key in keys)
    assert len({key_slot(key.encode()) for key in keys}) == 1
    # Once the retry succeeded and was acknowledged, its failure count is gone.
    assert await aredis.exists(f"{tag}:failures:g|tags.*") == 0
