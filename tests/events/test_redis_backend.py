"""Redis Streams specifics: trimming never drops what a declared group has not read."""

from __future__ import annotations

import asyncio

import pytest

from _support.waiting import eventually
from dotmac.communications.events import Event, EventBus, RedisStreamsBackend

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
