"""Where the notification service keeps its state.

Idempotency claims, results, status history, scheduled notifications, dead letters and
suppressed recipients.

:class:`MemoryStore` (the embedded default) keeps it in this process; :class:`RedisStore` shares it
between processes and survives restarts. Both pass one contract test suite.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ._models import Notification, NotificationResult

__all__ = ["NotificationDeadLetter", "NotificationStore", "StatusEntry"]


@dataclass(frozen=True, slots=True)
class StatusEntry:
    """One step of a notification's delivery history."""

    time: datetime
    event: str
    """``scheduled``, ``cancelled``, ``attempt_failed``, ``sent``, ``failed``, ``suppressed`` or
    ``replayed``."""
    recipient: str | None = None
    provider: str | None = None
    attempt: int = 0
    error: str | None = None
    provider_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class NotificationDeadLetter:
    """A delivery that failed after every attempt, kept with what is needed to replay it."""

    id: str
    notification: Notification
    recipient: str
    error: str
    attempts: int
    time: datetime
    provider: str | None = None


class NotificationStore(abc.ABC):
    """State of the notification service (see the module docstring)."""

    async def start(self) -> None:  # noqa: B027 -- optional hook
        """Connect (Redis) and load scripts."""

    async def close(self) -> None:  # noqa: B027 -- optional hook
        """Release connections the store created."""

    async def ping(self) -> None:  # noqa: B027 -- optional hook
        """Raise a library error when the store is unusable (health check)."""

    # ---------------------------------------------------------------------------- idempotency
    @abc.abstractmethod
    async def claim(self, key: str, notification_id: str, ttl: float) -> str | None:
        """Atomically take ``key`` for ``notification_id`` for ``ttl`` seconds.

        Returns:
            None when the key was free and is now held; else the id of the notification that
            holds it (also from another process).
        """

    @abc.abstractmethod
    async def release(self, key: str, notification_id: str) -> None:
        """Free ``key`` if ``notification_id`` holds it (the send was refused before sending)."""

    @abc.abstractmethod
    async def save_result(self, result: NotificationResult, ttl: float) -> None:
        """Keep ``result`` for ``ttl`` seconds (what a deduplicated send returns)."""

    @abc.abstractmethod
    async def get_result(self, notification_id: str) -> NotificationResult | None:
        """The saved result, or None (unknown, expired, or still being sent)."""

    # -------------------------------------------------------------------------------- history
    @abc.abstractmethod
    async def record(
        self, notification_id: str, entries: Sequence[StatusEntry], ttl: float
    ) -> None:
        """Append entries to the notification's history (kept ``ttl`` seconds after the last)."""

    @abc.abstractmethod
    async def history(self, notification_id: str) -> list[StatusEntry]:
        """The history in the order recorded; empty when unknown."""

    # ----------------------------------------------------------------------------- scheduling
    @abc.abstractmethod
    async def schedule(self, notification: Notification) -> None:
        """Store ``notification`` (its ``send_at`` set) until it is due."""

    @abc.abstractmethod
    async def take_due(self, now: datetime, limit: int, lease: float) -> list[Notification]:
        """Take up to ``limit`` notifications due at ``now``, each leased for ``lease`` seconds.

        A taken notification is not returned again until its lease runs out; one whose lease ran
        out without :meth:`finish_scheduled` (its process died) is returned again.
        """

    @abc.abstractmethod
    async def finish_scheduled(self, notification_id: str) -> None:
        """Forget a scheduled notification once it has been sent (or failed for good)."""

    @abc.abstractmethod
    async def cancel_scheduled(self, notification_id: str) -> bool:
        """Remove a scheduled notification not yet taken; True if it was there."""

    @abc.abstractmethod
    async def scheduled_count(self) -> int:
        """How many notifications wait (taken ones included)."""

    # --------------------------------------------------------------------------- dead letters
    @abc.abstractmethod
    async def add_dead(self, letter: NotificationDeadLetter) -> None:
        """Keep a dead letter (the oldest go first past the store's cap)."""

    @abc.abstractmethod
    async def dead_letters(
        self, *, channel: str | None = None, limit: int = 100
    ) -> list[NotificationDeadLetter]:
        """Dead letters, newest first, optionally of one channel."""

    @abc.abstractmethod
    async def remove_dead(self, letter_ids: Sequence[str]) -> int:
        """Remove the given dead letters; return how many were there."""

    # ---------------------------------------------------------------------------- suppression
    @abc.abstractmethod
    async def suppress(self, channel: str, recipient: str, reason: str) -> None:
        """Mark a recipient as gone on a channel (push token unregistered)."""

    @abc.abstractmethod
    async def unsuppress(self, channel: str, recipient: str) -> bool:
        """Lift a suppression (the user opted in again); True if there was one."""

    @abc.abstractmethod
    async def suppressed(self, channel: str, recipient: str) -> str | None:
        """The reason the recipient was suppressed, or None."""
