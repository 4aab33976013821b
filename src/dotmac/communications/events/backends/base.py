"""The interface between :class:`~dotmac.communications.events.EventBus` and its backends.

Both backends model Redis Streams consumer groups: a *stream* per topic; a *consumer group* per
``(group, pattern)`` subscription that receives every matching event published after it was first
declared; inside a group each entry is *delivered* to one consumer and stays *pending* until that
consumer acknowledges it; entries pending longer than ``claim_idle`` are *claimed* by another
consumer of the group; failed entries move to a per-topic *dead-letter* stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from dotmac.communications.events._event import Event

__all__ = ["DeadLetter", "Delivery", "EventBackend", "GroupConsumer", "GroupId"]


@dataclass(frozen=True, slots=True)
class GroupId:
    """A consumer group: the subscriber's group name and the pattern it subscribed to."""

    group: str
    pattern: str

    @property
    def key(self) -> str:
        """The group's name on the backend (``group|pattern``)."""
        return f"{self.group}|{self.pattern}"


@dataclass(slots=True)
class Delivery:
    """One entry handed to a consumer.

    ``event`` is ``None`` when the entry could not be decoded; ``error`` then says why and the bus
    dead-letters it. ``attempt`` counts handler runs, including those of crashed consumers.
    """

    entry_id: str
    topic: str
    raw: bytes
    """The entry as stored (CloudEvents JSON); empty on the memory backend (see ``record``)."""
    event: Event | None
    attempt: int = 1
    error: str | None = None
    started: float = field(default=0.0, compare=False)
    record: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)
    """The memory backend's stored event (:meth:`Event.to_record`), rebuilt for each attempt."""
    stream: str = ""
    """The Redis stream the entry came from (a topic's main stream or one of its key lanes)."""

    def fresh_event(self) -> Event:
        """Decode the entry again (a retry must not see what a failed attempt changed).

        Raises:
            EventDecodeError: The stored entry is not a valid event.
        """
        if self.record is not None:
            return Event.from_record(self.record, self.attempt)
        return Event.from_json(self.raw, attempt=self.attempt)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered event, as :meth:`DeadLetters.list` returns it."""

    id: str
    """Id of the dead-letter entry (pass it to ``replay``/``purge``)."""
    topic: str
    group: str
    pattern: str
    error: str
    attempts: int
    time: datetime
    raw: bytes
    event: Event | None
    """The original event; ``None`` when the entry could not be decoded."""


class GroupConsumer(ABC):
    """One consumer in one group: fetches deliveries and settles them."""

    @abstractmethod
    async def fetch(self, count: int, timeout: float) -> list[Delivery]:
        """Return up to ``count`` deliveries: claimed idle entries first, then new ones.

        Waits up to ``timeout`` seconds when there is nothing; returns ``[]`` then.
        """

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge handled deliveries (they leave the pending list)."""

    @abstractmethod
    async def record_failure(self, delivery: Delivery) -> None:
        """Persist that ``delivery.attempt`` failed, so a claimer counts it."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Move ``delivery`` to the dead-letter stream and acknowledge it, atomically."""

    @abstractmethod
    async def keepalive(self, deliveries: Sequence[Delivery]) -> None:
        """Tell the backend these deliveries are still being worked on (no claim by others)."""

    def abandon(self, delivery: Delivery) -> None:  # noqa: B027 -- optional hook, no-op default
        """Forget a delivery the bus could not settle; it stays pending and is claimed later."""

    @abstractmethod
    async def close(self) -> None:
        """Stop fetching; pending deliveries stay pending for others to claim."""


class EventBackend(ABC):
    """Where events are stored and how groups consume them."""

    system: ClassVar[str]
    """``messaging.system`` of spans and metrics: ``memory`` or ``redis``."""

    @abstractmethod
    async def start(self) -> None:
        """Connect (if needed). Idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    @abstractmethod
    async def publish(self, events: Sequence[Event], timeout: float) -> list[str]:
        """Append events in order; return their entry ids.

        The bus has validated each event's data (``event.data_json()`` is cached). The memory
        backend stores all or nothing; Redis pipelines the batch (not atomic across topics).

        Raises:
            PublishTimeoutError: A bounded backend stayed full for ``timeout`` seconds.
            BackendUnavailableError: The backend cannot be reached.
        """

    def try_publish(self, event: Event) -> bool:
        """Store one event at once if that needs no waiting and no I/O; tell whether it did.

        The bus's fast path for a single publish (the memory backend with room in every
        group); ``False`` (the default) means the caller awaits :meth:`publish` instead.
        ``event.data_json()`` is cached, as for :meth:`publish`.
        """
        return False

    @abstractmethod
    async def declare_group(self, group: GroupId) -> None:
        """Create the group if new; it receives every matching event published from now on."""

    claim_idle: float
    """Seconds a delivery may stay unacknowledged and silent before another consumer claims it."""

    @abstractmethod
    def consumer(self, group: GroupId, name: str) -> GroupConsumer:
        """Return a consumer called ``name`` in ``group`` (declare the group first)."""

    @abstractmethod
    async def dead_letters(
        self, *, group: str | None, topic: str | None, limit: int
    ) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters, newest first, filtered by group and topic."""

    @abstractmethod
    async def replay(self, letters: Sequence[DeadLetter]) -> int:
        """Re-deliver each letter to its own group only (attempt 1) and remove it; return count."""

    @abstractmethod
    async def purge(self, letters: Sequence[DeadLetter]) -> int:
        """Delete dead letters; return how many were removed."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise when the backend is unusable (for health checks)."""
