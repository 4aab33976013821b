"""Redis Streams event bus across OS processes: groups share work, a killed worker loses nothing.

Workers are separate Python processes running ``_worker.py``; they RPUSH what they handled onto a
Redis list, which the test reads back.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from _support.waiting import eventually
from dotmac.communications.events import Event, EventBus, RedisStreamsBackend

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WORKER = Path(__file__).with_name("_worker.py")


async def records(client: aioredis.Redis, key: str, phase: str = "done") -> list[dict[str, Any]]:
    """The records a worker pushed onto ``key`` for ``phase``."""
    rows = [json.loads(raw) for raw in await client.lrange(key, 0, -1)]
    return [row for row in rows if row["phase"] == phase]


class Workers:
    """Starts ``_worker.py`` processes and makes sure none outlives the test."""

    def __init__(self, url: str, client: aioredis.Redis, logs: Path) -> None:
        self.url = url
        self.client = client
        self.logs = logs
        self.processes: list[asyncio.subprocess.Process] = []

    async def spawn(
        self, *, group: str, pattern: str, results: str, label: str, **options: float
    ) -> asyncio.subprocess.Process:
        """Start a worker; ``options`` become ``--name value`` arguments (``exit_after=3``)."""
        args = [
            sys.executable, str(WORKER), "--url", self.url, "--group", group,
            "--pattern", pattern, "--results", results, "--label", label, "--lifetime", "40",
        ]  # fmt: skip
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        with (self.logs / f"{label}.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.processes.append(process)
        return process

    async def ready(self, results: str, count: int) -> None:
        """Wait until ``count`` workers reporting to ``results`` have declared their group."""

        async def check() -> bool:
            if any(p.returncode is not None for p in self.processes):
                pytest.fail(f"a worker exited early; see logs in {self.logs}")
            return await self.client.llen(f"{results}:ready") >= count

        await eventually(check, timeout=20, what=f"{count} workers ready on {results}")

    async def terminate(self, process: asyncio.subprocess.Process) -> int:
        """SIGTERM a worker and return its exit code (it drains and stops cleanly)."""
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            return await process.wait()

    async def close(self) -> None:
        """SIGKILL whatever still runs and reap it."""
        for process in self.processes:
            if process.returncode is None:
                process.kill()
            await process.wait()


@pytest.fixture
async def workers(redis_url: str, aredis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Workers]:
    """Worker processes on the test database; all are killed and reaped afterwards."""
    pool = Workers(redis_url, aredis, tmp_path)
    try:
        yield pool
    finally:
        await pool.close()


def publisher(url: str) -> EventBus:
    """A bus that only publishes."""
    return EventBus(RedisStreamsBackend(url), poll_interval=0.1)


async def test_each_group_handles_every_event_once_across_processes(
    redis_url: str, aredis: aioredis.Redis, workers: Workers
) -> None:
    """Two processes in one group split 300 events, each handled once; another group gets all."""
    billing_a = await workers.spawn(
        group="billing", pattern="orders.*", results="res:billing", label="a", sleep=0.002
    )
    billing_b = await workers.spawn(
        group="billing", pattern="orders.*", results="res:billing", label="b", sleep=0.002
    )
    audit = await workers.spawn(group="audit", pattern="orders.#", results="res:audit", label="c")
    await workers.ready("res:billing", 2)
    await workers.ready("res:audit", 1)

    published: list[Event] = []
    async with publisher(redis_url) as bus:
        for start in range(0, 300, 50):
            batch = [("orders.created", {"n": n}) for n in range(start, start + 50)]
            published += await bus.publish_many(batch)
            await asyncio.sleep(0.02)
    ids = {event.id for event in published}
    assert len(ids) == 300

    async def all_handled() -> bool:
        billing = await records(aredis, "res:billing")
        return len(billing) >= 300 and len(await records(aredis, "res:audit")) >= 300

    await eventually(all_handled, timeout=20, what="both groups handled 300 events")
    await asyncio.sleep(0.5)  # a duplicate delivery would show up now
    for process in (billing_a, billing_b, audit):
        assert await workers.terminate(process) == 0

    billing = await records(aredis, "res:billing")
    assert Counter(row["id"] for row in billing) == dict.fromkeys(ids, 1)
    assert {row["attempt"] for row in billing} == {1}
    assert {row["pid"] for row in billing} == {billing_a.pid, billing_b.pid}
    audited = await records(aredis, "res:audit")
    assert Counter(row["id"] for row in audited) == dict.fromkeys(ids, 1)
    assert {row["pid"] for row in audited} == {audit.pid}


async def test_events_of_a_killed_worker_are_claimed_by_another_process(
    redis_url: str, aredis: aioredis.Redis, workers: Workers
) -> None:
    """Events a SIGKILLed worker held are claimed after claim_idle and handled with attempt >= 2."""
    stuck = await workers.spawn(
        group="jobs", pattern="jobs.*", results="res:a", label="a", stall=30, claim_idle=1.0
    )
    await workers.ready("res:a", 1)
    async with publisher(redis_url) as bus:
        published = await bus.publish_many([("jobs.run", {"n": n}) for n in range(20)])
        assert isinstance(bus.backend, RedisStreamsBackend)
        stream = bus.backend.stream_key("jobs.run")
    ids = {event.id for event in published}

    async def holding_everything() -> bool:
        try:
            pending = await aredis.xpending(stream, "jobs|jobs.*")
        except ResponseError:  # NOGROUP: the worker has not discovered the topic yet
            return False
        return pending["pending"] == 20 and bool(await records(aredis, "res:a", "start"))

    await eventually(holding_everything, timeout=15, what="worker A holds all 20 events")
    stuck.kill()
    assert await stuck.wait() == -signal.SIGKILL

    rescuer = await workers.spawn(
        group="jobs", pattern="jobs.*", results="res:b", label="b", claim_idle=1.0
    )

    async def rescued() -> bool:
        return {row["id"] for row in await records(aredis, "res:b")} >= ids

    await eventually(rescued, timeout=20, what="worker B handled every event A held")
    assert await workers.terminate(rescuer) == 0

    done = await records(aredis, "res:b")
    assert {row["id"] for row in done} == ids
    assert all(row["attempt"] >= 2 for row in done), done
    assert {row["pid"] for row in done} == {rescuer.pid}
    assert await records(aredis, "res:a") == []  # A never finished one
    assert (await aredis.xpending(stream, "jobs|jobs.*"))["pending"] == 0


async def test_same_key_events_are_handled_in_order_and_never_concurrently(
    redis_url: str,
) -> None:
    """With concurrency=4 on Redis, events sharing a key run one at a time in publish order."""
    keys, per_key = 8, 25
    total = keys * per_key
    rng = random.Random(7)
    backend = RedisStreamsBackend(redis_url, claim_idle=1.0, discovery_interval=0.1)
    bus = EventBus(backend, poll_interval=0.1)
    active: set[str] = set()
    overlaps: list[str] = []
    seen: defaultdict[str, list[int]] = defaultdict(list)
    running = peak = 0
    finished = asyncio.Event()

    @bus.subscribe("orders.*", group="ordered", concurrency=4)
    async def handle(event: Event) -> None:
        nonlocal running, peak
        assert event.key is not None
        if event.key in active:
            overlaps.append(event.key)
        active.add(event.key)
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(rng.uniform(0, 0.004))
            seen[event.key].append(event.data["seq"])
        finally:
            active.discard(event.key)
            running -= 1
        if sum(map(len, seen.values())) == total:
            finished.set()

    items = [
        {"topic": "orders.updated", "data": {"seq": seq}, "key": f"k{k}"}
        for seq in range(per_key)
        for k in range(keys)
    ]
    async with bus:
        for start in range(0, total, 40):
            await bus.publish_many(items[start : start + 40])
        async with asyncio.timeout(20):
            await finished.wait()

    assert overlaps == []
    assert seen == {f"k{k}": list(range(per_key)) for k in range(keys)}
    assert peak > 1  # different keys did run side by side


def _key_order_problems(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[int]]]:
    """Per key: overlapping runs (a start before the previous done) and the order done."""
    running: dict[str, int] = {}
    overlaps: list[str] = []
    done: defaultdict[str, list[int]] = defaultdict(list)
    for row in rows:
        key = row["key"]
        if row["phase"] == "start":
            if key in running:
                overlaps.append(key)
            running[key] = row["pid"]
        else:
            running.pop(key, None)
            done[key].append(row["data"])
    return overlaps, done


async def test_same_key_order_holds_across_processes(
    redis_url: str, aredis: aioredis.Redis, workers: Workers
) -> None:
    """Three processes in one group: a key's events run one at a time, in publish order."""
    keys, per_key = 12, 20
    results = "results:lanes"
    for n in range(3):
        await workers.spawn(group="ordered", pattern="acct.*", results=results, label=f"w{n}",
                            concurrency=4, sleep=0.002, record_start=1)  # fmt: skip
    await workers.ready(results, 3)
    await asyncio.sleep(1.0)  # the lanes spread out between the three consumers
    bus = publisher(redis_url)
    items = [
        {"topic": "acct.tx", "data": seq, "key": f"k{k}"}
        for seq in range(per_key)
        for k in range(keys)
    ]
    async with bus:
        for start in range(0, len(items), 30):
            await bus.publish_many(items[start : start + 30])

    async def all_done() -> bool:
        return len(await records(aredis, results)) >= len(items)

    await eventually(all_done, timeout=30, what="every keyed event handled")
    rows = [json.loads(raw) for raw in await aredis.lrange(results, 0, -1)]
    overlaps, done = _key_order_problems(rows)
    assert overlaps == []
    assert done == {f"k{k}": list(range(per_key)) for k in range(keys)}
    assert len({row["pid"] for row in rows}) > 1  # the lanes were shared, not all on one


async def test_a_killed_workers_lanes_are_taken_over_in_order(
    redis_url: str, aredis: aioredis.Redis, workers: Workers
) -> None:
    """A lane holder killed mid-event is replaced after its lease lapses, order intact."""
    results = "results:takeover"
    first = await workers.spawn(group="g", pattern="acct.*", results=results, label="first",
                                stall=30, claim_idle=1.0)  # fmt: skip
    await workers.ready(results, 1)
    bus = publisher(redis_url)
    async with bus:
        await bus.publish_many([{"topic": "acct.tx", "data": n, "key": "only"} for n in range(5)])

    async def started() -> bool:
        return len(await records(aredis, results, "start")) >= 1

    await eventually(started, timeout=10, what="the first worker started an event")
    first.kill()
    await first.wait()
    await workers.spawn(group="g", pattern="acct.*", results=results, label="second",
                        claim_idle=1.0)  # fmt: skip

    async def all_done() -> bool:
        return len(await records(aredis, results)) >= 5

    await eventually(all_done, timeout=20, what="the second worker finished the key")
    done = await records(aredis, results)
    assert [row["data"] for row in done] == [0, 1, 2, 3, 4]
    assert {row["label"] for row in done} == {"second"}
    assert done[0]["attempt"] >= 2  # the one the first worker was handling when it died
