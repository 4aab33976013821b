"""Event throughput and publish→handler latency of ``EventBus`` beside the raw limit and peers.

Memory: a bare ``asyncio.Queue`` producer/consumer (the limit), ``EventBus`` on ``MemoryBackend``
(``publish`` and ``publish_many``) and broadcaster's memory backend. Redis: pipelined ``XADD`` with
``XREADGROUP COUNT 100`` + ``XACK`` in redis-py (the limit), ``EventBus`` on
``RedisStreamsBackend`` (``publish_many`` of 100) and FastStream's Redis stream subscriber
(per message and ``batch=True``). Peers that are not installed are reported as such.

Every system runs producer and consumer in this one event loop, publishes the same small dict and
runs the same handler (count it, record its latency). Throughput is events published and handled,
timed from the first publish to the last handler call, median over the rounds. Latency is
``time.perf_counter()`` taken just before publishing (carried in the payload) to the handler call,
at a steady moderate rate; p50/p99 are over every round's samples.

Redis: a throwaway ``redis-server`` on a free loopback port (no persistence) unless
``DOTMAC_BENCH_REDIS_URL`` names one; its database is FLUSHDB'd before every run.

    python benchmarks/bench_events.py            # ~3 min
    python benchmarks/bench_events.py --quick    # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from _redis_server import bench_redis, server_version

from dotmac.communications.events import Event, EventBus, MemoryBackend, RedisStreamsBackend

TOPIC = "bench.created"
RAW_STREAM = "bench:raw"
FS_STREAM = "bench:faststream"
GROUP = "bench"
BATCH = 100  # publish_many / pipeline size, and XREADGROUP COUNT
MAXLEN = 100_000  # XADD MAXLEN ~, as RedisStreamsBackend's default
QUEUE_BOUND = 10_000  # the raw queue is bounded like MemoryBackend(maxlen=10_000)
WARM = 200  # events handled before timing starts (creates streams, groups, connections)
WAIT = 60.0  # longest wait for one run's handlers
LAT_RATE = 1_000.0  # events/s during the latency runs
MEMORY_SCALE = 5.0  # memory runs handle 5x --events: the raw queue would otherwise last ~40 ms
SLOW_SCALE = 0.25  # FastStream per message handles --events / 4 (~2k events/s: ~2.5 s a run)

Send = Callable[[Any], Awaitable[object]]


# ------------------------------------------------------------------------------- the handler
def payload(n: int) -> dict[str, Any]:
    return {"n": n, "t": time.perf_counter(), "kind": "bench", "ok": True}


class Sink:
    """What every handler does: count the event and record its publish→handler latency."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.last = 0.0
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    def hit(self, data: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.latencies.append(now - data["t"])
        self.count += 1
        if self.count >= self.expected:
            self.last = now
            self.done.set()

    async def wait(self) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), WAIT)
        except TimeoutError:
            raise RuntimeError(f"handled {self.count}/{self.expected} events in {WAIT}s") from None


# ------------------------------------------------------------------------------- the systems
@dataclass(frozen=True)
class System:
    backend: str  # "memory" or "redis"
    name: str
    batched: bool  # send() takes a list of BATCH payloads, else one payload
    run: Callable[[Sink, str], contextlib.AbstractAsyncContextManager[Send]]
    raw: bool = False
    scale: float = 1.0  # events per throughput run = --events * scale (a run lasts ~0.2-3 s)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def raw_queue(sink: Sink, _url: str) -> AsyncIterator[Send]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_BOUND)

    async def consume() -> None:
        while True:  # ends by cancellation
            sink.hit(await queue.get())

    task = asyncio.create_task(consume())
    try:
        yield queue.put
    finally:
        await _cancel(task)


def _bus_handler(sink: Sink) -> Callable[[Event], Awaitable[None]]:
    async def handle(event: Event) -> None:
        sink.hit(event.data)

    return handle


@contextlib.asynccontextmanager
async def dotmac_memory_one(sink: Sink, _url: str) -> AsyncIterator[Send]:
    bus = EventBus(MemoryBackend())
    bus.subscribe(TOPIC, _bus_handler(sink), group=GROUP)
    async with bus:
        yield lambda data: bus.publish(TOPIC, data)


@contextlib.asynccontextmanager
async def dotmac_memory_many(sink: Sink, _url: str) -> AsyncIterator[Send]:
    bus = EventBus(MemoryBackend())
    bus.subscribe(TOPIC, _bus_handler(sink), group=GROUP)
    async with bus:
        yield lambda batch: bus.publish_many([(TOPIC, data) for data in batch])


@contextlib.asynccontextmanager
async def broadcaster_memory(sink: Sink, _url: str) -> AsyncIterator[Send]:
    from broadcaster import Broadcast

    ready = asyncio.Event()
    async with Broadcast("memory://") as broadcast:

        async def consume() -> None:
            async with broadcast.subscribe(TOPIC) as subscriber:
                ready.set()
                while True:  # ends by cancellation
                    sink.hit((await subscriber.get()).message)

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(ready.wait(), 5)
            yield lambda data: broadcast.publish(TOPIC, data)
        finally:
            await _cancel(task)


@contextlib.asynccontextmanager
async def raw_redis(sink: Sink, url: str) -> AsyncIterator[Send]:
    client = aioredis.Redis.from_url(url)
    await client.xgroup_create(RAW_STREAM, GROUP, id="$", mkstream=True)

    async def consume() -> None:
        while True:  # ends by cancellation
            reply = await client.xreadgroup(GROUP, "c1", {RAW_STREAM: ">"}, count=BATCH, block=1000)
            for _stream, entries in reply or ():
                ids = []
                for entry_id, fields in entries:
                    sink.hit(orjson.loads(fields[b"e"]))
                    ids.append(entry_id)
                await client.xack(RAW_STREAM, GROUP, *ids)

    async def send(batch: list[dict[str, Any]]) -> None:
        pipe = client.pipeline(transaction=False)
        for data in batch:
            pipe.xadd(RAW_STREAM, {"e": orjson.dumps(data)}, maxlen=MAXLEN, approximate=True)
        await pipe.execute()

    task = asyncio.create_task(consume())
    try:
        yield send
    finally:
        await _cancel(task)
        await client.aclose()


@contextlib.asynccontextmanager
async def dotmac_redis_many(sink: Sink, url: str) -> AsyncIterator[Send]:
    bus = EventBus(RedisStreamsBackend(url))
    bus.subscribe(TOPIC, _bus_handler(sink), group=GROUP)
    async with bus:
        yield lambda batch: bus.publish_many([(TOPIC, data) for data in batch])


def _faststream(batch: bool) -> Callable[[Sink, str], contextlib.AbstractAsyncContextManager[Send]]:
    @contextlib.asynccontextmanager
    async def run(sink: Sink, url: str) -> AsyncIterator[Send]:
        from faststream.redis import RedisBroker, StreamSub

        # logger=None: no access log line per message (dotmac logs none either).
        broker = RedisBroker(url, logger=None)
        sub = StreamSub(FS_STREAM, group=GROUP, consumer="c1", max_records=BATCH, batch=batch)
        if batch:

            @broker.subscriber(stream=sub)
            async def handle_batch(messages: list[dict[str, Any]]) -> None:
                for data in messages:
                    sink.hit(data)

        else:

            @broker.subscriber(stream=sub)
            async def handle(data: dict[str, Any]) -> None:
                sink.hit(data)

        await broker.start()
        try:
            client = await broker.connect()

            async def send(items: list[dict[str, Any]]) -> None:
                pipe = client.pipeline(transaction=False)
                for data in items:
                    await broker.publish(data, stream=FS_STREAM, pipeline=pipe)
                await pipe.execute()

            yield send
        finally:
            await broker.stop()

    return run


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


MEMORY = [
    System("memory", "raw asyncio.Queue", False, raw_queue, raw=True, scale=MEMORY_SCALE),
    System("memory", "dotmac memory (publish)", False, dotmac_memory_one, scale=MEMORY_SCALE),
    System(
        "memory",
        f"dotmac memory (publish_many {BATCH})",
        True,
        dotmac_memory_many,
        scale=MEMORY_SCALE,
    ),
    System("memory", "broadcaster memory", False, broadcaster_memory, scale=MEMORY_SCALE),
]
REDIS = [
    System("redis", f"raw XADD pipe {BATCH} + XREADGROUP/XACK", True, raw_redis, raw=True),
    System("redis", f"dotmac redis (publish_many {BATCH})", True, dotmac_redis_many),
    System(
        "redis",
        "FastStream stream sub (per message)",
        True,
        _faststream(batch=False),
        scale=SLOW_SCALE,
    ),
    System("redis", "FastStream stream sub (batch=True)", True, _faststream(batch=True)),
]
NEEDS = {"broadcaster memory": "broadcaster", "FastStream": "faststream.redis"}


def _missing(system: System) -> str | None:
    for prefix, module in NEEDS.items():
        if system.name.startswith(prefix) and not _installed(module):
            return module.split(".")[0]
    return None


# ------------------------------------------------------------------------------------- runs
async def _send_range(system: System, send: Send, start: int, stop: int) -> None:
    if system.batched:
        for first in range(start, stop, BATCH):
            await send([payload(n) for n in range(first, min(stop, first + BATCH))])
    else:
        for n in range(start, stop):
            await send(payload(n))


async def _prepared(system: System, sink: Sink, send: Send) -> None:
    sink.reset(WARM)
    await _send_range(system, send, 0, WARM)
    await sink.wait()


async def throughput(system: System, url: str, events: int) -> float:
    sink = Sink()
    async with system.run(sink, url) as send:
        await _prepared(system, sink, send)
        sink.reset(events)
        start = time.perf_counter()
        await _send_range(system, send, 0, events)
        await sink.wait()
        return events / (sink.last - start)


async def latency(system: System, url: str, samples: int) -> list[float]:
    """Publish ``samples`` events at LAT_RATE/s (what is due in one call when batched)."""
    sink = Sink()
    async with system.run(sink, url) as send:
        await _prepared(system, sink, send)
        sink.reset(samples)
        start = time.perf_counter()
        deadline = start + samples / LAT_RATE + WAIT
        sent = 0
        while sent < samples and time.perf_counter() < deadline:
            due = min(samples, int((time.perf_counter() - start) * LAT_RATE) + 1)
            if due > sent:
                await _send_range(system, send, sent, due)  # batched: what is due, in one call
                sent = due
            await asyncio.sleep(0.0005)
        await sink.wait()
        return sink.latencies


@dataclass
class Result:
    system: System
    rates: list[float]
    latencies: list[float]
    error: str | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _flush(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


async def measure(systems: list[System], url: str, args: argparse.Namespace) -> dict[str, Result]:
    results = {s.name: Result(s, [], []) for s in systems}
    for missing in systems:
        module = _missing(missing)
        if module:
            results[missing.name].error = f"{module} not installed"
    for _ in range(args.rounds):  # rounds interleave the systems, so drift hits all alike
        for system in systems:
            result = results[system.name]
            if result.error:
                continue
            try:
                if system.backend == "redis":
                    await _flush(url)
                events = max(1, round(args.events * system.scale))
                result.rates.append(await throughput(system, url, events))
                if system.backend == "redis":
                    await _flush(url)
                result.latencies += await latency(system, url, args.samples)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"[:60]
    return results


# ------------------------------------------------------------------------------------ redis
# ------------------------------------------------------------------------------------ report
def _report(results: dict[str, Result]) -> None:
    print(
        f"{'backend':<7} {'system':<38} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'vs raw':>7}"
    )
    raw: dict[str, float] = {}
    for result in results.values():
        system = result.system
        if result.error:
            print(f"{system.backend:<7} {system.name:<38} {'n/a: ' + result.error}")
            continue
        if system.raw:
            raw[system.backend] = result.rate
        base = raw.get(system.backend, float("nan"))
        print(
            f"{system.backend:<7} {system.name:<38} {result.rate:>10,.0f} "
            f"{result.percentile(0.50):>8.3f} {result.percentile(0.99):>8.3f} "
            f"{result.rate / base:>7.2f}"
        )


def _goals(results: dict[str, Result]) -> None:
    def rate(name: str) -> float | None:
        result = results.get(name)
        return None if result is None or result.error or not result.rates else result.rate

    many = f"dotmac redis (publish_many {BATCH})"
    goals = [
        ("dotmac memory (publish)", "raw asyncio.Queue", 0.35, "raw"),
        (f"dotmac memory (publish_many {BATCH})", "raw asyncio.Queue", 0.35, "raw"),
        (many, REDIS[0].name, 0.70, "raw"),
        (many, "FastStream stream sub (per message)", 10.0, "FastStream per message"),
        (many, "FastStream stream sub (batch=True)", 1.3, "FastStream batch=True"),
    ]
    print("\ngoals (ratios of median events/s):")
    for ours, theirs, target, short in goals:
        a, b = rate(ours), rate(theirs)
        ratio = "n/a" if a is None or b is None else f"{a / b:.2f}"
        verdict = (
            "NOT MEASURED" if a is None or b is None else ("MET" if a / b >= target else "NOT MET")
        )
        print(f"  {ours} / {theirs} = {ratio}; goal: ≥ {target:g} × {short} → {verdict}")  # noqa: RUF001


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument("--events", type=int, help="events per throughput run")
    parser.add_argument("--rounds", type=int, help="rounds (medians are over these)")
    parser.add_argument("--samples", type=int, help="latency samples per run")
    args = parser.parse_args()
    args.events = args.events or (5_000 if args.quick else 20_000)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.samples = args.samples or (300 if args.quick else 1_000)
    if min(args.events, args.rounds, args.samples) < 1:
        parser.error("--events, --rounds and --samples must be >= 1")

    began = time.perf_counter()
    results = await measure(MEMORY, "", args)
    with bench_redis() as found:
        url = found[0] if found else None
        version = server_version(url) if url else "none"
        if url:
            results |= await measure(REDIS, url, args)
    print(
        f"python {platform.python_version()}, redis-server {version}; median events/s of "
        f"{args.rounds} rounds of {args.events * MEMORY_SCALE:,.0f} (memory), "
        f"{args.events:,} (redis), {args.events * SLOW_SCALE:,.0f} (FastStream per message) "
        f"events;\nlatency at {LAT_RATE:,.0f} events/s, p50/p99 of {args.samples:,} samples x "
        f"{args.rounds} rounds"
    )
    if not url:
        print("(no redis-server found and DOTMAC_BENCH_REDIS_URL unset: Redis rows skipped)")
    _report(results)
    _goals(results)
    print(f"\n({time.perf_counter() - began:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
