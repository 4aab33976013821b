"""Redis Streams specifics: trimming never drops what a declared group has not read."""

from __future__ import annotations

import asyncio

import pytest

from _support.waiting import eventually
from dotmac.communications.events import Event, EventBus, RedisStreamsBackend
from dotmac.communications.resilience import RetryPolicy

pytestmark = pytest.mark.redis


def _bus(redis_url: str) -> EventBus:
    backend = RedisStreamsBackend(
        redis_url, claim_idle=5, discovery_interval=0.05, trim_interval=0.1, maxlen=100_000
    )
    return EventBus(backend, poll_interval=0.05, shutdown_timeout=1)


async def test_trimming_keeps_events_for_a_declared_group_whose_consumers_are_down(
    redis_url: str,
) -> None:
    """A group declared earlier gets events of a topic that appeared while it was offline."""
    audit = _bus(redis_url)
    audited: list[int] = []

    @audit.subscribe("late.#", group="audit")
    async def record(event: Event) -> None:
        audited.append(event.data)

    await audit.start()  # declares the group ...
    await audit.stop()  # ... which then goes offline before any late.* topic exists

    billing = _bus(redis_url)
    billed: list[int] = []

    @billing.subscribe("late.#", group="billing")
    async def bill(event: Event) -> None:
        billed.append(event.data)

    async with billing:
        await billing.publish_many([("late.topic", n) for n in range(300)])
        await eventually(lambda: len(billed) == 300)
        await asyncio.sleep(0.3)  # several trim rounds by billing's consumer

    audit2 = _bus(redis_url)
    audit2.subscribe("late.#", record, group="audit")
    async with audit2:
        await eventually(lambda: len(audited) == 300, timeout=10)
    assert sorted(audited) == list(range(300))


async def test_idle_consumers_leave_their_groups_on_stop(redis_url: str, aredis) -> None:
    """A consumer with nothing pending is deleted from the group when its bus stops."""
    for _ in range(3):
        bus = _bus(redis_url)
        got: list[int] = []
        bus.subscribe("c.t", _sink(got), group="g")
        async with bus:
            await bus.publish("c.t", 1)
            await eventually(lambda: got == [1])  # noqa: B023 -- awaited inside the loop body
    groups = await aredis.xinfo_groups("{dotmac:events:c.t}")
    assert [int(g["consumers"]) for g in groups] == [0]


def _sink(sink: list[int]):
    async def handle(event: Event) -> None:
        sink.append(event.data)

    return handle


async def test_dead_letter_group_filter_reaches_older_letters(redis_url: str) -> None:
    """list(group=...) finds a group's letters behind many newer letters of another group."""
    bus = EventBus(
        RedisStreamsBackend(redis_url, discovery_interval=0.05), poll_interval=0.05,
        max_attempts=1,
    )  # fmt: skip

    async def fail(event: Event) -> None:
        raise RuntimeError("no")

    bus.subscribe("old.t", fail, group="rare")
    async with bus:
        await bus.publish("old.t", 0)
        await eventually_count(bus, "rare", 1)
        await bus.unsubscribe(bus.subscriptions[0])
        bus.subscribe("old.t", fail, group="noisy")
        await bus.ready()
        await bus.publish_many([("old.t", n) for n in range(250)])
        await eventually_count(bus, "noisy", 250, limit=1000)
        assert len(await bus.dead_letters.list(group="rare", limit=5)) == 1


async def eventually_count(bus: EventBus, group: str, count: int, limit: int = 100) -> None:
    async def enough() -> None:
        while len(await bus.dead_letters.list(group=group, limit=limit)) < count:  # noqa: ASYNC110 -- polls Redis
            await asyncio.sleep(0.05)

    await asyncio.wait_for(enough(), 15)


async def test_same_entry_ids_on_two_streams_are_tracked_apart(redis_url: str) -> None:
    """Two topics' events with the same entry id are each handled once, past claim_idle."""
    bus = EventBus(
        RedisStreamsBackend(redis_url, claim_idle=0.6, discovery_interval=0.05),
        poll_interval=0.05,
    )
    runs: list[str] = []

    @bus.subscribe("two.*", group="g", concurrency=2)
    async def slow(event: Event) -> None:
        runs.append(event.type)
        await asyncio.sleep(1.5)

    async with bus:
        await bus.publish_many([("two.a", 1), ("two.b", 2)])
        await asyncio.sleep(2.5)
    assert sorted(runs) == ["two.a", "two.b"]


async def test_fetch_never_returns_more_than_asked(redis_url: str) -> None:
    """XREADGROUP's COUNT is per stream; the consumer still hands out at most `count`."""
    from dotmac.communications.events.backends.base import GroupId

    backend = RedisStreamsBackend(redis_url, discovery_interval=0.01, key_lanes=8)
    group = GroupId("g", "many.*")
    await backend.declare_group(group)
    bus = EventBus(backend)
    await bus.publish_many([{"topic": "many.t", "data": n, "key": f"k{n}"} for n in range(40)])
    consumer = backend.consumer(group, "c1")
    seen: list[int] = []
    for _ in range(40):
        batch = await consumer.fetch(4, 0.05)
        assert len(batch) <= 4
        seen += [d.event.data for d in batch if d.event is not None]
        await consumer.ack(batch)
        if len(seen) == 40:
            break
    assert sorted(seen) == list(range(40))
    await consumer.close()
    await backend.close()


async def test_a_claimed_replay_for_another_group_is_acknowledged_away(
    redis_url: str, aredis
) -> None:
    """A replay meant for another group, left pending by a dead consumer, leaves the PEL."""
    bus = _bus(redis_url)
    got: list[int] = []
    bus.subscribe("rep.t", _sink(got), group="mine")
    backend = bus.backend
    assert isinstance(backend, RedisStreamsBackend)
    async with bus:
        await bus.publish("rep.t", 1)
        await eventually(lambda: got == [1])
    stream = backend.stream_key("rep.t")
    await aredis.xadd(stream, {"e": b"{}", "g": b"other|rep.t"})
    await aredis.xreadgroup("mine|rep.t", "dead", {stream: ">"})  # taken, never acknowledged
    quick = EventBus(
        RedisStreamsBackend(redis_url, claim_idle=0.2, discovery_interval=0.05), poll_interval=0.05
    )
    quick.subscribe("rep.t", _sink(got), group="mine")
    async with quick:

        async def drained() -> bool:
            return (await aredis.xpending(stream, "mine|rep.t"))["pending"] == 0

        await eventually(drained, timeout=5, what="the foreign replay acknowledged")
    assert got == [1]


async def test_stopping_with_a_retry_pending_releases_the_lane(redis_url: str, aredis) -> None:
    """A key waiting for its retry at stop() is left pending, and its lane lease is released."""
    bus = EventBus(
        RedisStreamsBackend(redis_url, claim_idle=5, discovery_interval=0.05, key_lanes=1),
        poll_interval=0.05, shutdown_timeout=0.5,
        publish_retry=None,
    )  # fmt: skip
    tried: list[int] = []
    policy = RetryPolicy(max_attempts=3, initial_delay=30, max_delay=30, jitter=False,
                         retry_on=lambda exc: True)  # fmt: skip

    @bus.subscribe("ret.t", group="g", retry=policy)
    async def fail(event: Event) -> None:
        tried.append(event.data)
        raise RuntimeError("later")

    async with bus:
        await bus.publish_many([{"topic": "ret.t", "data": n, "key": "k"} for n in range(3)])
        await eventually(lambda: tried == [0])
    lease = "{dotmac:events:ret.t}:lease:g|ret.t:0"
    assert await aredis.exists(lease) == 0
    pending = await aredis.xpending("{dotmac:events:ret.t}:lane:0", "g|ret.t")
    assert pending["pending"] == 3  # nothing lost, nothing acknowledged


async def test_a_deleted_lane_group_is_recreated_and_consumption_goes_on(
    redis_url: str, aredis
) -> None:
    """NOGROUP on a lane (a group deleted under us) is recovered from; keyed events still flow."""
    bus = EventBus(
        RedisStreamsBackend(redis_url, claim_idle=1, discovery_interval=0.05, key_lanes=1),
        poll_interval=0.05,
    )
    got: list[int] = []
    bus.subscribe("ng.t", _sink(got), group="g")
    async with bus:
        await bus.publish("ng.t", 0, key="k")
        await eventually(lambda: got == [0])
        await aredis.xgroup_destroy("{dotmac:events:ng.t}:lane:0", "g|ng.t")
        await asyncio.sleep(0.2)
        await bus.publish("ng.t", 1, key="k")
        await eventually(lambda: 1 in got, timeout=10)
    # The recreated group starts from its declaration again: 0 may come twice (at least once).
    assert set(got) == {0, 1}
    assert got[-1] == 1
