"""The one-process backend: the gateway's own connections are the only subscribers."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import WebSocketError
from dotmac.communications.websockets._protocol import StreamPosition

from .base import Deliver, GatewayBackend, HistoryReplay, new_epoch, with_position

__all__ = ["MemoryBackend"]

_PRUNE_MIN = 1024  # histories kept before expired ones are looked for


@dataclass(slots=True)
class _History:
    epoch: str
    size: int
    ttl: float
    last_time: float
    offset: int = 0  # of the last message appended
    frames: deque[tuple[int, bytes]] = field(default_factory=deque)


class MemoryBackend(GatewayBackend):
    """Deliver locally only: one process, no other gateway to reach.

    :meth:`publish` has nobody to carry a frame to (the gateway already delivered it to every
    local subscriber), so it does nothing. The channels the gateway reported are kept in
    :attr:`channels`, which shows what a networked backend would be subscribed to. Presence and
    history live in this process's memory (history is lost with it: a restarted gateway starts
    a new epoch, and clients get ``recovered: false``).

    Args:
        clock: Time source for the history TTL.
    """

    name: ClassVar[str] = "memory"

    def __init__(self, *, clock: Clock = system_clock) -> None:
        self._clock = clock
        self._channels: set[str] = set()
        self._deliver: Deliver | None = None
        self._presence: dict[str, dict[str, int]] = {}
        self._history: dict[str, _History] = {}
        self._prune_at = _PRUNE_MIN

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
        """Forget the gateway, its channels and presence (history stays until the TTL)."""
        self._deliver = None
        self._channels.clear()
        self._presence.clear()

    async def publish(self, channel: str, frame: bytes) -> None:
        """Nothing to do: there is no other process."""

    async def subscribe_channel(self, channel: str) -> None:
        """Record that ``channel`` has a local subscriber."""
        self._channels.add(channel)

    async def unsubscribe_channel(self, channel: str) -> None:
        """Record that ``channel`` lost its last local subscriber."""
        self._channels.discard(channel)

    # -- presence --------------------------------------------------------------------------

    async def set_presence(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Record the counts; announce users whose count went from or to zero."""
        deliver = self._deliver
        for (channel, user_id), count in counts.items():
            users = self._presence.setdefault(channel, {})
            before = users.get(user_id, 0)
            if count > 0:
                users[user_id] = count
            else:
                users.pop(user_id, None)
                if not users:
                    del self._presence[channel]
            if deliver is None or (before > 0) == (count > 0):
                continue
            self._announce(deliver, channel, user_id, "join" if count > 0 else "leave")

    async def presence(self, channel: str) -> dict[str, int]:
        """The users subscribed to ``channel`` here, with their connection count."""
        return dict(self._presence.get(channel, {}))

    # -- history ---------------------------------------------------------------------------

    def _live_history(self, channel: str) -> _History | None:
        history = self._history.get(channel)
        if history is not None and self._clock.time() - history.last_time > history.ttl:
            del self._history[channel]
            return None
        return history

    async def publish_history(self, channel: str, frame: bytes, *, size: int, ttl: float) -> bytes:
        """Append ``frame`` with the next offset; the epoch changes once the history expired."""
        now = self._clock.time()
        history = self._live_history(channel)
        if history is None:
            if len(self._history) >= self._prune_at:
                self._prune(now)
            history = self._history[channel] = _History(new_epoch(), size, ttl, now)
        history.last_time = now
        history.size = size
        history.ttl = ttl
        history.offset += 1
        positioned = with_position(frame, history.offset, history.epoch)
        frames = history.frames
        frames.append((history.offset, positioned))
        while len(frames) > size:
            frames.popleft()
        return positioned

    def _prune(self, now: float) -> None:
        """Forget expired histories; prune again once the live ones have doubled."""
        self._history = {
            channel: history
            for channel, history in self._history.items()
            if now - history.last_time <= history.ttl
        }
        self._prune_at = max(_PRUNE_MIN, 2 * len(self._history))

    async def read_history(self, channel: str, since: StreamPosition) -> HistoryReplay:
        """Replay what follows ``since`` when it is still in history and of the same epoch."""
        history = self._live_history(channel)
        if history is None or history.epoch != since.epoch or since.offset > history.offset:
            return HistoryReplay([], False, since.offset)
        first = history.frames[0][0] if history.frames else history.offset + 1
        if since.offset < first - 1:  # messages after the position were trimmed away
            return HistoryReplay([], False, since.offset)
        frames = [frame for offset, frame in history.frames if offset > since.offset]
        return HistoryReplay(frames, True, history.offset)
