"""The provider seam: one async ``send`` per message, plus an open/close lifecycle.

A provider delivers one :class:`~dotmac.communications.notifications.OutboundMessage` to one
recipient and returns a :class:`~dotmac.communications.notifications.SendReceipt`, or raises:

- :class:`~dotmac.communications.errors.DeliveryError` (or any transient library error) when a
  later attempt may succeed — the service retries it, then fails over to the next provider;
- :class:`~dotmac.communications.errors.PermanentDeliveryError` when it never will with this
  provider (4xx, refused credentials) — the service fails over to the next provider at once;
- :class:`~dotmac.communications.errors.InvalidRecipientError` from :meth:`Provider.validate` for a
  malformed recipient (before any connection), and
  :class:`~dotmac.communications.errors.RecipientUnregisteredError` when the provider says the
  recipient is gone — neither is failed over, since no provider can do better.

Vendor exceptions never leave a provider: each maps them to the tree above at its boundary.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import ClassVar, Self

from dotmac.communications.notifications._models import OutboundMessage, SendReceipt

__all__ = ["CallbackProvider", "Provider"]


class Provider(abc.ABC):
    """Base class of channel providers (the shape of an httpx transport).

    Subclasses set :attr:`channel`, implement :meth:`send`, and override :meth:`validate`,
    :meth:`open` and :meth:`aclose` as needed. ``name`` identifies the provider in results,
    metrics, breakers and rate limits; give two providers of one class different names.
    """

    channel: ClassVar[str]
    name: str = "provider"
    failover: bool = True
    """Whether the next provider of the channel may take over when this one fails. Chat
    providers say no: they are alternatives for different recipients, not for each other."""

    def validate(self, recipient: str) -> str:
        """Check (and normalise) one recipient before anything is sent.

        Raises:
            InvalidRecipientError: The recipient is malformed for this provider.
        """
        return recipient

    def check(self, message: OutboundMessage) -> None:  # noqa: B027 -- optional hook
        """Check what is the same for every recipient (sender, headers, body) before sending.

        The service calls it once per notification, after :meth:`validate`.

        Raises:
            InvalidRecipientError: A malformed sender or header.
            ConfigurationError: The provider lacks something the message needs (a From).
            PermanentDeliveryError: The message cannot be sent by this provider at all.
        """

    def handles(self, recipient: str) -> bool:
        """Whether this provider serves ``recipient`` (default: every recipient).

        A channel whose providers are alternatives for different recipients (chat: Slack,
        Discord, Teams) routes each recipient to the providers that handle it, in order.
        """
        return True

    async def open(self) -> None:  # noqa: B027 -- optional hook, most providers need nothing
        """Open pools and clients (called by the service's ``async with``)."""

    async def aclose(self) -> None:  # noqa: B027 -- optional hook
        """Close pools and clients; safe to call twice."""

    @abc.abstractmethod
    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Deliver ``message`` to ``message.recipient``; raise a library error on failure."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, channel={self.channel!r})"


class CallbackProvider(Provider):
    """A provider that hands each message to an async callable (in-memory, for tests and hosts).

    Args:
        channel: The channel it serves.
        handler: ``async def handler(message) -> SendReceipt | str | None``; a returned string
            becomes the provider message id. Exceptions it raises are treated like a provider's.
        name: Provider name.
    """

    def __init__(
        self,
        channel: str,
        handler: Callable[[OutboundMessage], Awaitable[SendReceipt | str | None]],
        *,
        name: str = "callback",
    ) -> None:
        self.channel = channel  # type: ignore[misc]  # per instance, unlike other providers
        self._handler = handler
        self.name = name

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Call the handler."""
        answer = await self._handler(message)
        if isinstance(answer, SendReceipt):
            return answer
        return SendReceipt(provider_message_id=answer)
