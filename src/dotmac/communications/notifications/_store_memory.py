"""The embedded notification store: everything in this process, bounded, expiring lazily.

Entries with a TTL are dropped when they are met after their expiry, and every map has a cap
(the oldest entries go first past it), so a long-running process never grows without bound.
Time comes from the injected :class:`~dotmac.communications._clock.Clock` (monotonic for TTLs,
wall time for cancelling an item whose lease lapsed).

Notifications are kept as their JSON, exactly as :class:`RedisStore` keeps them, so both stores
return the same thing (a ``context`` value that JSON cannot carry fails at :meth:`schedule` here
as it would on Redis, and a caller mutating a notification after scheduling it changes nothing).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict, deque
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import ConfigurationError, NotificationError

from ._models import Notification, NotificationResult
from ._store import NotificationDeadLetter, NotificationStore, StatusEntry

__all__ = ["MemoryStore", "decode_notification", "encode_notification"]

V = TypeVar("V")


def encode_notification(notification: Notification) -> bytes:
    """Serialise ``notification`` to JSON (attachments' bytes as base64).

    Raises:
        NotificationError: A value (in ``context`` or ``data``) cannot be written as JSON.
    """
    try:
        return notification.model_dump_json().encode()
    except PydanticSerializationError as exc:
        raise NotificationError(
            f"notification {notification.id!r} cannot be stored: a value is not "
            f"JSON-serialisable ({exc})"
        ) from exc


def decode_notification(raw: bytes | str) -> Notification:
    """Parse what :func:`encode_notification` wrote.

    Raises:
        NotificationError: ``raw`` is not a valid notification (a corrupt store entry).
    """
    try:
        return Notification.model_validate_json(raw)
    except ValidationError as exc:
        raise NotificationError(f"stored notification is invalid: {exc}") from exc


def _positive(what: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{what} must be > 0 seconds, got {value!r}")


def _check_caps(**caps: int) -> None:
    for name, value in caps.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"MemoryStore: {name} must be an int >= 1, got {value!r}")


class MemoryStore(NotificationStore):
    """Notification state in this process (the embedded default).

    Args:
        clock: Time source (tests pass a ``FakeClock``).
        max_dead_letters: Dead letters kept; the oldest go first past it.
        max_history: Status entries kept per notification; the oldest go first past it.
        max_results: Cap on each per-notification map (idempotency claims, results and
            histories). Past it, expired entries are dropped, then the oldest live ones.
        max_scheduled: Scheduled notifications kept at once; :meth:`schedule` refuses more.
        max_suppressed: Suppressed recipients kept; the oldest are forgotten past it (a
            forgotten recipient is tried once more and suppressed again).

    Raises:
        ConfigurationError: A cap is not an int >= 1.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        max_dead_letters: int = 10_000,
        max_history: int = 1_000,
        max_results: int = 10_000,
        max_scheduled: int = 100_000,
        max_suppressed: int = 100_000,
    ) -> None:
        _check_caps(
            max_dead_letters=max_dead_letters,
            max_history=max_history,
            max_results=max_results,
            max_scheduled=max_scheduled,
            max_suppressed=max_suppressed,
        )
        self._clock = clock or system_clock
        self.max_dead_letters = max_dead_letters
        self.max_history = max_history
        self.max_results = max_results
        self.max_scheduled = max_scheduled
        self.max_suppressed = max_suppressed
        # Maps with a TTL hold (value, expires at monotonic); insertion order = age.
        self._claims: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._results: OrderedDict[str, tuple[NotificationResult, float]] = OrderedDict()
        self._history: OrderedDict[str, tuple[deque[StatusEntry], float]] = OrderedDict()
        self._items: dict[str, bytes] = {}  # scheduled id -> notification JSON
        self._queue: dict[str, datetime] = {}  # waiting id -> send_at
        self._leased: dict[str, datetime] = {}  # taken id -> lease end
        self._dead: OrderedDict[str, tuple[NotificationDeadLetter, bytes]] = OrderedDict()
        self._suppressed: OrderedDict[tuple[str, str], str] = OrderedDict()

    # ------------------------------------------------------------------------------- helpers
    def _live(self, table: OrderedDict[str, tuple[V, float]], key: str) -> V | None:
        entry = table.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock.monotonic():
            del table[key]
            return None
        return entry[0]

    def _put(
        self, table: OrderedDict[str, tuple[V, float]], key: str, value: V, ttl: float
    ) -> None:
        now = self._clock.monotonic()
        table.pop(key, None)  # re-inserting moves the key to the young end
        cap = self.max_results
        if len(table) >= cap:
            # Oldest first; entries of one table share their TTL, so the expired ones are at
            # the old end: drop the oldest past the cap, then the expired ones, never scanning
            # the table.
            while len(table) >= cap:
                table.popitem(last=False)
            while table and next(iter(table.values()))[1] <= now:
                table.popitem(last=False)
        table[key] = (value, now + ttl)

    # --------------------------------------------------------------------------- idempotency
    async def claim(self, key: str, notification_id: str, ttl: float) -> str | None:
        """See :meth:`NotificationStore.claim`."""
        _positive("claim ttl", ttl)
        holder = self._live(self._claims, key)
        if holder is not None:
            return holder
        self._put(self._claims, key, notification_id, ttl)
        return None

    async def release(self, key: str, notification_id: str) -> None:
        """See :meth:`NotificationStore.release`."""
        if self._live(self._claims, key) == notification_id:
            del self._claims[key]

    async def save_result(self, result: NotificationResult, ttl: float) -> None:
        """See :meth:`NotificationStore.save_result`."""
        _positive("result ttl", ttl)
        self._put(self._results, result.id, result, ttl)

    async def get_result(self, notification_id: str) -> NotificationResult | None:
        """See :meth:`NotificationStore.get_result`."""
        return self._live(self._results, notification_id)

    # ------------------------------------------------------------------------------- history
    async def record(
        self, notification_id: str, entries: Sequence[StatusEntry], ttl: float
    ) -> None:
        """See :meth:`NotificationStore.record`."""
        _positive("history ttl", ttl)
        if not entries:
            return
        kept = self._live(self._history, notification_id)
        if kept is None:
            kept = deque(maxlen=self.max_history)
        kept.extend(entries)
        self._put(self._history, notification_id, kept, ttl)

    async def history(self, notification_id: str) -> list[StatusEntry]:
        """See :meth:`NotificationStore.history`."""
        kept = self._live(self._history, notification_id)
        return list(kept) if kept is not None else []

    # ---------------------------------------------------------------------------- scheduling
    async def schedule(self, notification: Notification) -> None:
        """See :meth:`NotificationStore.schedule`; scheduling an id again replaces it.

        Raises:
            NotificationError: ``send_at`` is unset, a value is not JSON-serialisable, or
                ``max_scheduled`` notifications already wait.
        """
        if notification.send_at is None:
            raise NotificationError(f"notification {notification.id!r} has no send_at to wait for")
        raw = encode_notification(notification)
        if notification.id not in self._items and len(self._items) >= self.max_scheduled:
            raise NotificationError(
                f"cannot schedule {notification.id!r}: {self.max_scheduled} notifications "
                "already wait (MemoryStore max_scheduled)",
                transient=True,
            )
        self._items[notification.id] = raw
        self._leased.pop(notification.id, None)
        self._queue[notification.id] = notification.send_at

    async def take_due(self, now: datetime, limit: int, lease: float) -> list[Notification]:
        """See :meth:`NotificationStore.take_due`.

        Items whose lease lapsed come first (oldest lease first), then due ones by ``send_at``;
        ties are broken by id, as on Redis.
        """
        _positive("lease", lease)
        if now.utcoffset() is None:
            raise ValueError(f"now must be timezone-aware, got {now!r}")
        if limit < 1:
            return []
        until = now + timedelta(seconds=lease)
        lapsed = heapq.nsmallest(
            limit, ((end, nid) for nid, end in self._leased.items() if end <= now)
        )
        due = heapq.nsmallest(
            limit - len(lapsed), ((at, nid) for nid, at in self._queue.items() if at <= now)
        )
        taken: list[Notification] = []
        for _, nid in (*lapsed, *due):
            self._queue.pop(nid, None)
            self._leased[nid] = until
            taken.append(decode_notification(self._items[nid]))
        return taken

    async def finish_scheduled(self, notification_id: str) -> None:
        """See :meth:`NotificationStore.finish_scheduled`."""
        self._items.pop(notification_id, None)
        self._queue.pop(notification_id, None)
        self._leased.pop(notification_id, None)

    async def cancel_scheduled(self, notification_id: str) -> bool:
        """See :meth:`NotificationStore.cancel_scheduled`.

        A taken notification whose lease lapsed (its sender died) counts as waiting again.
        """
        lease_end = self._leased.get(notification_id)
        if notification_id in self._queue or (
            lease_end is not None and lease_end <= datetime.fromtimestamp(self._clock.time(), UTC)
        ):
            await self.finish_scheduled(notification_id)
            return True
        return False

    async def scheduled_count(self) -> int:
        """See :meth:`NotificationStore.scheduled_count`."""
        return len(self._items)

    # -------------------------------------------------------------------------- dead letters
    async def add_dead(self, letter: NotificationDeadLetter) -> None:
        """See :meth:`NotificationStore.add_dead`; adding an id again makes it the newest."""
        raw = encode_notification(letter.notification)
        self._dead.pop(letter.id, None)
        self._dead[letter.id] = (letter, raw)
        while len(self._dead) > self.max_dead_letters:
            self._dead.popitem(last=False)

    async def dead_letters(
        self, *, channel: str | None = None, limit: int = 100
    ) -> list[NotificationDeadLetter]:
        """See :meth:`NotificationStore.dead_letters`."""
        found: list[NotificationDeadLetter] = []
        for letter, raw in reversed(self._dead.values()):
            if len(found) >= limit:
                break
            if channel is None or letter.notification.channel == channel:
                found.append(dataclasses.replace(letter, notification=decode_notification(raw)))
        return found

    async def remove_dead(self, letter_ids: Sequence[str]) -> int:
        """See :meth:`NotificationStore.remove_dead`."""
        return sum(self._dead.pop(letter_id, None) is not None for letter_id in set(letter_ids))

    # --------------------------------------------------------------------------- suppression
    async def suppress(self, channel: str, recipient: str, reason: str) -> None:
        """See :meth:`NotificationStore.suppress`."""
        key = (str(channel), recipient)
        self._suppressed.pop(key, None)
        self._suppressed[key] = reason
        while len(self._suppressed) > self.max_suppressed:
            self._suppressed.popitem(last=False)

    async def unsuppress(self, channel: str, recipient: str) -> bool:
        """See :meth:`NotificationStore.unsuppress`."""
        return self._suppressed.pop((str(channel), recipient), None) is not None

    async def suppressed(self, channel: str, recipient: str) -> str | None:
        """See :meth:`NotificationStore.suppressed`."""
        return self._suppressed.get((str(channel), recipient))
