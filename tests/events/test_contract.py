"""The event bus contract, written once, run on the memory backend and on Redis Streams."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from _support.waiting import eventually
from dotmac.communications.errors import (
    ConfigurationError,
    EventError,
    EventSerializationError,
    EventTooLargeError,
    InvalidPatternError,
    InvalidTopicError,
    PermanentDeliveryError,
)
from dotmac.communications.events import (
    Event,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    idempotent,
)
from dotmac.communications.observability import metrics, tracing
from dotmac.communications.resilience import RetryPolicy
from dotmac.communications.testing import FakeClock


async def test_publish_and_handle(make_bus) -> None:
    """A subscriber receives the event with every attribute, attempt 1, once."""
    bus = make_bus()
    got: list[Event] = []

    @bus.subscribe("orders.created", group="billing")
    async def handle(event: Event) -> None:
        got.append(event)

    async with bus:
        sent = await bus.publish(
            "orders.created", {"id": 7}, key="cust-1", headers={"h": "v"}, tenant_id="t1",
            subject="order/7", correlation_id="corr", causation_id="cause",
        )  # fmt: skip
        await eventually(lambda: len(got) == 1)
    (event,) = got
    assert event.id == sent.id
    assert event.data == {"id": 7}
    assert (event.key, event.tenant_id, event.subject) == ("cust-1", "t1", "order/7")
    assert (event.correlation_id, event.causation_id) == ("corr", "cause")
    assert event.headers == {"h": "v"}
    assert event.attempt == 1
    assert event.time == sent.time


async def test_every_group_gets_every_event_and_each_once_per_group(make_bus) -> None:
    """Two consumers in one group split the events; another group gets them all."""
    handled: dict[str, list[str]] = defaultdict(list)
    buses = [make_bus(), make_bus(), make_bus()]
    for bus, group in zip(buses, ["a", "a", "b"], strict=True):

        async def handle(event: Event, group: str = group) -> None:
            handled[group].append(event.id)

        bus.subscribe("orders.*", handle, group=group)
    for bus in buses:
        await bus.start()
    ids = {(await buses[0].publish("orders.created", {"n": n})).id for n in range(40)}
    await eventually(lambda: len(handled["a"]) >= 40 and len(handled["b"]) >= 40)
    await asyncio.sleep(0.1)  # a duplicate would show up now
    assert sorted(handled["a"]) == sorted(ids)
    assert sorted(handled["b"]) == sorted(ids)


async def test_patterns_route_events(make_bus) -> None:
    """'*' matches one segment, '#' the rest; non-matching topics are not delivered."""
    bus = make_bus()
    seen: dict[str, set[str]] = defaultdict(set)
    for pattern, group in [("orders.*", "one"), ("orders.#", "rest"), ("*.paid", "paid")]:

        async def handle(event: Event, group: str = group) -> None:
            seen[group].add(event.type)

        bus.subscribe(pattern, handle, group=group)
    async with bus:
        for topic in ["orders.created", "orders.paid", "orders.eu.paid", "users.paid", "other"]:
            await bus.publish(topic)
        await eventually(lambda: sum(map(len, seen.values())) == 7)
    assert seen["one"] == {"orders.created", "orders.paid"}
    assert seen["rest"] == {"orders.created", "orders.paid", "orders.eu.paid"}
    assert seen["paid"] == {"orders.paid", "users.paid"}


async def test_topic_first_published_after_start_is_delivered(make_bus) -> None:
    """A consumer picks up topics that appear after it started."""
    bus = make_bus()
    got: list[str] = []
    bus.subscribe("late.#", lambda_handler(got), group="g")
    async with bus:
        await asyncio.sleep(0.1)
        await bus.publish("late.topic.appears", 1)
        await eventually(lambda: got == ["late.topic.appears"])


def lambda_handler(sink: list[str]):
    async def handle(event: Event) -> None:
        sink.append(event.type)

    return handle


async def test_failing_handler_is_retried_with_growing_attempt(make_bus) -> None:
    """A raising handler runs again, attempt 1, 2, 3, until it succeeds; then it is acked."""
    clock = FakeClock()
    bus = make_bus(clock=clock, max_attempts=5)
    attempts: list[int] = []

    @bus.subscribe("jobs.run", group="workers")
    async def handle(event: Event) -> None:
        attempts.append(event.attempt)
        if event.attempt < 3:
            raise RuntimeError("not yet")

    async with bus:
        await bus.publish("jobs.run", {"x": 1})
        await eventually(lambda: attempts == [1, 2, 3])
        await asyncio.sleep(0.1)
    assert attempts == [1, 2, 3]
    assert await bus.dead_letters.list() == []
    assert clock.sleeps  # the backoff went through the injected clock


async def test_backoff_does_not_block_other_events(make_bus) -> None:
    """Events published after a failing one are handled while it waits for its retry."""
    bus = make_bus()
    order: list[str] = []
    policy = RetryPolicy(max_attempts=3, initial_delay=0.4, max_delay=0.4, jitter=False,
                         retry_on=lambda exc: True)  # fmt: skip

    @bus.subscribe("work.*", group="g", retry=policy)
    async def handle(event: Event) -> None:
        order.append(f"{event.data}:{event.attempt}")
        if event.data == "slow" and event.attempt == 1:
            raise RuntimeError("first try fails")

    async with bus:
        await bus.publish("work.item", "slow")
        for n in range(5):
            await bus.publish("work.item", f"fast{n}")
        await eventually(lambda: "slow:2" in order)
    assert order.index("slow:2") > max(order.index(f"fast{n}:1") for n in range(5))


async def test_exhausted_event_goes_to_dead_letters_and_replays_to_its_group_only(
    make_bus,
) -> None:
    """After max_attempts the event is dead-lettered; replay re-delivers it to that group only."""
    bus = make_bus(clock=FakeClock(), max_attempts=3)
    good: list[int] = []
    bad: list[int] = []
    fail = True

    @bus.subscribe("pay.*", group="good")
    async def ok(event: Event) -> None:
        good.append(event.attempt)

    @bus.subscribe("pay.*", group="bad")
    async def broken(event: Event) -> None:
        bad.append(event.attempt)
        if fail:
            raise ValueError("card declined")

    async with bus:
        sent = await bus.publish("pay.card", {"amount": 5})
        await eventually(lambda: len(bad) == 3 and len(good) == 1)
        letters = await eventually_letters(bus, 1)
        (letter,) = letters
        assert (letter.group, letter.pattern, letter.topic) == ("bad", "pay.*", "pay.card")
        assert letter.attempts == 3
        assert "ValueError: card declined" in letter.error
        assert letter.event is not None
        assert letter.event.id == sent.id
        assert await bus.dead_letters.list(group="good") == []
        fail = False
        assert await bus.dead_letters.replay([letter.id]) == 1
        await eventually(lambda: len(bad) == 4)
        await asyncio.sleep(0.2)
        assert bad[-1] == 1  # a replay starts counting again
        assert good == [1]  # the healthy group did not see it twice
        assert await bus.dead_letters.list() == []


async def eventually_letters(bus, count: int):
    box: list = []

    async def poll() -> None:
        while True:
            box[:] = await bus.dead_letters.list()
            if len(box) >= count:
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), 5)
    return list(box)


async def test_purge_removes_dead_letters(make_bus) -> None:
    """purge() deletes dead letters for good."""
    bus = make_bus(clock=FakeClock(), max_attempts=1)

    @bus.subscribe("x.*", group="g")
    async def broken(event: Event) -> None:
        raise RuntimeError("no")

    async with bus:
        await bus.publish("x.a")
        await bus.publish("x.b")
        await eventually_letters(bus, 2)
        assert await bus.dead_letters.purge(topic="x.a") == 1
        remaining = await bus.dead_letters.list()
        assert [d.topic for d in remaining] == ["x.b"]
        assert await bus.dead_letters.purge() == 1
        assert await bus.dead_letters.list() == []


async def test_permanent_errors_are_not_retried(make_bus) -> None:
    """A library error marked permanent goes straight to the dead letters."""
    bus = make_bus(clock=FakeClock(), max_attempts=5)
    calls: list[int] = []

    @bus.subscribe("mail.send", group="g")
    async def handle(event: Event) -> None:
        calls.append(event.attempt)
        raise PermanentDeliveryError("mailbox does not exist")

    async with bus:
        await bus.publish("mail.send")
        (letter,) = await eventually_letters(bus, 1)
    assert calls == [1]
    assert letter.attempts == 1


class Order(BaseModel):
    id: int
    total: float


async def test_model_validates_data_before_the_handler(make_bus) -> None:
    """Valid data reaches the handler as the model; invalid data is dead-lettered, no retries."""
    bus = make_bus(clock=FakeClock())
    got: list[object] = []

    @bus.subscribe("orders.created", group="g", model=Order)
    async def handle(event: Event) -> None:
        got.append(event.data)

    async with bus:
        await bus.publish("orders.created", {"id": "x", "total": 1})
        await bus.publish("orders.created", Order(id=2, total=3.5))
        await eventually(lambda: len(got) == 1)
        (letter,) = await eventually_letters(bus, 1)
    assert got == [Order(id=2, total=3.5)]
    assert letter.attempts == 1
    assert "does not match Order" in letter.error


async def test_same_key_is_handled_in_order_and_never_concurrently(make_bus) -> None:
    """With concurrency > 1, events sharing a key keep publish order and never overlap."""
    bus = make_bus()
    active: dict[str, int] = defaultdict(int)
    overlaps: list[str] = []
    seen: dict[str, list[int]] = defaultdict(list)
    rng = random.Random(7)

    @bus.subscribe("acct.*", group="g", concurrency=4)
    async def handle(event: Event) -> None:
        key = event.key or ""
        active[key] += 1
        if active[key] > 1:
            overlaps.append(key)
        await asyncio.sleep(rng.random() / 500)
        seen[key].append(event.data)
        active[key] -= 1

    async with bus:
        await bus.publish_many(
            [{"topic": "acct.tx", "data": n, "key": f"k{n % 3}"} for n in range(60)]
        )
        await eventually(lambda: sum(map(len, seen.values())) == 60)
    assert overlaps == []
    for k in range(3):
        assert seen[f"k{k}"] == [n for n in range(60) if n % 3 == k]


async def test_unacknowledged_event_is_claimed_by_another_consumer(make_bus) -> None:
    """An event whose consumer stopped mid-handling is handled by another after claim_idle."""
    first = make_bus(claim_idle=0.5, shutdown_timeout=0.1)
    stuck = asyncio.Event()

    @first.subscribe("jobs.*", group="g")
    async def hang(event: Event) -> None:
        stuck.set()
        await asyncio.sleep(3600)

    second = make_bus(claim_idle=0.5)
    got: list[int] = []

    @second.subscribe("jobs.*", group="g")
    async def finish(event: Event) -> None:
        got.append(event.attempt)

    await first.start()
    await first.publish("jobs.long")
    await asyncio.wait_for(stuck.wait(), 5)
    await first.stop()  # the handler is cancelled: nothing acknowledged
    await second.start()
    await eventually(lambda: got == [2], timeout=10)


async def test_bad_input_raises_at_the_call_and_writes_nothing(make_bus) -> None:
    """Bad topics, data, sizes and argument types fail at publish; nothing reaches a handler."""
    bus = make_bus(max_event_bytes=64)
    got: list[object] = []

    @bus.subscribe("#", group="g")
    async def handle(event: Event) -> None:
        got.append(event.data)

    async with bus:
        with pytest.raises(InvalidTopicError):
            await bus.publish("", 1)
        with pytest.raises(InvalidTopicError):
            await bus.publish("orders..created", 1)
        with pytest.raises(InvalidTopicError):
            await bus.publish("orders.*", 1)
        with pytest.raises(EventSerializationError):
            await bus.publish("a.b", {"when": object()})
        with pytest.raises(EventTooLargeError):
            await bus.publish("a.b", "x" * 100)
        with pytest.raises(EventError, match="key"):
            await bus.publish("a.b", 1, key=5)  # type: ignore[arg-type]
        with pytest.raises(EventError, match="headers"):
            await bus.publish("a.b", 1, headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(EventError, match="item 1"):
            await bus.publish_many([("a.b", 1), ("a.b", object()), ("a.b", 3)])
        with pytest.raises(EventError, match="item 0"):
            await bus.publish_many([{"topic": "a.b", "nope": 1}])
        await bus.publish("a.b", "ok")
        await eventually(lambda: got == ["ok"])
        await asyncio.sleep(0.1)
    assert got == ["ok"]


async def test_invalid_subscriptions_are_refused(make_bus) -> None:
    """Bad patterns, sync handlers and bad options fail at subscribe."""
    bus = make_bus()

    async def ok(event: Event) -> None: ...

    def sync(event: Event) -> None: ...

    with pytest.raises(InvalidPatternError):
        bus.subscribe("a.#.b", ok, group="g")
    with pytest.raises(ConfigurationError, match="async def"):
        bus.subscribe("a", sync, group="g")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="group"):
        bus.subscribe("a", ok, group="x|y")
    with pytest.raises(ConfigurationError, match="concurrency"):
        bus.subscribe("a", ok, group="g", concurrency=0)
    with pytest.raises(ConfigurationError, match="model"):
        bus.subscribe("a", ok, group="g", model=dict)  # type: ignore[arg-type]
    assert bus.subscriptions == ()


async def test_idempotent_handler_runs_once_per_event_id(make_bus, backend_kind, request) -> None:
    """A redelivered event id is skipped; a failed attempt releases the key so the retry runs."""
    if backend_kind == "redis":
        store = RedisIdempotencyStore(request.getfixturevalue("redis_url"))
    else:
        store = MemoryIdempotencyStore()
    bus = make_bus(clock=FakeClock())
    runs: list[tuple[str, int]] = []

    @bus.subscribe("pay.*", group="g")
    @idempotent(store, ttl=60)
    async def handle(event: Event) -> None:
        runs.append((event.id, event.attempt))
        if event.data == "flaky" and event.attempt == 1:
            raise RuntimeError("transient")

    async with bus:
        once = await bus.publish("pay.a", "x")
        await bus.publish(once)  # the same event (same id) published again
        await bus.publish("pay.b", "flaky")
        await eventually(lambda: len(runs) == 3)
        await asyncio.sleep(0.2)
    assert [r for r in runs if r[0] == once.id] == [(once.id, 1)]
    assert [a for _, a in runs[1:]] == [1, 2]
    if isinstance(store, RedisIdempotencyStore):
        await store.aclose()


async def test_consumer_span_continues_the_publisher_trace(make_bus) -> None:
    """The process span is a child of the send span, across the backend hop."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    try:
        bus = make_bus()
        done = asyncio.Event()

        @bus.subscribe("orders.*", group="billing")
        async def handle(event: Event) -> None:
            done.set()

        async with bus:
            await bus.publish("orders.created", 1)
            await asyncio.wait_for(done.wait(), 5)
        spans = {s.name: s for s in exporter.get_finished_spans()}
    finally:
        tracing.use_tracer_provider(None)
    send, process = spans["send orders.created"], spans["process orders.created"]
    assert process.context.trace_id == send.context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == send.context.span_id
    assert process.attributes["messaging.consumer.group.name"] == "billing"
    assert process.attributes["messaging.operation.type"] == "process"
    assert send.attributes["messaging.system"] in {"memory", "redis"}


async def test_metrics_count_sent_and_consumed(make_bus) -> None:
    """OTel messaging counters count every published and consumed event."""
    bus = make_bus()
    got: list[int] = []
    bus.subscribe("m.t", lambda_counter(got), group="g")
    async with bus:
        await bus.publish_many([("m.t", n) for n in range(5)])
        await bus.publish("m.t", 5)
        await eventually(lambda: len(got) == 6)
    where = {"messaging.destination.name": "m.t"}
    assert metrics.value("messaging.client.sent.messages", where) == 6
    assert metrics.value("messaging.client.consumed.messages", where) == 6
    assert metrics.value("messaging.process.duration", where) == 6
    # Only a broker round trip is a client operation (none on the memory backend).
    expected_operations = 0 if bus.backend.system == "memory" else 2
    assert metrics.value("messaging.client.operation.duration", where) == expected_operations


def lambda_counter(sink: list[int]):
    async def handle(event: Event) -> None:
        sink.append(event.data)

    return handle


async def test_health_check_passes_when_running(make_bus) -> None:
    """health_check() reports pass while the backend answers."""
    bus = make_bus()
    async with bus:
        assert (await bus.health_check()).status == "pass"


async def test_run_consumes_until_cancelled(make_bus) -> None:
    """bus.run() serves until its task is cancelled, then stops cleanly."""
    bus = make_bus()
    got: list[int] = []
    bus.subscribe("r.t", lambda_counter(got), group="g")
    task = asyncio.create_task(bus.run())
    await asyncio.sleep(0.1)
    await bus.publish("r.t", 1)
    await eventually(lambda: got == [1])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_subscribing_after_start_takes_effect(make_bus) -> None:
    """A subscription added to a running bus starts consuming."""
    bus = make_bus()
    got: list[int] = []
    async with bus:
        bus.subscribe("s.t", lambda_counter(got), group="late")
        await bus.ready()
        await bus.publish("s.t", 1)
        await eventually(lambda: got == [1])


async def test_the_same_handler_subscribed_twice_runs_two_consumers(make_bus) -> None:
    """Two identical subscriptions are two consumers of one group, both stopped with the bus."""
    bus = make_bus()
    got: list[int] = []
    handler = lambda_counter(got)
    first = bus.subscribe("twice.t", handler, group="g")
    second = bus.subscribe("twice.t", handler, group="g")
    assert first is not second
    assert first != second
    async with bus:
        await bus.publish_many([("twice.t", n) for n in range(20)])
        await eventually(lambda: len(got) == 20)
    await asyncio.sleep(0.05)
    assert sorted(got) == list(range(20))  # each once: they share the group
    assert not [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("events-")]


async def test_dead_letters_can_be_switched_off(make_bus) -> None:
    """With dead_letters=False an exhausted event is logged, counted and acknowledged."""
    bus = make_bus(clock=FakeClock(), max_attempts=2, dead_letters=False)
    calls: list[int] = []

    @bus.subscribe("off.t", group="g")
    async def broken(event: Event) -> None:
        calls.append(event.attempt)
        raise RuntimeError("no")

    async with bus:
        await bus.publish("off.t")
        await eventually(lambda: calls == [1, 2])
        await eventually(lambda: metrics.value("dotmac.events.dropped") == 1)
        assert await bus.dead_letters.list() == []


async def test_a_key_waiting_for_its_retry_does_not_hold_up_other_keys(make_bus) -> None:
    """Events parked behind a retrying key do not fill max_in_flight for everyone else."""
    bus = make_bus()
    order: list[str] = []
    policy = RetryPolicy(max_attempts=2, initial_delay=0.6, max_delay=0.6, jitter=False,
                         retry_on=lambda exc: True)  # fmt: skip

    @bus.subscribe("hol.*", group="g", retry=policy, max_in_flight=4)
    async def handle(event: Event) -> None:
        order.append(f"{event.key}:{event.data}:{event.attempt}")
        if event.key == "stuck" and event.data == 0 and event.attempt == 1:
            raise RuntimeError("retry me later")

    async with bus:
        await bus.publish_many([{"topic": "hol.t", "data": n, "key": "stuck"} for n in range(6)])
        await bus.publish_many([{"topic": "hol.t", "data": n, "key": f"free{n}"} for n in range(6)])
        await eventually(lambda: len(order) == 13)
    retry_at = order.index("stuck:0:2")
    assert all(order.index(f"free{n}:{n}:1") < retry_at for n in range(6))
    assert [o for o in order if o.startswith("stuck")] == [
        "stuck:0:1", "stuck:0:2", *(f"stuck:{n}:1" for n in range(1, 6))
    ]  # fmt: skip
