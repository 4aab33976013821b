"""``bus.dead_letters``: list, replay and purge events that exhausted their attempts."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager

from .backends.base import DeadLetter, EventBackend

__all__ = ["DeadLetters"]

_ALL = 1_000_000


class DeadLetters:
    """The dead letters of one bus's backend (every group, every topic).

    Usable on a stopped bus too (an operator's script): the backend is then opened for the
    call and closed after it.
    """

    def __init__(
        self,
        backend: EventBackend,
        opened: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self._backend = backend
        self._opened = opened or _nothing

    async def list(
        self, group: str | None = None, *, topic: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Return dead letters, newest first.

        Args:
            group: Only this consumer group's.
            topic: Only this topic's.
            limit: At most this many.

        Raises:
            ValueError: ``limit`` is below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        async with self._opened():
            return await self._backend.dead_letters(group=group, topic=topic, limit=limit)

    async def _select(
        self, entry_ids: Iterable[str] | None, group: str | None, topic: str | None
    ) -> builtins.list[DeadLetter]:
        letters = await self._backend.dead_letters(group=group, topic=topic, limit=_ALL)
        if entry_ids is None:
            return letters
        wanted = set(entry_ids)
        return [letter for letter in letters if letter.id in wanted]

    async def replay(
        self,
        entry_ids: Iterable[str] | None = None,
        *,
        group: str | None = None,
        topic: str | None = None,
    ) -> int:
        """Deliver dead letters again, each to the group that failed it only (attempt 1).

        Args:
            entry_ids: Ids from :meth:`list`; ``None`` replays every letter that matches the
                filters.
            group: Only this group's letters.
            topic: Only this topic's letters.

        Returns:
            How many were replayed (and removed from the dead letters).
        """
        async with self._opened():
            return await self._backend.replay(await self._select(entry_ids, group, topic))

    async def purge(
        self,
        entry_ids: Iterable[str] | None = None,
        *,
        group: str | None = None,
        topic: str | None = None,
    ) -> int:
        """Delete dead letters for good; same selection as :meth:`replay`.

        Returns:
            How many were deleted.
        """
        async with self._opened():
            return await self._backend.purge(await self._select(entry_ids, group, topic))


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield
