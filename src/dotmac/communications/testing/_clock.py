"""A fake clock for tests: time moves only when something sleeps or the test advances it."""

from __future__ import annotations

import asyncio

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`~dotmac.communications._clock.Clock` that never really waits.

    ``sleep(n)`` advances the clock by ``n`` at once and yields to the event loop once, so code
    that backs off or waits for a token runs instantly while seeing the time it expects.

    Args:
        start: Initial monotonic reading.
        wall_start: Initial wall-clock reading (seconds since the epoch).
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._monotonic = start
        self._wall_offset = wall_start - start
        self.sleeps: list[float] = []
        """Every duration passed to :meth:`sleep`, in order."""

    def monotonic(self) -> float:
        """Return the fake monotonic time."""
        return self._monotonic

    def time(self) -> float:
        """Return the fake wall-clock time."""
        return self._monotonic + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``.

        Raises:
            ValueError: ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"cannot move a clock backwards (advance({seconds!r}))")
        self._monotonic += seconds

    async def sleep(self, seconds: float) -> None:
        """Record ``seconds``, advance the clock by it and yield to the loop once."""
        seconds = max(0.0, seconds)
        self.sleeps.append(seconds)
        self._monotonic += seconds
        await asyncio.sleep(0)
