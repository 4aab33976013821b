"""Redis Streams backend: consumer groups shared by every process on the same Redis.

Keys (``P`` is ``stream_prefix``; every key of one topic shares the hash tag ``{P:<topic>}`` so a
stream, its groups' failure counts and its dead letters can be changed in one transaction, and the
same code runs on Redis Cluster):

- ``{P:<topic>}`` — the stream of events without a key; each entry has field ``e`` (the
  CloudEvents JSON) and, for a replay, ``g`` (the only group that may handle it);
- ``{P:<topic>}:lane:<n>`` — ``key_lanes`` streams for events with a key (``crc32(key) % lanes``);
- ``{P:<topic>}:lease:<group>|<pattern>:<n>`` — which consumer of a group reads lane ``n``;
- ``{P:<topic>}:dlq`` — dead letters of every group on that topic;
- ``{P:<topic>}:failures:<group>|<pattern>`` — failed attempts per pending entry, so a claimer
  counts them;
- ``P:topics`` — every topic ever published (consumers discover streams matching their pattern);
- ``P:groups`` — when each group was first declared (its streams start there);
- ``P:alive:<group>|<pattern>`` — the group's live consumers (for sharing the lanes fairly).

**Per-key order across processes.** A lane is read by one consumer of a group at a time (a lease
renewed while it lives); a consumer takes over a lane only after the previous holder released it
with nothing in flight, or died and let its lease lapse, and it first re-handles what that holder
left pending. Events with one key all go to one lane, so within a group they are handled in
publish order and never concurrently, whichever process reads them. Lanes are shared out evenly
between a group's live consumers.

Each group is a Redis consumer group named ``<group>|<pattern>`` on every matching stream, created
at the group's declaration time, so it receives every event published after it was first declared
— also on topics that appear later.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc

from dotmac.communications._redis import bounded_redis_call, create_redis_client, tagged_key
from dotmac.communications.errors import (
    CommunicationsError,
    ConfigurationError,
    EventDecodeError,
)
from dotmac.communications.events._event import Event
from dotmac.communications.events._topics import compile_pattern

from .base import DeadLetter, Delivery, EventBackend, GroupConsumer, GroupId

__all__ = ["RedisStreamsBackend"]

log = logging.getLogger("dotmac.communications.events")

FAILURES_TTL_SECONDS = 7 * 24 * 3600

# KEYS[1]: a lane lease. ARGV: consumer, ttl ms. Renew only a lease we hold.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1]: a lane lease. ARGV: consumer. Release only a lease we hold.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1]: a group's live consumers. ARGV: consumer, ttl ms. Returns how many are alive.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[2] * 4)
return redis.call('ZCARD', KEYS[1])
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class RedisStreamsBackend(EventBackend):
    """Events in Redis Streams, consumed in consumer groups across processes.

    Args:
        url: Redis URL; or pass ``client``.
        client: A ready asyncio client; the caller keeps ownership.
        stream_prefix: Prefix of every key (no braces).
        maxlen: Approximate cap on entries kept per stream (``XADD MAXLEN ~``); acknowledged
            entries are trimmed earlier (``XTRIM MINID``).
        dead_letter_maxlen: Approximate cap on dead letters per topic.
        claim_idle: Seconds a delivery may stay unacknowledged before another consumer claims it.
        discovery_interval: Seconds between looks for new topics matching a subscription.
        trim_interval: Seconds between trims of acknowledged entries.
        key_lanes: Streams per topic for events with a key (per-key order across processes);
            every publisher and consumer of a topic must use the same number. ``0`` puts keyed
            events in the main stream (per-key order then holds within one process only).
        timeout: Deadline of each Redis operation (a blocking read gets its block time on top).
            The client it creates has no per-read socket timeout: one deadline per operation is
            as safe and much cheaper than a timer on every reply of a pipeline.

    Raises:
        ConfigurationError: Neither or both of ``url`` and ``client``; a bad number or prefix.
    """

    system = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        stream_prefix: str = "dotmac:events",
        maxlen: int = 100_000,
        dead_letter_maxlen: int = 10_000,
        claim_idle: float = 30.0,
        discovery_interval: float = 1.0,
        trim_interval: float = 10.0,
        timeout: float = 5.0,
        key_lanes: int = 16,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisStreamsBackend: pass exactly one of url or client")
        if not stream_prefix or "{" in stream_prefix or "}" in stream_prefix:
            raise ConfigurationError(
                f"RedisStreamsBackend: stream_prefix must be non-empty and brace-free, "
                f"got {stream_prefix!r}"
            )
        if maxlen < 1 or dead_letter_maxlen < 1 or not claim_idle > 0:
            raise ConfigurationError(
                "RedisStreamsBackend: maxlen and dead_letter_maxlen must be >= 1 and "
                f"claim_idle > 0 (got {maxlen}, {dead_letter_maxlen}, {claim_idle})"
            )
        if (
            isinstance(key_lanes, bool)
            or not isinstance(key_lanes, int)
            or not 0 <= key_lanes <= 1024
        ):
            raise ConfigurationError(
                f"RedisStreamsBackend: key_lanes must be an int from 0 to 1024, got {key_lanes!r}"
            )
        if not discovery_interval > 0 or not trim_interval > 0 or not timeout > 0:
            raise ConfigurationError(
                "RedisStreamsBackend: discovery_interval, trim_interval and timeout must be > 0"
            )
        self._owned = client is None
        self.client: aioredis.Redis = (
            client if client is not None else create_redis_client(url or "", socket_timeout=None)
        )
        self.prefix = stream_prefix
        self.maxlen = maxlen
        self.dead_letter_maxlen = dead_letter_maxlen
        self.claim_idle = claim_idle
        self.discovery_interval = discovery_interval
        self.trim_interval = trim_interval
        self.timeout = timeout
        self.key_lanes = key_lanes
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self.topics_key = f"{stream_prefix}:topics"
        self.groups_key = f"{stream_prefix}:groups"
        self._known_topics: set[str] = set()

    # ----------------------------------------------------------------------------------- keys
    def stream_key(self, topic: str) -> str:
        """The stream holding ``topic``'s events."""
        return tagged_key(f"{self.prefix}:{topic}")

    def lane_key(self, topic: str, lane: int) -> str:
        """Lane ``lane`` of ``topic`` (where events with a key go)."""
        return tagged_key(f"{self.prefix}:{topic}", "lane", str(lane))

    def lease_key(self, topic: str, group: GroupId, lane: int) -> str:
        """Who in ``group`` reads lane ``lane`` of ``topic``."""
        return tagged_key(f"{self.prefix}:{topic}", "lease", group.key, str(lane))

    def alive_key(self, group: GroupId) -> str:
        """The live consumers of ``group``."""
        return f"{self.prefix}:alive:{group.key}"

    def event_stream(self, event: Event) -> str:
        """The stream ``event`` is stored in: a key lane, or the topic's main stream."""
        if event.key is not None and self.key_lanes:
            return self.lane_key(event.type, zlib.crc32(event.key.encode()) % self.key_lanes)
        return self.stream_key(event.type)

    def topic_streams(self, topic: str) -> list[str]:
        """The main stream and every lane of ``topic``."""
        return [self.stream_key(topic)] + [self.lane_key(topic, n) for n in range(self.key_lanes)]

    def dead_letter_key(self, topic: str) -> str:
        """The stream holding ``topic``'s dead letters."""
        return tagged_key(f"{self.prefix}:{topic}", "dlq")

    def failures_key(self, topic: str, group: GroupId) -> str:
        """The hash counting failed attempts of ``group``'s pending entries on ``topic``."""
        return tagged_key(f"{self.prefix}:{topic}", "failures", group.key)

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Check the connection."""
        await self.ping()

    async def close(self) -> None:
        """Close the client if this backend created it."""
        if self._owned:
            await self.client.aclose()

    async def ping(self) -> None:
        """PING Redis; raise the mapped error when it does not answer."""
        async with bounded_redis_call("events backend ping", self.timeout):
            await self.client.ping()

    # -------------------------------------------------------------------------------- publish
    async def publish(self, events: Sequence[Event], timeout: float) -> list[str]:
        """XADD every event in one pipeline (not atomic across topics)."""
        new_topics = {event.type for event in events} - self._known_topics
        pipe = self.client.pipeline(transaction=False)
        if new_topics:
            pipe.sadd(self.topics_key, *new_topics)
        for event in events:
            pipe.xadd(
                self.event_stream(event),
                {"e": event.to_json()},
                maxlen=self.maxlen,
                approximate=True,
            )
        async with bounded_redis_call("events publish", timeout):
            results = await pipe.execute()
        self._known_topics |= new_topics
        return [_text(r) for r in results[1 if new_topics else 0 :]]

    # --------------------------------------------------------------------------------- groups
    async def declare_group(self, group: GroupId) -> None:
        """Record when the group was first declared (Redis server time)."""
        async with bounded_redis_call("events declare group", self.timeout):
            seconds, micros = await self.client.time()
            await self.client.hsetnx(self.groups_key, group.key, seconds * 1000 + micros // 1000)

    async def _group_start_id(self, group: GroupId) -> str:
        async with bounded_redis_call("events declare group", self.timeout):
            created = await self.client.hget(self.groups_key, group.key)
        if created is None:
            await self.declare_group(group)
            return await self._group_start_id(group)
        # One millisecond of margin: an event published in the declaring millisecond counts.
        return f"{max(int(created) - 1, 0)}-0"

    async def matching_topics(self, pattern: str) -> list[str]:
        """Known topics matching ``pattern``."""
        matcher = compile_pattern(pattern)
        async with bounded_redis_call("events topic discovery", self.timeout):
            members = await self.client.smembers(self.topics_key)
        return sorted(t for t in map(_text, members) if matcher.match(t))

    async def ensure_group_on(self, group: GroupId, topic: str) -> None:
        """Create the Redis consumer group on ``topic``'s streams (main and lanes) if missing."""
        start = await self._group_start_id(group)
        for stream in self.topic_streams(topic):
            async with bounded_redis_call("events create group", self.timeout):
                try:
                    await self.client.xgroup_create(stream, group.key, id=start, mkstream=True)
                except rexc.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def ensure_declared_groups_on(self, topic: str) -> None:
        """Create on ``topic``'s stream every declared group whose pattern matches it.

        Called before trimming: a group whose consumers are all down has not created itself on
        a new stream yet, and trimming by the groups already there would drop its events.
        """
        async with bounded_redis_call("events trim", self.timeout):
            declared = await self.client.hkeys(self.groups_key)
        for raw in declared:
            group, _, pattern = _text(raw).partition("|")
            if pattern and compile_pattern(pattern).match(topic):
                await self.ensure_group_on(GroupId(group, pattern), topic)

    def consumer(self, group: GroupId, name: str) -> GroupConsumer:
        """A consumer called ``name`` in ``group``."""
        return _RedisConsumer(self, group, name)

    # -------------------------------------------------------------------------- dead letters
    async def dead_letters(
        self, *, group: str | None, topic: str | None, limit: int
    ) -> list[DeadLetter]:
        """Newest first, across topics."""
        topics = [topic] if topic is not None else await self.matching_topics("#")
        letters: list[DeadLetter] = []
        page = min(max(limit, 100), 1000)
        for name in topics:
            # Page backwards until this topic gave `limit` matches or ran out: a group filter
            # must not miss older letters behind other groups' newer ones.
            found, upper = 0, "+"
            while found < limit:
                async with bounded_redis_call("events dead letters", self.timeout):
                    rows: Any = await self.client.xrevrange(
                        self.dead_letter_key(name), max=upper, count=page
                    )
                for entry_id, fields in rows:
                    letter = _dead_letter(name, _text(entry_id), fields)
                    if group is None or letter.group == group:
                        letters.append(letter)
                        found += 1
                if len(rows) < page:
                    break
                upper = "(" + _text(rows[-1][0])
        letters.sort(key=lambda d: d.time, reverse=True)
        return letters[:limit]

    async def replay(self, letters: Sequence[DeadLetter]) -> int:
        """Per letter, atomically: XADD it back for its group only and XDEL the dead letter."""
        replayed = 0
        for letter in letters:
            gid = GroupId(letter.group, letter.pattern)
            await self.ensure_group_on(gid, letter.topic)
            pipe = self.client.pipeline(transaction=True)
            # A keyed letter goes back to its key's lane: its group's lane holder handles it,
            # never concurrently with that key's other events.
            stream = self.event_stream(letter.event) if letter.event else None
            pipe.xadd(
                stream or self.stream_key(letter.topic),
                {"e": letter.raw, "g": gid.key},
                maxlen=self.maxlen,
                approximate=True,
            )
            pipe.xdel(self.dead_letter_key(letter.topic), letter.id)
            async with bounded_redis_call("events replay", self.timeout):
                _, deleted = await pipe.execute()
            replayed += int(deleted)
        return replayed

    async def purge(self, letters: Sequence[DeadLetter]) -> int:
        """XDEL the given dead letters."""
        by_topic: dict[str, list[str]] = defaultdict(list)
        for letter in letters:
            by_topic[letter.topic].append(letter.id)
        removed = 0
        for topic, ids in by_topic.items():
            async with bounded_redis_call("events purge", self.timeout):
                removed += int(await self.client.xdel(self.dead_letter_key(topic), *ids))
        return removed


def _dead_letter(topic: str, entry_id: str, fields: dict[Any, Any]) -> DeadLetter:
    data = {_text(k): v for k, v in fields.items()}
    raw = data.get("e", b"")
    raw = raw if isinstance(raw, bytes) else str(raw).encode()
    try:
        event: Event | None = Event.from_json(raw)
    except EventDecodeError:
        event = None
    return DeadLetter(
        id=entry_id,
        topic=topic,
        group=_text(data.get("group", b"")),
        pattern=_text(data.get("pattern", b"")),
        error=_text(data.get("error", b"")),
        attempts=int(data.get("attempts", 0)),
        time=datetime.fromtimestamp(int(data.get("time", 0)) / 1000, UTC),
        raw=raw,
        event=event,
    )


def _failure_field(delivery: Delivery) -> str:
    # Entry ids are unique per stream only: a lane's entries are prefixed with their lane.
    stream = delivery.stream
    return (
        f"{stream.rsplit(':', 1)[-1]}|{delivery.entry_id}"
        if ":lane:" in stream
        else (delivery.entry_id)
    )


class _RedisConsumer(GroupConsumer):
    def __init__(self, backend: RedisStreamsBackend, group: GroupId, name: str) -> None:
        self._b = backend
        self._group = group
        self._name = name
        self._streams: dict[str, str] = {}  # main stream key -> topic
        self._lanes: dict[str, tuple[str, int]] = {}  # every known lane key -> (topic, lane)
        self._held: dict[str, tuple[str, int]] = {}  # lanes whose lease we hold
        self._taking_over: set[str] = set()  # held, not read until the old holder's entries are
        self._draining: set[str] = set()  # held beyond our share: not read, released when idle
        self._outstanding: dict[str, int] = defaultdict(int)  # lane key -> unsettled deliveries
        self._backlog: list[Delivery] = []  # received, not yet handed to the bus (tracked)
        self._tracked: set[tuple[str, str]] = set()  # (stream, id) we hold, handed out or not
        self._lane_lock = asyncio.Lock()  # fetch and keepalive both manage lanes
        self._alive = 1
        self._next_discovery = 0.0
        self._next_claim = 0.0
        self._next_lease = 0.0
        self._next_trim = 0.0
        self._claim_cursor: dict[str, str] = {}
        self._started = False
        self._closed = False

    # ---------------------------------------------------------------------------- discovery
    async def _discover(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_discovery:
            return
        self._next_discovery = now + self._b.discovery_interval
        for topic in await self._b.matching_topics(self._group.pattern):
            key = self._b.stream_key(topic)
            if key not in self._streams:
                await self._b.ensure_group_on(self._group, topic)
                self._streams[key] = topic
                for lane in range(self._b.key_lanes):
                    self._lanes[self._b.lane_key(topic, lane)] = (topic, lane)

    # ------------------------------------------------------------------------------- lanes
    async def _share_lanes(self) -> None:
        """Keep about a fair share of the lanes: take free ones, hand extras back once idle."""
        async with self._lane_lock:
            await self._share_lanes_locked()

    async def _share_lanes_locked(self) -> None:
        now = time.monotonic()
        if now < self._next_lease or not self._lanes:
            return
        self._next_lease = now + self._b.claim_idle / 4
        await self._heartbeat()
        share = -(-len(self._lanes) // max(self._alive, 1))  # ceiling division
        active = [key for key in self._held if key not in self._draining]
        for key in active[share:]:
            self._draining.add(key)  # stop reading it; released once nothing is in flight
        for key in list(self._draining):
            held = self._held.get(key)
            if held is None:
                self._draining.discard(key)
            elif not self._outstanding.get(key):
                await self._release_lane(key, *held)
        ttl_ms = int(self._b.claim_idle * 1000)
        for key, (topic, lane) in self._lanes.items():
            if len(self._held) - len(self._draining) >= share:
                break
            if key in self._held:
                continue
            lease = self._b.lease_key(topic, self._group, lane)
            async with bounded_redis_call("events lane lease", self._b.timeout):
                taken = await self._b.client.set(lease, self._name, nx=True, px=ttl_ms)
            if taken:
                self._held[key] = (topic, lane)
                self._taking_over.add(key)
        for key in list(self._taking_over):
            held = self._held.get(key)
            if held is None:
                self._taking_over.discard(key)
            else:
                await self._take_over(key, held[0])

    async def _heartbeat(self) -> None:
        ttl_ms = int(self._b.claim_idle * 1000)
        async with bounded_redis_call("events heartbeat", self._b.timeout):
            self._alive = int(
                await self._b._heartbeat(
                    keys=[self._b.alive_key(self._group)], args=[self._name, ttl_ms]
                )
            )

    async def _take_over(self, key: str, topic: str) -> None:
        """Re-handle, first and in order, what the lane's previous holder left pending.

        Only entries idle for ``claim_idle`` are taken (a live holder keeps its own fresh), and
        the lane is not read until no other consumer holds entries of it: a key's newer events
        never overtake its older ones.
        """
        idle_ms = int(self._b.claim_idle * 1000)
        cursor = "0-0"
        while True:
            async with bounded_redis_call("events lane takeover", self._b.timeout):
                reply: Any = await self._b.client.xautoclaim(
                    key, self._group.key, self._name, idle_ms, cursor, count=500
                )
            cursor, entries = _text(reply[0]), reply[1]
            deleted = [_text(i) for i in reply[2]] if len(reply) > 2 else []
            if deleted:
                await self._ack_ids({key: deleted})
            if entries:
                self._backlog.extend(self._track(await self._claimed(key, topic, entries)))
            if cursor == "0-0" or not entries:
                break
        async with bounded_redis_call("events lane takeover", self._b.timeout):
            summary: Any = await self._b.client.xpending(key, self._group.key)
        others = sum(
            int(c["pending"]) for c in summary.get("consumers") or ()
            if _text(c["name"]) != self._name
        )  # fmt: skip
        if not others:
            self._taking_over.discard(key)

    async def _release_lane(self, key: str, topic: str, lane: int) -> None:
        lease = self._b.lease_key(topic, self._group, lane)
        async with bounded_redis_call("events lane release", self._b.timeout):
            await self._b._release(keys=[lease], args=[self._name])
        self._forget_lane(key)

    def _forget_lane(self, key: str) -> None:
        self._held.pop(key, None)
        self._taking_over.discard(key)
        self._draining.discard(key)
        # Entries of the lane not yet handed out stay pending; the next holder takes them over.
        for delivery in self._backlog:
            if delivery.stream == key:
                self._untrack(delivery)
        self._backlog = [d for d in self._backlog if d.stream != key]

    async def _renew_leases(self) -> None:
        ttl_ms = int(self._b.claim_idle * 1000)
        for key, (topic, lane) in list(self._held.items()):
            lease = self._b.lease_key(topic, self._group, lane)
            async with bounded_redis_call("events lane renew", self._b.timeout):
                kept = await self._b._renew(keys=[lease], args=[self._name, ttl_ms])
            if not int(kept):
                # Lapsed (this process stalled longer than claim_idle): another consumer may
                # own the lane now; stop reading it.
                log.warning("events: lost the lease of %s; another consumer reads it now", key)
                self._forget_lane(key)

    # -------------------------------------------------------------------------------- fetch
    async def fetch(self, count: int, timeout: float) -> list[Delivery]:
        """Claim idle entries (now and then), else XREADGROUP new ones (blocking)."""
        if not self._started:
            self._started = True
            await self._heartbeat()  # count ourselves before taking any lane
        await self._discover()
        await self._share_lanes()
        if self._backlog:
            taken, self._backlog = self._backlog[:count], self._backlog[count:]
            return taken
        claimed = await self._claim(count)
        if claimed:
            return self._hand_out(claimed, count)
        try:
            await self._trim()
        except CommunicationsError as exc:  # trimming is housekeeping: never block consuming
            log.warning("events: trimming acknowledged entries failed: %s", exc)
        if not self._streams:
            await asyncio.sleep(min(timeout, self._b.discovery_interval))
            return []
        block_ms = max(1, int(min(timeout, self._b.discovery_interval) * 1000))
        readable = [k for k in self._held if k not in self._taking_over and k not in self._draining]
        streams: Any = dict.fromkeys([*self._streams, *readable], ">")
        async with bounded_redis_call("events fetch", block_ms / 1000 + self._b.timeout):
            try:
                reply: Any = await self._b.client.xreadgroup(
                    self._group.key, self._name, streams, count=count, block=block_ms
                )
            except rexc.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("events: consumer group missing, recreating: %s", exc)
                await self._reset_streams()
                return []
        out: list[Delivery] = []
        foreign: dict[str, list[str]] = defaultdict(list)
        for stream, entries in reply or ():
            key = _text(stream)
            topic = self._streams.get(key) or self._lanes.get(key, (key, 0))[0]
            for entry_id, fields in entries:
                delivery = self._delivery(key, topic, _text(entry_id), fields, 1, 0)
                if delivery is None:
                    foreign[key].append(_text(entry_id))
                else:
                    out.append(delivery)
        if foreign:
            await self._ack_ids(foreign)
        return self._hand_out(self._track(out), count)

    async def _reset_streams(self) -> None:
        # A stream or group vanished (Redis restarted without persistence, or a key was
        # deleted): give the lanes back and create everything again on the next call.
        async with self._lane_lock:
            self._streams.clear()
            for key, (topic, lane) in list(self._held.items()):
                await self._release_lane(key, topic, lane)
        self._next_discovery = 0.0

    def _hand_out(self, deliveries: list[Delivery], count: int) -> list[Delivery]:
        # XREADGROUP's COUNT applies per stream: keep what exceeds `count` for the next fetch.
        if len(deliveries) > count:
            self._backlog.extend(deliveries[count:])
            return deliveries[:count]
        return deliveries

    def _track(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Count deliveries we now hold; drop any we already hold (a claim of our own entry)."""
        fresh = []
        for delivery in deliveries:
            ident = (delivery.stream, delivery.entry_id)
            if ident in self._tracked:
                continue
            self._tracked.add(ident)
            if delivery.stream in self._lanes:
                self._outstanding[delivery.stream] += 1
            fresh.append(delivery)
        return fresh

    def _untrack(self, delivery: Delivery) -> None:
        ident = (delivery.stream, delivery.entry_id)
        if ident not in self._tracked:
            return
        self._tracked.discard(ident)
        if delivery.stream in self._lanes and self._outstanding.get(delivery.stream):
            self._outstanding[delivery.stream] -= 1

    def abandon(self, delivery: Delivery) -> None:
        """The bus gave up on settling it: stop counting it against its lane."""
        self._untrack(delivery)

    def _delivery(  # noqa: PLR0917 -- one private call shape, used from three places
        self,
        stream: str,
        topic: str,
        entry_id: str,
        fields: dict[Any, Any],
        deliveries: int,
        failures: int,
    ) -> Delivery | None:
        raw = fields.get(b"e")
        target = fields.get(b"g")
        if target is not None and _text(target) != self._group.key:
            return None  # a replay meant for another group
        attempt = max(deliveries, failures + 1)
        if not isinstance(raw, bytes):
            error = "stream entry has no 'e' field"
            return Delivery(entry_id, topic, b"", None, attempt, error, stream=stream)
        try:
            event = Event.from_json(raw, attempt=attempt)
        except EventDecodeError as exc:
            return Delivery(entry_id, topic, raw, None, attempt, str(exc), stream=stream)
        return Delivery(entry_id, topic, raw, event, attempt, stream=stream)

    async def _claim(self, count: int) -> list[Delivery]:
        now = time.monotonic()
        if now < self._next_claim or not self._streams:
            return []
        self._next_claim = now + self._b.claim_idle / 4
        idle_ms = int(self._b.claim_idle * 1000)
        out: list[Delivery] = []
        # Main streams, and the lanes we read: a lane entry whose settling failed goes idle
        # (nothing keeps it alive) and is handed out again from here.
        streams = [
            *self._streams.items(),
            *((k, t) for k, (t, _) in self._held.items() if k not in self._taking_over),
        ]
        for key, topic in streams:
            if len(out) >= count:
                break
            cursor = self._claim_cursor.get(key, "0-0")
            async with bounded_redis_call("events claim", self._b.timeout):
                try:
                    reply = await self._b.client.xautoclaim(
                        key, self._group.key, self._name, idle_ms, cursor, count=count - len(out)
                    )
                except rexc.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    self._streams.pop(key, None)
                    self._next_discovery = 0.0
                    continue
            cursor, entries = _text(reply[0]), reply[1]
            deleted = [_text(i) for i in reply[2]] if len(reply) > 2 else []
            self._claim_cursor[key] = cursor
            if deleted:
                # Trimmed by MAXLEN while pending: the event is gone; clear the pending list.
                log.error(
                    "events: %d pending entries of %s were trimmed before being handled "
                    "(raise events.maxlen)",
                    len(deleted),
                    key,
                )
                await self._ack_ids({key: deleted})
            if entries:
                out.extend(self._track(await self._claimed(key, topic, entries)))
        return out

    async def _claimed(self, key: str, topic: str, entries: list[Any]) -> list[Delivery]:
        ids = [_text(entry_id) for entry_id, _ in entries]
        lane = key.rsplit(":", 1)[-1] if key in self._lanes else None
        fields = [f"{lane}|{i}" for i in ids] if lane is not None else ids
        failures_key = self._b.failures_key(topic, self._group)
        async with bounded_redis_call("events claim", self._b.timeout):
            pending: Any = await self._b.client.xpending_range(
                key, self._group.key, min=ids[0], max=ids[-1], count=len(ids) * 2,
                consumername=self._name,
            )  # fmt: skip
            failed = await self._b.client.hmget(failures_key, fields)
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        out = []
        foreign = []
        for (entry_id, data), fails in zip(entries, failed, strict=True):
            eid = _text(entry_id)
            delivery = self._delivery(key, topic, eid, data, counts.get(eid, 2), int(fails or 0))
            if delivery is None:
                foreign.append(eid)  # a replay for another group: ours to acknowledge away
            else:
                out.append(delivery)
        if foreign:
            await self._ack_ids({key: foreign})
        return out

    async def _trim(self) -> None:
        now = time.monotonic()
        if now < self._next_trim:
            return
        self._next_trim = now + self._b.trim_interval
        for topic in set(self._streams.values()):
            await self._b.ensure_declared_groups_on(topic)
        for key in [*self._streams, *self._held]:
            async with bounded_redis_call("events trim", self._b.timeout):
                groups = await self._b.client.xinfo_groups(key)
                floor: tuple[int, int] | None = None
                for info in groups:
                    point = _id_key(_text(info["last-delivered-id"]))
                    if int(info["pending"]):
                        summary = await self._b.client.xpending(key, info["name"])
                        if summary.get("min") is not None:  # drained since XINFO: no floor
                            point = min(point, _id_key(_text(summary["min"])))
                    floor = point if floor is None else min(floor, point)
                if floor is not None and floor > (0, 0):
                    await self._b.client.xtrim(
                        key, minid=f"{floor[0]}-{floor[1]}", approximate=True
                    )

    # ------------------------------------------------------------------------------ settle
    def _stream(self, delivery: Delivery) -> str:
        return delivery.stream or self._b.stream_key(delivery.topic)

    async def _ack_ids(self, ids: dict[str, list[str]]) -> None:
        pipe = self._b.client.pipeline(transaction=False)
        for key, entry_ids in ids.items():
            pipe.xack(key, self._group.key, *entry_ids)
        async with bounded_redis_call("events ack", self._b.timeout):
            await pipe.execute()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """XACK per stream in one pipeline; forget recorded failures."""
        by_stream: dict[str, list[str]] = defaultdict(list)
        retried: dict[str, list[str]] = defaultdict(list)
        for delivery in deliveries:
            by_stream[self._stream(delivery)].append(delivery.entry_id)
            if delivery.attempt > 1:
                retried[delivery.topic].append(_failure_field(delivery))
        pipe = self._b.client.pipeline(transaction=False)
        for key, ids in by_stream.items():
            pipe.xack(key, self._group.key, *ids)
        for topic, ids in retried.items():
            pipe.hdel(self._b.failures_key(topic, self._group), *ids)
        async with bounded_redis_call("events ack", self._b.timeout):
            await pipe.execute()
        for delivery in deliveries:
            self._untrack(delivery)

    async def record_failure(self, delivery: Delivery) -> None:
        """HSET the failed attempt number (with a TTL so leftovers expire)."""
        key = self._b.failures_key(delivery.topic, self._group)
        pipe = self._b.client.pipeline(transaction=False)
        pipe.hset(key, _failure_field(delivery), delivery.attempt)
        pipe.expire(key, FAILURES_TTL_SECONDS)
        async with bounded_redis_call("events record failure", self._b.timeout):
            await pipe.execute()

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """MULTI: XADD to the topic's dead letters, XACK, HDEL the failure count."""
        async with bounded_redis_call("events dead letter", self._b.timeout):
            seconds, micros = await self._b.client.time()
        pipe = self._b.client.pipeline(transaction=True)
        pipe.xadd(
            self._b.dead_letter_key(delivery.topic),
            {
                "e": delivery.raw,
                "group": self._group.group,
                "pattern": self._group.pattern,
                "error": error[:4000],
                "attempts": delivery.attempt,
                "time": seconds * 1000 + micros // 1000,
                "entry": delivery.entry_id,
            },
            maxlen=self._b.dead_letter_maxlen,
            approximate=True,
        )
        pipe.xack(self._stream(delivery), self._group.key, delivery.entry_id)
        pipe.hdel(self._b.failures_key(delivery.topic, self._group), _failure_field(delivery))
        async with bounded_redis_call("events dead letter", self._b.timeout):
            await pipe.execute()
        self._untrack(delivery)

    async def keepalive(self, deliveries: Sequence[Delivery]) -> None:
        """Renew lane leases and liveness; XCLAIM ... JUSTID held entries to reset their idle."""
        await self._heartbeat()  # also before any lane exists: fair shares need the count
        async with self._lane_lock:
            await self._renew_leases()
        # Also from here: a saturated consumer rarely fetches, yet must hand lanes over.
        self._next_lease = 0.0
        await self._share_lanes()
        by_stream: dict[str, list[str]] = defaultdict(list)
        # Entries waiting in the backlog are ours too: keep them from going idle and being
        # claimed (by others, or handed out twice by our own claim pass).
        for delivery in [*deliveries, *self._backlog]:
            by_stream[self._stream(delivery)].append(delivery.entry_id)
        if not by_stream:
            return
        pipe = self._b.client.pipeline(transaction=False)
        for key, ids in by_stream.items():
            pipe.xclaim(key, self._group.key, self._name, 0, list[Any](ids), justid=True)
        async with bounded_redis_call("events keepalive", self._b.timeout):
            await pipe.execute()

    async def close(self) -> None:
        """Stop; pending entries stay for other consumers to claim after ``claim_idle``.

        Lanes with nothing in flight are released at once (others take them over without
        waiting for the lease to lapse); a consumer that holds nothing is deleted from its
        groups, so restarts do not pile up consumer names in Redis.
        """
        self._closed = True
        for delivery in self._backlog:  # never handed out: left pending for the next holder
            self._untrack(delivery)
        self._backlog = []
        for key, (topic, lane) in list(self._held.items()):
            if not self._outstanding.get(key):
                await self._release_lane(key, topic, lane)
        async with bounded_redis_call("events close", self._b.timeout):
            await self._b.client.zrem(self._b.alive_key(self._group), self._name)
        for key in [*self._streams, *self._lanes]:
            async with bounded_redis_call("events close", self._b.timeout):
                held: Any = await self._b.client.xpending_range(
                    key, self._group.key, min="-", max="+", count=1, consumername=self._name
                )
                if not held:
                    await self._b.client.xgroup_delconsumer(key, self._group.key, self._name)
