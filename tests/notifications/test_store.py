"""The notification store contract, written once, run on MemoryStore and on RedisStore."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from hashlib import sha1
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from dotmac.communications.errors import (
    BackendUnavailableError,
    ConfigurationError,
    NotificationError,
)
from dotmac.communications.notifications import (
    Attachment,
    DeliveryResult,
    DeliveryStatus,
    Notification,
    NotificationResult,
    NotificationStatus,
)
from dotmac.communications.notifications._store import (
    NotificationDeadLetter,
    NotificationStore,
    StatusEntry,
)
from dotmac.communications.notifications._store_memory import MemoryStore
from dotmac.communications.notifications._store_redis import SCRIPTS, RedisStore
from dotmac.communications.testing import FakeClock

StoreFactory = Callable[..., NotificationStore]
TAGGED = re.compile(r"^\{[^{}]+\}")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_store(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[StoreFactory]:
    """Build stores of the kind under test, all on the test's FakeClock."""
    made: list[NotificationStore] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    def factory(**kwargs: Any) -> NotificationStore:
        kwargs.setdefault("clock", clock)
        store: NotificationStore = (
            MemoryStore(**kwargs) if request.param == "memory" else RedisStore(url, **kwargs)
        )
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> NotificationStore:
    """One store of the kind under test with default caps."""
    return make_store()


def wall(clock: FakeClock, offset: float = 0.0) -> datetime:
    """The fake clock's wall time as an aware datetime."""
    return datetime.fromtimestamp(clock.time() + offset, UTC)


def scheduled(clock: FakeClock, in_seconds: float, nid: str, **kwargs: Any) -> Notification:
    """An email due ``in_seconds`` after the fake clock's now."""
    kwargs.setdefault("text", f"hello {nid}")
    return Notification(
        channel=kwargs.pop("channel", "email"),
        to=kwargs.pop("to", "a@example.com"),
        send_at=wall(clock, in_seconds),
        id=nid,
        **kwargs,
    )


# ---------------------------------------------------------------------------------- idempotency
async def test_claim_returns_none_then_the_holder(store: NotificationStore) -> None:
    """The first claim takes the key; later claims (any id) get the holder's id."""
    assert await store.claim("order-7", "n1", 60) is None
    assert await store.claim("order-7", "n2", 60) == "n1"
    assert await store.claim("order-7", "n1", 60) == "n1"
    assert await store.claim("order-8", "n2", 60) is None


async def test_release_only_by_the_holder(store: NotificationStore) -> None:
    """A non-holder's release is ignored; the holder's frees the key."""
    assert await store.claim("k", "n1", 60) is None
    await store.release("k", "n2")
    assert await store.claim("k", "n3", 60) == "n1"
    await store.release("k", "n1")
    assert await store.claim("k", "n3", 60) is None
    await store.release("never-claimed", "n1")  # no error


async def test_claim_expires_after_its_ttl(store: NotificationStore, clock: FakeClock) -> None:
    """A claim is held for its TTL and free after it."""
    assert await store.claim("k", "n1", 10) is None
    clock.advance(9.5)
    assert await store.claim("k", "n2", 10) == "n1"
    clock.advance(1.0)
    assert await store.claim("k", "n2", 10) is None
    assert await store.claim("k", "n3", 10) == "n2"


async def test_keys_with_braces_and_percent_stay_distinct(store: NotificationStore) -> None:
    """Keys that would break a hash tag, or collide after escaping, are kept apart."""
    assert await store.claim("a{b}c", "n1", 60) is None
    assert await store.claim("a%7Bb%7Dc", "n2", 60) is None
    assert await store.claim("a{b}c", "x", 60) == "n1"
    assert await store.claim("a%7Bb%7Dc", "x", 60) == "n2"


async def test_non_positive_ttl_is_refused(store: NotificationStore) -> None:
    """A TTL of zero or less is a ValueError naming it."""
    with pytest.raises(ValueError, match="claim ttl"):
        await store.claim("k", "n1", 0)
    with pytest.raises(ValueError, match="result ttl"):
        await store.save_result(NotificationResult("n", NotificationStatus.SENT, ()), -1)
    with pytest.raises(ValueError, match="history ttl"):
        await store.record("n", [StatusEntry(wall(FakeClock()), "sent")], 0)
    with pytest.raises(ValueError, match="lease"):
        await store.take_due(datetime.now(UTC), 10, 0)


# -------------------------------------------------------------------------------------- results
def sample_result(nid: str = "n1") -> NotificationResult:
    """A result with every field and status kind set."""
    return NotificationResult.of(
        nid,
        (
            DeliveryResult(
                "a@example.com", DeliveryStatus.SENT, "smtp", 1, None, "<m1@x>", "email"
            ),
            DeliveryResult("b@example.com", DeliveryStatus.FAILED, "smtp", 3, "550 no such user"),
            DeliveryResult("c@example.com", DeliveryStatus.SUPPRESSED),
        ),
    )


async def test_result_round_trip_is_exact(store: NotificationStore, clock: FakeClock) -> None:
    """A saved result comes back equal, statuses as enums; it expires after its TTL."""
    result = sample_result()
    assert result.status == NotificationStatus.PARTIAL
    await store.save_result(result, 30)
    got = await store.get_result("n1")
    assert got == result
    assert got is not None
    assert type(got.status) is NotificationStatus
    assert all(type(d.status) is DeliveryStatus for d in got.deliveries)
    assert await store.get_result("unknown") is None
    clock.advance(31)
    assert await store.get_result("n1") is None


# -------------------------------------------------------------------------------------- history
def entry(clock: FakeClock, n: int, **kwargs: Any) -> StatusEntry:
    """A status entry numbered ``n`` (in ``attempt``)."""
    return StatusEntry(wall(clock, n + 0.000123), "attempt_failed", attempt=n, **kwargs)


async def test_history_keeps_order_and_exact_values(
    store: NotificationStore, clock: FakeClock
) -> None:
    """Entries come back in recording order, equal field by field (time zones included)."""
    first = [
        StatusEntry(wall(clock), "accepted"),
        StatusEntry(
            datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
            "attempt_failed",
            recipient="a@example.com",
            provider="smtp",
            attempt=1,
            error="421 try later",
        ),
    ]
    second = [
        StatusEntry(wall(clock, 2), "sent", "a@example.com", "smtp", 2, None, "<id@example.com>")
    ]
    await store.record("n1", first, 60)
    await store.record("n1", second, 60)
    await store.record("n1", [], 60)
    assert await store.history("n1") == first + second
    assert await store.history("other") == []


async def test_history_is_capped_newest_kept(make_store: StoreFactory, clock: FakeClock) -> None:
    """Past max_history the oldest entries are dropped."""
    store = make_store(max_history=5)
    await store.record("n1", [entry(clock, n) for n in range(3)], 60)
    await store.record("n1", [entry(clock, n) for n in range(3, 8)], 60)
    assert [e.attempt for e in await store.history("n1")] == [3, 4, 5, 6, 7]


async def test_history_ttl_runs_from_the_last_record(
    store: NotificationStore, clock: FakeClock
) -> None:
    """Recording renews the TTL; once expired, a new record starts a fresh history."""
    await store.record("n1", [entry(clock, 1)], 10)
    clock.advance(8)
    await store.record("n1", [entry(clock, 2)], 10)
    clock.advance(8)
    assert [e.attempt for e in await store.history("n1")] == [1, 2]
    clock.advance(3)
    assert await store.history("n1") == []
    await store.record("n1", [entry(clock, 3)], 10)
    assert [e.attempt for e in await store.history("n1")] == [3]


# ----------------------------------------------------------------------------------- scheduling
async def test_schedule_then_take_when_due(store: NotificationStore, clock: FakeClock) -> None:
    """Nothing is due before send_at; at send_at the notification comes back equal."""
    note = scheduled(
        clock,
        60,
        "n1",
        subject="Hi",
        attachments=(Attachment(filename="a.bin", content=b"\x00\xffbytes"),),
        context={"x": [1, 2]},
        metadata={"k": "v"},
    )
    await store.schedule(note)
    assert await store.scheduled_count() == 1
    assert await store.take_due(wall(clock, 59.9), 10, 30) == []
    (got,) = await store.take_due(wall(clock, 60), 10, 30)
    assert got == note
    assert got.attachments[0].content == b"\x00\xffbytes"
    assert await store.scheduled_count() == 1  # taken ones still count until finished


async def test_take_due_order_and_limit(store: NotificationStore, clock: FakeClock) -> None:
    """Due notifications come earliest first, at most ``limit`` per call."""
    for nid, delay in [("c", 3), ("a", 1), ("e", 50), ("b", 2), ("d", 4)]:
        await store.schedule(scheduled(clock, delay, nid))
    now = wall(clock, 10)
    assert [n.id for n in await store.take_due(now, 2, 30)] == ["a", "b"]
    assert [n.id for n in await store.take_due(now, 5, 30)] == ["c", "d"]
    assert await store.take_due(now, 5, 30) == []
    assert await store.take_due(now, 0, 30) == []


async def test_lease_hides_then_returns_an_unfinished_item(
    store: NotificationStore, clock: FakeClock
) -> None:
    """A taken item is not returned within its lease, is returned after it, until finished."""
    await store.schedule(scheduled(clock, 0, "n1"))
    now = wall(clock)
    assert [n.id for n in await store.take_due(now, 10, 30)] == ["n1"]
    assert await store.take_due(now + timedelta(seconds=29.9), 10, 30) == []
    later = now + timedelta(seconds=30)
    assert [n.id for n in await store.take_due(later, 10, 30)] == ["n1"]  # taker died
    assert await store.take_due(later + timedelta(seconds=10), 10, 30) == []  # leased again
    await store.finish_scheduled("n1")
    assert await store.take_due(later + timedelta(days=1), 10, 30) == []
    assert await store.scheduled_count() == 0
    await store.finish_scheduled("n1")  # twice: no error


async def test_reschedule_replaces(store: NotificationStore, clock: FakeClock) -> None:
    """Scheduling the same id again replaces its content and time (also while leased)."""
    await store.schedule(scheduled(clock, 0, "n1", text="old"))
    await store.take_due(wall(clock), 10, 30)
    await store.schedule(scheduled(clock, 5, "n1", text="new"))
    assert await store.scheduled_count() == 1
    assert await store.take_due(wall(clock, 4), 10, 30) == []
    (got,) = await store.take_due(wall(clock, 5), 10, 30)
    assert got.text == "new"


async def test_cancel(store: NotificationStore, clock: FakeClock) -> None:
    """Cancel removes waiting items, refuses taken ones, and takes lapsed ones back."""
    await store.schedule(scheduled(clock, 100, "waiting"))
    await store.schedule(scheduled(clock, 0, "taken"))
    assert [n.id for n in await store.take_due(wall(clock), 10, 30)] == ["taken"]
    assert await store.cancel_scheduled("waiting") is True
    assert await store.cancel_scheduled("waiting") is False
    assert await store.cancel_scheduled("taken") is False
    assert await store.cancel_scheduled("unknown") is False
    assert await store.scheduled_count() == 1
    clock.advance(31)  # the taker's lease lapsed: it is waiting again
    assert await store.cancel_scheduled("taken") is True
    assert await store.scheduled_count() == 0
    assert await store.take_due(wall(clock, 1000), 10, 30) == []


async def test_schedule_refuses_bad_notifications(
    store: NotificationStore, clock: FakeClock
) -> None:
    """No send_at, or a context JSON cannot carry, fails naming the notification."""
    with pytest.raises(NotificationError, match="'n1' has no send_at"):
        await store.schedule(Notification(channel="email", to="a@example.com", text="x", id="n1"))
    with pytest.raises(NotificationError, match="'n2' cannot be stored"):
        await store.schedule(scheduled(clock, 5, "n2", context={"obj": object()}))
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.take_due(datetime(2024, 1, 1), 10, 30)
    assert await store.scheduled_count() == 0


# --------------------------------------------------------------------------------- dead letters
def letter(
    clock: FakeClock, lid: str, channel: str = "email", **kwargs: Any
) -> NotificationDeadLetter:
    """A dead letter for a notification on ``channel``."""
    to = {"email": "a@example.com", "sms": "+15550100"}[channel]
    note = Notification(channel=channel, to=to, text="x", id=f"note-{lid}")
    return NotificationDeadLetter(
        lid, note, to, "550 gone", 3, wall(clock), provider=kwargs.get("provider")
    )


async def test_dead_letters_newest_first_and_filtered(
    store: NotificationStore, clock: FakeClock
) -> None:
    """Listing is newest first, filterable by channel, limited, and round-trips exactly."""
    letters = [letter(clock, f"d{n}", "email" if n % 2 else "sms", provider="p") for n in range(6)]
    for item in letters:
        await store.add_dead(item)
    assert await store.dead_letters() == letters[::-1]
    assert [d.id for d in await store.dead_letters(channel="sms")] == ["d4", "d2", "d0"]
    assert [d.id for d in await store.dead_letters(channel="email", limit=2)] == ["d5", "d3"]
    assert [d.id for d in await store.dead_letters(limit=1)] == ["d5"]
    assert await store.dead_letters(channel="push") == []
    await store.add_dead(letters[0])  # again: now the newest
    assert [d.id for d in await store.dead_letters(limit=2)] == ["d0", "d5"]


async def test_dead_letters_are_capped(make_store: StoreFactory, clock: FakeClock) -> None:
    """Past max_dead_letters the oldest go."""
    store = make_store(max_dead_letters=3)
    for n in range(5):
        await store.add_dead(letter(clock, f"d{n}"))
    assert [d.id for d in await store.dead_letters()] == ["d4", "d3", "d2"]
    assert await store.remove_dead(["d0", "d1"]) == 0


async def test_remove_dead(store: NotificationStore, clock: FakeClock) -> None:
    """remove_dead counts only letters that were there."""
    for n in range(3):
        await store.add_dead(letter(clock, f"d{n}"))
    assert await store.remove_dead(["d1", "d1", "nope"]) == 1
    assert await store.remove_dead([]) == 0
    assert [d.id for d in await store.dead_letters()] == ["d2", "d0"]


# ---------------------------------------------------------------------------------- suppression
async def test_suppression(store: NotificationStore) -> None:
    """A suppressed recipient has its reason, per channel; others are None."""
    assert await store.suppressed("push", "tok1") is None
    await store.suppress("push", "tok1", "unregistered")
    assert await store.suppressed("push", "tok1") == "unregistered"
    assert await store.suppressed("sms", "tok1") is None
    await store.suppress("push", "tok1", "expired")
    assert await store.suppressed("push", "tok1") == "expired"


# ---------------------------------------------------------------------------- memory specifics
async def test_memory_maps_are_bounded(clock: FakeClock) -> None:
    """Claims, results, histories, suppressions and scheduled items never pass their caps."""
    store = MemoryStore(clock=clock, max_results=3, max_scheduled=2, max_suppressed=2)
    for n in range(5):
        assert await store.claim(f"k{n}", f"n{n}", 60) is None
        await store.save_result(sample_result(f"n{n}"), 60)
        await store.record(f"n{n}", [entry(clock, n)], 60)
        await store.suppress("push", f"t{n}", "gone")
    assert await store.claim("k4", "x", 60) == "n4"
    assert await store.claim("k0", "x", 60) is None  # the oldest was forgotten
    assert await store.get_result("n0") is None
    assert await store.get_result("n4") == sample_result("n4")
    assert await store.history("n1") == []
    assert await store.suppressed("push", "t2") is None
    assert await store.suppressed("push", "t4") == "gone"
    await store.schedule(scheduled(clock, 5, "s1"))
    await store.schedule(scheduled(clock, 5, "s2"))
    await store.schedule(scheduled(clock, 6, "s2"))  # replacing is not growing
    with pytest.raises(NotificationError, match="max_scheduled"):
        await store.schedule(scheduled(clock, 5, "s3"))


def test_bad_constructor_arguments() -> None:
    """Bad caps and URL/client combinations fail naming the argument."""
    with pytest.raises(ConfigurationError, match="max_history"):
        MemoryStore(max_history=0)
    with pytest.raises(ConfigurationError, match="exactly one of url or client"):
        RedisStore()
    with pytest.raises(ConfigurationError, match="prefix"):
        RedisStore("redis://localhost", prefix="a{b}")
    with pytest.raises(ConfigurationError, match="max_dead_letters"):
        RedisStore("redis://localhost", max_dead_letters=0)
    with pytest.raises(ConfigurationError, match="timeout"):
        RedisStore("redis://localhost", timeout=0)


# ----------------------------------------------------------------------------- redis specifics
@pytest.mark.redis
async def test_concurrent_take_due_never_hands_out_twice(redis_url: str, clock: FakeClock) -> None:
    """Two clients racing take_due split the due items; none is handed out twice."""
    stores = [RedisStore(redis_url, clock=clock), RedisStore(redis_url, clock=clock)]
    try:
        for n in range(300):
            await stores[0].schedule(scheduled(clock, n % 7, f"n{n:03}"))
        now = wall(clock, 10)
        batches = await asyncio.gather(*(stores[i % 2].take_due(now, 7, 60) for i in range(60)))
        taken = [n.id for batch in batches for n in batch]
        assert len(taken) == len(set(taken)) == 300
        assert {len(b) for b in batches} >= {7}
        assert await stores[1].take_due(now, 10, 60) == []
    finally:
        for store in stores:
            await store.close()


def check_commands(commands: list[list[str]]) -> int:
    """Check MONITOR output: tagged keys, one slot per script/MULTI, scripts use only KEYS."""
    keyless = {"PING", "SCRIPT", "MULTI", "EXEC", "CLIENT", "HELLO", "SELECT", "INFO"}
    script_keys: list[str] | None = None
    in_multi: set[int] | None = None
    evals = 0
    for source, raw_name, *args in commands:
        name = raw_name.upper()
        if name in {"EVALSHA", "EVAL"}:
            evals += 1
            script_keys = args[2 : 2 + int(args[1])]
            assert all(TAGGED.match(k) for k in script_keys), script_keys
            assert len({key_slot(k.encode()) for k in script_keys}) == 1, script_keys
            continue
        if name == "MULTI":
            in_multi = set()
        if name in keyless:
            if name == "EXEC":
                assert in_multi is not None
                assert len(in_multi) == 1, "a transaction spans slots"
                in_multi = None
            continue
        key = args[0]
        assert TAGGED.match(key), f"{name} {key} has no hash tag"
        if source == "lua":
            assert script_keys is not None
            assert key in script_keys, f"script ran {name} on {key}, not one of its KEYS"
        elif in_multi is not None:
            in_multi.add(key_slot(key.encode()))
    return evals


@pytest.mark.redis
async def test_every_key_is_hash_tagged_and_scripts_touch_only_their_keys(
    redis_url: str, clock: FakeClock, aredis: aioredis.Redis
) -> None:
    """Every command's key has a hash tag; a script or MULTI uses one slot and only its KEYS."""
    store = RedisStore(redis_url, clock=clock, max_dead_letters=2)
    marker = "end-of-workload"
    async with aredis.monitor() as monitor:

        async def workload() -> None:
            await store.claim("k{1}", "n1", 60)
            await store.release("k{1}", "n1")
            await store.save_result(sample_result(), 60)
            await store.get_result("n1")
            await store.record("n1", [entry(clock, 1)], 60)
            await store.history("n1")
            await store.schedule(scheduled(clock, 0, "s1"))
            await store.schedule(scheduled(clock, 100, "s2"))
            await store.take_due(wall(clock), 10, 30)
            await store.cancel_scheduled("s2")
            await store.finish_scheduled("s1")
            await store.scheduled_count()
            for n in range(3):
                await store.add_dead(letter(clock, f"d{n}"))
            await store.dead_letters(channel="email")
            await store.remove_dead(["d2"])
            await store.suppress("push", "t", "gone")
            await store.suppressed("push", "t")
            await store.client.echo(marker)

        task = asyncio.create_task(workload())
        commands: list[list[str]] = []
        while True:
            info = await monitor.next_command()
            tokens = info["command"].split(" ")
            if tokens[0].upper() == "ECHO" and marker in info["command"]:
                break
            commands.append([info["client_type"], *tokens])
        await task
    await store.close()

    assert check_commands(commands) >= 8
    keys = [k.decode() async for k in aredis.scan_iter()]
    assert keys
    assert all(TAGGED.match(k) for k in keys), keys


def test_scripts_name_keys_only_through_keys_array() -> None:
    """Each Lua script's redis.call targets KEYS[...] only (never a built or ARGV key)."""
    call = re.compile(r"redis\.call\('(\w+)',\s*([^,)]+)")
    for name, source in SCRIPTS.items():
        for command, target in call.findall(source):
            assert target.startswith("KEYS["), f"{name}: {command} on {target}"
        assert "TIME" not in source, f"{name} reads the server clock"


@pytest.mark.redis
async def test_ttl_keys_also_expire_in_redis(
    redis_url: str, clock: FakeClock, aredis: aioredis.Redis
) -> None:
    """Claims, results and histories carry a real PX so Redis frees them unread."""
    store = RedisStore(redis_url, clock=clock)
    await store.claim("k", "n1", 0.2)
    await store.save_result(sample_result(), 0.2)
    await store.record("n1", [entry(clock, 1)], 0.2)
    keys = [k async for k in aredis.scan_iter()]
    assert len(keys) == 3
    for key in keys:
        assert 0 < await aredis.pttl(key) <= 200
    await asyncio.sleep(0.3)
    assert [k async for k in aredis.scan_iter()] == []
    await store.close()


@pytest.mark.redis
async def test_injected_client_is_left_open_and_may_decode(
    redis_url: str, clock: FakeClock
) -> None:
    """A caller's client (even decode_responses=True) works and is not closed by close()."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(client=client, clock=clock, prefix="app:n")
    await store.start()
    assert await client.script_exists(
        *(sha1(s.encode(), usedforsecurity=False).hexdigest() for s in SCRIPTS.values())
    ) == [True] * len(SCRIPTS)
    assert await store.claim("k", "n1", 60) is None
    assert await store.claim("k", "n2", 60) == "n1"
    await store.record("n1", [entry(clock, 1)], 60)
    assert [e.attempt for e in await store.history("n1")] == [1]
    await store.save_result(sample_result(), 60)
    assert await store.get_result("n1") == sample_result()
    await store.schedule(scheduled(clock, 0, "s1"))
    assert [n.id for n in await store.take_due(wall(clock), 5, 30)] == ["s1"]
    await store.add_dead(letter(clock, "d1"))
    assert [d.id for d in await store.dead_letters(channel="email")] == ["d1"]
    await store.close()
    assert all(k.startswith("{app:n") for k in await client.keys("*"))
    await client.aclose()


async def test_unreachable_redis_is_a_library_error() -> None:
    """A store whose Redis is down raises BackendUnavailableError, not a redis-py error."""
    store = RedisStore("redis://127.0.0.1:1/0", timeout=2)
    with pytest.raises(BackendUnavailableError, match="notification store start"):
        await store.start()
    with pytest.raises(BackendUnavailableError, match="notification store"):
        await store.ping()
    with pytest.raises(BackendUnavailableError):
        await store.claim("k", "n1", 10)
    await store.close()


@pytest.mark.redis
async def test_corrupt_entries_are_library_errors(
    redis_url: str, clock: FakeClock, aredis: aioredis.Redis
) -> None:
    """A value the store did not write fails as NotificationError, naming what was corrupt."""
    store = RedisStore(redis_url, clock=clock)
    await aredis.set("{dotmac:notify:result:n1}", "no expiry here")
    with pytest.raises(NotificationError, match="no expiry prefix"):
        await store.get_result("n1")
    await aredis.set("{dotmac:notify:result:n2}", "99999999999999|{not json")
    with pytest.raises(NotificationError, match="result is not valid JSON"):
        await store.get_result("n2")
    await aredis.set("{dotmac:notify:result:n3}", '99999999999999|{"id": "n3"}')
    with pytest.raises(NotificationError, match="result is corrupt"):
        await store.get_result("n3")
    await store.close()
