"""The seam between the gateway and the way its messages reach other processes.

A gateway delivers every message to its own connections itself and hands the encoded frame to its
backend, which carries it to the gateways of other processes. Each process receives only what it
has clients for: the gateway tells its backend which channels have local subscribers
(:meth:`GatewayBackend.subscribe_channel` when a channel gains its first local subscriber,
:meth:`GatewayBackend.unsubscribe_channel` once its last one leaves), and the backend hands the
frames other processes publish on those channels to the ``deliver`` callback it got in
:meth:`GatewayBackend.start`. :data:`BROADCAST_CHANNEL` is subscribed for the gateway's whole life.

A backend also keeps the shared state of the cluster: presence (which users are subscribed to a
channel, on any process, announced as ``presence`` frames on :func:`presence_channel`), the
bounded history of history channels (offsets and an epoch, for recovery after a reconnect) and
the connection count of each tenant.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, TypeAlias

from dotmac.communications.observability import CheckResult
from dotmac.communications.websockets._protocol import StreamPosition, encode_presence

__all__ = [
    "BROADCAST_CHANNEL",
    "Deliver",
    "GatewayBackend",
    "HistoryReplay",
    "PresenceEvent",
    "ReconnectHook",
    "new_epoch",
    "presence_channel",
    "with_position",
]

BROADCAST_CHANNEL: Final = "broadcast"
"""The channel of :meth:`WebSocketGateway.broadcast`: every connection receives it, unasked."""

Deliver: TypeAlias = Callable[[str, bytes], int]
"""``deliver(channel, frame) -> local deliveries``: write an encoded ``message`` frame to this
process's subscribers of ``channel``. Synchronous and non-blocking (it never waits for a client)."""

PresenceEvent: TypeAlias = Literal["join", "leave"]
ReconnectHook: TypeAlias = Callable[[float], Awaitable[None]]
"""``async (downtime_seconds) -> None``: run after the backend's link came back."""

_PRESENCE_PREFIX: Final = "\x00presence:"


def presence_channel(channel: str) -> str:
    """Name the internal channel carrying ``channel``'s ``presence`` frames.

    Connections that subscribed with ``"presence": true`` are also subscribed to it. The name
    starts with a NUL character, which no client channel can contain.
    """
    return _PRESENCE_PREFIX + channel


def with_position(frame: bytes, offset: int, epoch: str) -> bytes:
    """Add ``offset`` and ``epoch`` to an encoded ``message`` frame (a JSON object).

    ``epoch`` must be JSON-safe without escaping (the backends make hex tokens).
    """
    return b'%s,"offset":%d,"epoch":"%s"}' % (frame[:-1], offset, epoch.encode())


def new_epoch() -> str:
    """A fresh history epoch: 8 random bytes in hex."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class HistoryReplay:
    """What a history channel holds after a client's position.

    Attributes:
        frames: The ``message`` frames after the position, oldest first (empty when not
            recovered).
        recovered: Whether ``frames`` are every message after the position: the epoch is the
            same and nothing after the position was trimmed away.
        offset: The offset of the last message in history when it was read (the client's own
            offset when there is none); live frames up to it are duplicates of the replay.
    """

    frames: list[bytes]
    recovered: bool
    offset: int


class GatewayBackend(ABC):
    """Carries encoded frames between the gateways of several processes.

    Calls for one channel come in the order of the transitions they report (``subscribe_channel``,
    then ``unsubscribe_channel``, then perhaps ``subscribe_channel`` again) but may overlap in time:
    a backend applies them in call order, for example through one ordered command connection.
    The gateway awaits ``subscribe_channel`` before it confirms a subscribe, so a confirmed client
    misses nothing published afterwards anywhere.
    """

    name: ClassVar[str]
    """Short name for metrics, spans and logs (``"memory"``, ``"redis"``)."""

    delivers_own_history: ClassVar[bool] = False
    """Whether :meth:`publish_history` frames come back through ``deliver`` on this process too
    (in the backend's order), so the gateway must not deliver them itself."""

    def _announce(
        self, deliver: Deliver, channel: str, user_id: str, event: PresenceEvent
    ) -> bytes:
        """Deliver a presence frame locally; return it for the other processes."""
        frame = encode_presence(channel, event, user_id)
        deliver(presence_channel(channel), frame)
        return frame

    @abstractmethod
    async def start(self, deliver: Deliver) -> None:
        """Connect, and hand frames published by other processes to ``deliver`` from now on.

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections; idempotent."""

    @abstractmethod
    async def publish(self, channel: str, frame: bytes) -> None:
        """Carry ``frame``, an encoded ``message`` frame, to the other processes' subscribers.

        This process's own subscribers were already served by the gateway: a backend never hands
        its own frames back to ``deliver``.

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """

    @abstractmethod
    async def subscribe_channel(self, channel: str) -> None:
        """Start receiving other processes' frames on ``channel`` (it has a local subscriber).

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """

    @abstractmethod
    async def unsubscribe_channel(self, channel: str) -> None:
        """Stop receiving frames on ``channel`` (its last local subscriber left).

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """

    # -- presence --------------------------------------------------------------------------

    @abstractmethod
    async def set_presence(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Record this process's connection count per ``(channel, user_id)`` (0: none left).

        When a user's count over all processes goes from 0 to more, a ``join`` frame is
        delivered on :func:`presence_channel` of the channel, everywhere; to 0, a ``leave``.

        Raises:
            BackendUnavailableError: The backend cannot be reached (nothing is announced; the
                counts are written again by the next call for the same keys).
        """

    @abstractmethod
    async def presence(self, channel: str) -> dict[str, int]:
        """The users subscribed to ``channel`` on any live process, with their connection count.

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """

    # -- history ---------------------------------------------------------------------------

    @abstractmethod
    async def publish_history(self, channel: str, frame: bytes, *, size: int, ttl: float) -> bytes:
        """Append ``frame`` to ``channel``'s history and carry it to the other processes.

        Args:
            channel: A history channel.
            frame: The encoded ``message`` frame, without offset and epoch.
            size: Messages kept in the channel's history.
            ttl: Seconds the history is kept after its last message.

        Returns:
            The frame as appended: with its ``offset`` and ``epoch``, for local delivery.

        Raises:
            BackendUnavailableError: The backend cannot be reached (nothing was appended).
        """

    @abstractmethod
    async def read_history(self, channel: str, since: StreamPosition) -> HistoryReplay:
        """Read what ``channel``'s history holds after ``since``.

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """

    async def barrier(self) -> None:  # noqa: B027 -- nothing to wait for by default
        """Return once every frame published before the call has reached ``deliver``.

        Recovery calls it after reading history, so no live frame the history already had
        is still on its way. A backend that delivers synchronously has nothing to wait for.
        """

    # -- tenants ---------------------------------------------------------------------------

    async def reserve_tenant(self, tenant_id: str, limit: int) -> bool:
        """Take one of ``tenant_id``'s ``limit`` connection slots across the cluster.

        The gateway checks its own count first; a one-process backend has nothing to add.

        Returns:
            ``False`` when the tenant already has ``limit`` connections on live processes.

        Raises:
            BackendUnavailableError: The backend cannot be reached.
        """
        return True

    def release_tenant(self, tenant_id: str) -> None:  # noqa: B027 -- optional, no-op here
        """Give back a slot taken with :meth:`reserve_tenant` (the connection closed).

        Synchronous (it runs when a TCP connection is lost): a networked backend writes it in
        the background.
        """

    # -- reconnects ------------------------------------------------------------------------

    def add_reconnect_hook(self, hook: ReconnectHook) -> None:  # noqa: B027 -- no link here
        """Run ``hook(downtime_seconds)`` each time the backend's link comes back after a loss.

        A one-process backend has no link to lose and never calls it.
        """

    async def check(self) -> CheckResult:
        """Report the backend's health for the gateway's ``/health`` (``gateway:backend``).

        Returns:
            ``pass`` by default; a networked backend reports its listener's state.
        """
        return CheckResult("pass", component_type="component")
