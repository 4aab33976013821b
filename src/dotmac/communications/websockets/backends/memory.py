"""The one-process backend: the gateway's own connections are the only subscribers."""

from __future__ import annotations

from typing import ClassVar

from dotmac.communications.errors import WebSocketError

from .base import Deliver, GatewayBackend

__all__ = ["MemoryBackend"]


class MemoryBackend(GatewayBackend):
    """Deliver locally only: one process, no other gateway to reach.

    :meth:`publish` has nobody to carry a frame to (the gateway already delivered it to every
    local subscriber), so it does nothing. The channels the gateway reported are kept in
    :attr:`channels`, which shows what a networked backend would be subscribed to.
    """

    name: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self._channels: set[str] = set()
        self._deliver: Deliver | None = None

    @property
    def channels(self) -> frozenset[str]:
        """Channels that have local subscribers, as the gateway reported them."""
        return frozenset(self._channels)

    async def start(self, deliver: Deliver) -> None:
        """Remember ``deliver`` (nothing arrives from elsewhere).

        Raises:
            WebSocketError: The backend is already started.
        """
        if self._deliver is not None:
            raise WebSocketError("MemoryBackend is already started (one gateway per backend)")
        self._deliver = deliver

    async def close(self) -> None:
        """Forget the gateway and its channels."""
        self._deliver = None
        self._channels.clear()

    async def publish(self, channel: str, frame: bytes) -> None:
        """Nothing to do: there is no other process."""

    async def subscribe_channel(self, channel: str) -> None:
        """Record that ``channel`` has a local subscriber."""
        self._channels.add(channel)

    async def unsubscribe_channel(self, channel: str) -> None:
        """Record that ``channel`` lost its last local subscriber."""
        self._channels.discard(channel)
