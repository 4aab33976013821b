"""Clocks: the one seam through which the library reads time and sleeps.

Every component that waits or measures time takes a ``clock``; tests pass a
:class:`~dotmac.communications.testing.FakeClock` and never sleep for real.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock", "system_clock"]


@runtime_checkable
class Clock(Protocol):
    """What the library needs from a clock."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale, for durations and deadlines."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch, for timestamps."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (cancellable)."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`time.time` and :func:`asyncio.sleep`."""

    __slots__ = ()

    def monotonic(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()

    def time(self) -> float:
        """Return :func:`time.time`."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Await :func:`asyncio.sleep`."""
        await asyncio.sleep(seconds)


system_clock: Clock = SystemClock()
"""The shared real clock used when no clock is injected."""
