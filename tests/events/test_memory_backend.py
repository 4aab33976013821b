"""Memory-backend specifics: bounded queues with backpressure, and building buses from config."""

from __future__ import annotations

import asyncio

import pytest

from _support.waiting import eventually
from dotmac.communications.config import CommunicationsConfig, EventsSettings
from dotmac.communications.errors import ConfigurationError, EventError, PublishTimeoutError
from dotmac.communications.events import (
    Event,
    EventBus,
    MemoryBackend,
    RedisStreamsBackend,
    UnknownBackendError,
)
from dotmac.communications.events.backends import GroupId
from dotmac.communications.observability import metrics
from dotmac.communications.testing import FakeClock


async def test_publish_waits_while_a_group_is_full_then_times_out() -> None:
    """A full group makes publish wait (backpressure) and fail after publish_timeout."""
    bus = EventBus(MemoryBackend(maxlen=3), publish_timeout=0.2, poll_interval=0.05)
    release = asyncio.Event()
    handled: list[int] = []

    @bus.subscribe("q.t", group="slow", max_in_flight=1)
    async def slow(event: Event) -> None:
        await release.wait()
        handled.append(event.data)

    async with bus:
        for n in range(3):
            await bus.publish("q.t", n)
        with pytest.raises(PublishTimeoutError, match="stayed full"):
            await bus.publish("q.t", 99)
        waiting = asyncio.create_task(bus.publish("q.t", 3))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # still waiting for room, not failed
        release.set()
        await asyncio.wait_for(waiting, 2)
        await eventually(lambda: handled == [0, 1, 2, 3])


async def test_batch_larger_than_a_group_is_refused_whole() -> None:
    """publish_many that can never fit fails at once and stores none of its events."""
    bus = EventBus(MemoryBackend(maxlen=2), poll_interval=0.05)
    got: list[int] = []

    @bus.subscribe("b.t", group="g")
    async def handle(event: Event) -> None:
        got.append(event.data)

    async with bus:
        with pytest.raises(PublishTimeoutError, match="capacity of 2"):
            await bus.publish_many([("b.t", n) for n in range(3)])
        await bus.publish("b.t", 42)
        await eventually(lambda: got == [42])


async def test_events_published_before_any_group_are_not_kept() -> None:
    """Events no group matches are not stored: a group declared later sees only newer ones."""
    backend = MemoryBackend(maxlen=5)
    publisher = EventBus(backend)
    async with publisher:
        for n in range(10):
            await publisher.publish("early.t", n)  # nobody listens yet
    late = EventBus(backend, poll_interval=0.05)
    got: list[int] = []

    @late.subscribe("early.t", group="late")
    async def handle(event: Event) -> None:
        got.append(event.data)

    async with late:
        await late.publish("early.t", 99)
        await eventually(lambda: got == [99])
        await asyncio.sleep(0.05)
    assert got == [99]


def test_from_config_memory() -> None:
    """EventBus.from_config builds the memory backend with the section's limits."""
    settings = CommunicationsConfig(events={"maxlen": 123, "max_attempts": 4}).events
    bus = EventBus.from_config(settings)
    assert isinstance(bus.backend, MemoryBackend)
    assert bus.backend.maxlen == 123
    assert bus.max_attempts == 4


def test_from_config_redis() -> None:
    """With backend=redis the bus uses Redis Streams at the section's URL and prefix."""
    settings = CommunicationsConfig(
        redis_url="redis://127.0.0.1:1/0",
        events={"backend": "redis", "stream_prefix": "app:ev", "claim_idle_seconds": 7},
    ).events
    bus = EventBus.from_config(settings)
    assert isinstance(bus.backend, RedisStreamsBackend)
    assert bus.backend.stream_key("a.b") == "{app:ev:a.b}"
    assert bus.backend.claim_idle == 7


@pytest.mark.parametrize(
    "settings",
    [
        EventsSettings.model_construct(backend="kafka"),
        EventsSettings.model_construct(backend="redis", redis_url=None),
    ],
)
def test_from_config_refuses_an_unusable_backend(settings: EventsSettings) -> None:
    """An unknown backend, or Redis without a URL, is an EventError and a ConfigurationError."""
    with pytest.raises(UnknownBackendError) as info:
        EventBus.from_config(settings)
    assert isinstance(info.value, EventError)
    assert isinstance(info.value, ConfigurationError)


async def test_a_group_without_consumers_drops_oldest_instead_of_blocking() -> None:
    """After its bus stops, a full group drops its oldest events; publishers never block on it."""
    backend = MemoryBackend(maxlen=3)
    stopped = EventBus(backend, poll_interval=0.05)
    got: list[int] = []

    @stopped.subscribe("d.t", group="offline")
    async def handle(event: Event) -> None:
        got.append(event.data)

    await stopped.start()
    await stopped.stop()
    publisher = EventBus(backend, publish_timeout=0.1)
    async with publisher:
        for n in range(10):
            await publisher.publish("d.t", n)  # would time out if the offline group blocked
    assert metrics.value("dotmac.events.dropped", {"messaging.consumer.group.name": "offline"}) == 7
    again = EventBus(backend, poll_interval=0.05)
    again.subscribe("d.t", handle, group="offline")
    async with again:
        await eventually(lambda: got == [7, 8, 9])  # the newest maxlen events were kept


async def test_a_claimed_entry_is_settled_only_by_its_claimer() -> None:
    """Once another consumer claims an idle entry, the first one can no longer ack or renew it."""
    clock = FakeClock()
    backend = MemoryBackend(claim_idle=10.0, clock=clock)
    gid = GroupId("g", "c.t")
    await backend.declare_group(gid)
    first, second = backend.consumer(gid, "first"), backend.consumer(gid, "second")
    assert backend.try_publish(Event("c.t", {"n": 1}))
    (taken,) = await first.fetch(10, 0.01)
    clock.advance(11.0)
    (claimed,) = await second.fetch(10, 0.01)
    assert (claimed.entry_id, claimed.attempt) == (taken.entry_id, 2)
    assert claimed.event is not None
    assert taken.event is not None
    claimed.event.data["n"] = 2
    assert taken.event.data == {"n": 1}  # each delivery decodes its own copy
    await first.record_failure(taken)
    await first.keepalive([taken])
    await first.ack([taken])  # ignored: second owns it now
    clock.advance(11.0)
    (again,) = await first.fetch(10, 0.01)  # still pending, and idle again: claimed back
    assert (again.entry_id, again.attempt) == (taken.entry_id, 3)
    await second.ack([claimed])  # ignored as well: first owns it again
    await first.ack([again])
    clock.advance(11.0)
    assert await second.fetch(10, 0.01) == []  # settled: nothing left to claim


async def test_single_publishes_are_counted_by_the_next_loop_turn() -> None:
    """publish() on memory adds its sent count in bulk one event-loop turn later, and on stop."""
    sent = "messaging.client.sent.messages"
    where = {"messaging.destination.name": "s.t"}
    before = metrics.value(sent, where)
    bus = EventBus(MemoryBackend())
    async with bus:
        for n in range(3):
            await bus.publish("s.t", n)
        await asyncio.sleep(0)
        assert metrics.value(sent, where) - before == 3
        await bus.publish("s.t", 3)
    assert metrics.value(sent, where) - before == 4  # stop() counts what is left
