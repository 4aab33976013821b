"""The seam between the gateway and the way its messages reach other processes.

A gateway delivers every message to its own connections itself and hands the encoded frame to its
backend, which carries it to the gateways of other processes. Each process receives only what it
has clients for: the gateway tells its backend which channels have local subscribers
(:meth:`GatewayBackend.subscribe_channel` when a channel gains its first local subscriber,
:meth:`GatewayBackend.unsubscribe_channel` once its last one leaves), and the backend hands the
frames other processes publish on those channels to the ``deliver`` callback it got in
:meth:`GatewayBackend.start`. :data:`BROADCAST_CHANNEL` is subscribed for the gateway's whole life.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Final, TypeAlias

from dotmac.communications.observability import CheckResult

__all__ = ["BROADCAST_CHANNEL", "Deliver", "GatewayBackend"]

BROADCAST_CHANNEL: Final = "broadcast"
"""The channel of :meth:`WebSocketGateway.broadcast`: every connection receives it, unasked."""

Deliver: TypeAlias = Callable[[str, bytes], int]
"""``deliver(channel, frame) -> local deliveries``: write an encoded ``message`` frame to this
process's subscribers of ``channel``. Synchronous and non-blocking (it never waits for a client)."""


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

    async def check(self) -> CheckResult:
        """Report the backend's health for the gateway's ``/health`` (``gateway:backend``).

        Returns:
            ``pass`` by default; a networked backend reports its listener's state.
        """
        return CheckResult("pass", component_type="component")
