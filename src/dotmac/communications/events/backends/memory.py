"""In-process backend with the consumer-group semantics of Redis Streams.

Nothing leaves the process, but everything else behaves as on Redis: groups, pending entries,
acknowledgement, claiming after ``claim_idle``, dead letters and replay. Queues are bounded:
publishing into a full group whose consumers are running waits (backpressure) and fails with
:class:`~dotmac.communications.errors.PublishTimeoutError` after its timeout; a full group with
no consumer attached (its bus stopped, or it unsubscribed) drops its oldest events instead, as
``XADD MAXLEN`` does on Redis, and counts them in ``dotmac.events.dropped``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import ConfigurationError, PublishTimeoutError
from dotmac.communications.events._event import Event
from dotmac.communications.events._topics import compile_pattern
from dotmac.communications.observability import metrics

from .base import DeadLetter, Delivery, EventBackend, GroupConsumer, GroupId

__all__ = ["MemoryBackend"]

log = logging.getLogger("dotmac.communications.events")

_DROPPED = "dotmac.events.dropped"


# An entry is a plain tuple (id, topic, Event.to_record()): all immutable values, so the garbage
# collector stops tracking it and a long queue costs collections nothing.
_Entry = tuple[str, str, tuple[Any, ...]]


class _MemoryDelivery(Delivery):
    """A delivery that is also its group's pending entry.

    The group's pending list maps an entry id to the delivery that owns it: a claim replaces
    it with the claimer's, so only the current owner (compared by identity) settles it.
    """

    __slots__ = ("claimed_at", "deliveries", "entry", "failures")

    def __init__(self, entry: _Entry, claimed_at: float, deliveries: int, failures: int) -> None:
        # Written out rather than Delivery.__init__(...): this runs once per delivered event.
        attempt = deliveries if deliveries > failures else failures + 1
        entry_id, topic, record = entry
        self.entry_id = entry_id
        self.topic = topic
        self.raw = b""
        self.event = Event.from_record(record, attempt)
        self.attempt = attempt
        self.error = None
        self.started = 0.0
        self.record = record
        self.stream = ""
        self.entry = entry
        self.claimed_at = claimed_at
        self.deliveries = deliveries
        self.failures = failures


class _Group:
    __slots__ = ("available", "consumers", "dropped", "gid", "matcher", "pending", "queue", "space")

    def __init__(self, gid: GroupId) -> None:
        self.gid = gid
        self.consumers = 0
        self.dropped = 0
        self.matcher: re.Pattern[str] = compile_pattern(gid.pattern)
        self.queue: deque[_Entry] = deque()
        self.pending: dict[str, _MemoryDelivery] = {}
        self.available = asyncio.Event()
        self.space = asyncio.Event()
        self.space.set()

    def size(self) -> int:
        return len(self.queue) + len(self.pending)

    def make_room(self, count: int, maxlen: int) -> None:
        """With no consumer attached, drop the oldest queued entries (like Redis MAXLEN ~)."""
        excess = self.size() + count - maxlen
        if excess <= 0 or self.consumers:
            return
        drop = min(excess, len(self.queue))
        for _ in range(drop):
            self.queue.popleft()
        if drop:
            if not self.dropped:
                log.warning(
                    "events: group %r has no consumer and is full (%d); dropping its oldest "
                    "events until one attaches",
                    self.gid.key, maxlen,
                )  # fmt: skip
            self.dropped += drop
            metrics.counter(_DROPPED, unit="{message}").add(
                drop,
                {"messaging.system": "memory", "messaging.consumer.group.name": self.gid.group},
            )


class MemoryBackend(EventBackend):
    """Events in this process only; the embedded default.

    Several :class:`~dotmac.communications.events.EventBus` instances may share one backend:
    they are then several consumers of the same groups, as separate processes are on Redis.

    Args:
        maxlen: Most entries a group holds (queued plus pending) before publishing waits.
        dead_letter_maxlen: Most dead letters kept; the oldest go first.
        claim_idle: Seconds a delivery may stay unacknowledged before another consumer of the
            group claims it.
        clock: Clock for idle times (claims).
    """

    system = "memory"

    def __init__(
        self,
        *,
        maxlen: int = 10_000,
        dead_letter_maxlen: int = 10_000,
        claim_idle: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        if maxlen < 1 or dead_letter_maxlen < 1 or not claim_idle > 0:
            raise ConfigurationError(
                f"MemoryBackend: maxlen ({maxlen}) and dead_letter_maxlen "
                f"({dead_letter_maxlen}) must be >= 1 and claim_idle ({claim_idle}) > 0"
            )
        self.maxlen = maxlen
        self.claim_idle = claim_idle
        self.clock = clock or system_clock
        self._groups: dict[GroupId, _Group] = {}
        self._by_topic: dict[str, list[_Group]] = {}
        self._ids = itertools.count(1)
        self._dead: deque[DeadLetter] = deque(maxlen=dead_letter_maxlen)
        self._dead_ids = itertools.count(1)

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to release; stored events stay for consumers of this backend object."""

    async def ping(self) -> None:
        """Always usable."""

    async def declare_group(self, group: GroupId) -> None:
        """Create the group; it receives matching events published from now on."""
        self._group(group)

    def _group(self, gid: GroupId) -> _Group:
        group = self._groups.get(gid)
        if group is None:
            group = self._groups[gid] = _Group(gid)
            self._by_topic.clear()
        return group

    def _matching(self, topic: str) -> list[_Group]:
        groups = self._by_topic.get(topic)
        if groups is None:
            groups = [g for g in self._groups.values() if g.matcher.match(topic)]
            self._by_topic[topic] = groups
        return groups

    def try_publish(self, event: Event) -> bool:
        """Append one event to every matching group unless one of them is full."""
        groups = self._by_topic.get(event.type)
        if groups is None:
            groups = self._matching(event.type)
        maxlen = self.maxlen
        for group in groups:
            if len(group.queue) + len(group.pending) >= maxlen:
                if group.consumers:
                    return False  # backpressure: publish() waits for room
                group.make_room(1, maxlen)
        entry = (str(next(self._ids)), event.type, event.to_record())
        for group in groups:
            queue = group.queue
            queue.append(entry)
            if len(queue) == 1:  # a consumer waits only after finding its queue empty
                group.available.set()
        return True

    async def publish(self, events: Sequence[Event], timeout: float) -> list[str]:
        """Append to every matching group, waiting while one is full (all or nothing)."""
        targets = [self._matching(event.type) for event in events]
        await self._wait_for_space(targets, timeout)
        ids = []
        for event, groups in zip(events, targets, strict=True):
            entry = (str(next(self._ids)), event.type, event.to_record())
            ids.append(entry[0])
            for group in groups:
                group.queue.append(entry)
                group.available.set()
        return ids

    async def _wait_for_space(self, targets: list[list[_Group]], timeout: float) -> None:
        need: dict[_Group, int] = {}
        for groups in targets:
            for group in groups:
                need[group] = need.get(group, 0) + 1
        for group, count in need.items():
            if count > self.maxlen:
                raise PublishTimeoutError(
                    f"batch puts {count} events in group {group.gid.key!r}, more than its "
                    f"capacity of {self.maxlen} (events.maxlen)"
                )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for group, count in need.items():
                group.make_room(count, self.maxlen)
            full = [g for g, count in need.items() if g.size() + count > self.maxlen]
            if not full:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PublishTimeoutError(
                    f"group {full[0].gid.key!r} stayed full ({self.maxlen} events) for "
                    f"{timeout}s; its consumers are not keeping up"
                )
            full[0].space.clear()
            try:
                async with asyncio.timeout(remaining):
                    await full[0].space.wait()
            except TimeoutError:
                continue

    def consumer(self, group: GroupId, name: str) -> GroupConsumer:
        """A consumer of ``group`` (declared if new)."""
        state = self._group(group)
        state.consumers += 1
        state.dropped = 0
        return _MemoryConsumer(self, state, self.claim_idle)

    # -------------------------------------------------------------------------- dead letters
    def _add_dead(self, group: _Group, pending: _MemoryDelivery, attempts: int, error: str) -> None:
        _, topic, record = pending.entry
        event = Event.from_record(record)
        self._dead.append(
            DeadLetter(
                id=str(next(self._dead_ids)),
                topic=topic,
                group=group.gid.group,
                pattern=group.gid.pattern,
                error=error,
                attempts=attempts,
                time=datetime.fromtimestamp(self.clock.time(), UTC),
                raw=event.to_json(),
                event=event,
            )
        )

    async def dead_letters(
        self, *, group: str | None, topic: str | None, limit: int
    ) -> list[DeadLetter]:
        """Newest first."""
        out: list[DeadLetter] = []
        for letter in reversed(self._dead):
            if (group is None or letter.group == group) and (
                topic is None or letter.topic == topic
            ):
                out.append(letter)
                if len(out) >= limit:
                    break
        return out

    async def replay(self, letters: Sequence[DeadLetter]) -> int:
        """Queue each letter again in its own group only, then remove it."""
        wanted = {letter.id for letter in letters}
        replayed = 0
        for letter in [d for d in self._dead if d.id in wanted]:
            group = self._group(GroupId(letter.group, letter.pattern))
            template = letter.event if letter.event is not None else Event.from_json(letter.raw)
            entry = (str(next(self._ids)), letter.topic, template.to_record())
            group.queue.append(entry)
            group.available.set()
            self._dead.remove(letter)
            replayed += 1
        return replayed

    async def purge(self, letters: Sequence[DeadLetter]) -> int:
        """Remove the given dead letters."""
        wanted = {letter.id for letter in letters}
        before = len(self._dead)
        kept = [d for d in self._dead if d.id not in wanted]
        self._dead.clear()
        self._dead.extend(kept)
        return before - len(self._dead)


class _MemoryConsumer(GroupConsumer):
    __slots__ = ("_backend", "_claim_idle", "_closed", "_group", "_last_scan")

    def __init__(self, backend: MemoryBackend, group: _Group, claim_idle: float) -> None:
        self._backend = backend
        self._group = group
        self._claim_idle = claim_idle
        self._last_scan = backend.clock.monotonic()
        self._closed = False

    def _claim(self, count: int, now: float) -> list[Delivery]:
        # Scanning the pending list costs O(pending), so it runs a few times per claim_idle.
        if now - self._last_scan < self._claim_idle / 4:
            return []
        self._last_scan = now
        pending = self._group.pending
        idle = [d for d in pending.values() if now - d.claimed_at >= self._claim_idle][:count]
        out: list[Delivery] = []
        for old in idle:
            # The claimer's delivery replaces the old one: the old owner can no longer settle it.
            new = pending[old.entry_id] = _MemoryDelivery(
                old.entry, now, old.deliveries + 1, old.failures
            )
            out.append(new)
        return out

    async def fetch(self, count: int, timeout: float) -> list[Delivery]:
        """Claimed idle entries first, then new ones; waits up to ``timeout`` for either."""
        group = self._group
        clock = self._backend.clock
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._closed:
            now = clock.monotonic()
            out = self._claim(count, now)
            queue = group.queue
            pending = group.pending
            popleft = queue.popleft
            for _ in range(min(count - len(out), len(queue))):
                delivery = _MemoryDelivery(popleft(), now, 1, 0)
                pending[delivery.entry_id] = delivery
                out.append(delivery)
            if out:
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            group.available.clear()
            # Wake at least a few times per claim_idle so idle entries get claimed.
            try:
                async with asyncio.timeout(min(remaining, self._claim_idle / 4)):
                    await group.available.wait()
            except TimeoutError:
                continue
        return []

    def _owned(self, delivery: Delivery) -> _MemoryDelivery | None:
        # Only the current owner counts: a claimer may have taken the entry over.
        entry = self._group.pending.get(delivery.entry_id)
        return entry if entry is delivery else None

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove the deliveries from the pending list."""
        pending = self._group.pending
        for delivery in deliveries:
            entry_id = delivery.entry_id
            if pending.get(entry_id) is delivery:
                del pending[entry_id]
        self._group.space.set()

    async def record_failure(self, delivery: Delivery) -> None:
        """Remember the failed attempt for a future claimer."""
        entry = self._owned(delivery)
        if entry is not None:
            entry.failures = max(entry.failures, delivery.attempt)

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Move to the dead letters and acknowledge."""
        entry = self._owned(delivery)
        if entry is not None:
            del self._group.pending[entry.entry_id]
            self._group.space.set()
            self._backend._add_dead(self._group, entry, delivery.attempt, error)

    async def keepalive(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of deliveries still being handled."""
        now = self._backend.clock.monotonic()
        for delivery in deliveries:
            entry = self._owned(delivery)
            if entry is not None:
                entry.claimed_at = now

    async def close(self) -> None:
        """Stop fetching; what is pending stays claimable by the group's other consumers."""
        if not self._closed:
            self._closed = True
            self._group.consumers -= 1
        self._group.available.set()
