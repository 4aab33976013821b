"""In-app delivery through the WebSocket gateway to ``user:{id}``.

The gateway is any object with ``is_online(user_id)`` and ``async send_to_user(user_id, data)``
(:class:`InAppGateway`); the library's ``WebSocketGateway`` has both. A user with no live
connection raises :class:`~dotmac.communications.errors.RecipientOfflineError`, on which the
service uses the notification's ``fallback`` channel.
"""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from dotmac.communications.errors import (
    DeliveryError,
    InvalidRecipientError,
    RecipientOfflineError,
)
from dotmac.communications.notifications._models import OutboundMessage, SendReceipt

from .base import Provider

__all__ = ["GatewayProvider", "InAppGateway"]


@runtime_checkable
class InAppGateway(Protocol):
    """What the in-app channel needs from a WebSocket gateway."""

    def is_online(self, user_id: str) -> Any:
        """True (or an awaitable of it) when the user has a live connection anywhere."""

    async def send_to_user(self, user_id: str, data: Any) -> int:
        """Deliver ``data`` on channel ``user:{user_id}``; return local deliveries."""


class GatewayProvider(Provider):
    """Sends in-app notifications as ``{"type": "notification", ...}`` data to ``user:{id}``.

    Args:
        gateway: The WebSocket gateway (or anything shaped like :class:`InAppGateway`).
        name: Provider name.
    """

    channel = "websocket"

    def __init__(self, gateway: InAppGateway, *, name: str = "gateway") -> None:
        if not isinstance(gateway, InAppGateway):
            raise TypeError(
                f"gateway must have is_online() and async send_to_user(), got {gateway!r}"
            )
        self.gateway = gateway
        self.name = name

    def validate(self, recipient: str) -> str:
        """A user id: non-empty, no whitespace or ':'."""
        if not recipient or any(c.isspace() for c in recipient) or ":" in recipient:
            raise InvalidRecipientError(
                f"websocket recipient must be a user id without spaces or ':', got {recipient!r}"
            )
        return recipient

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Deliver to every live connection of the user, or raise RecipientOfflineError."""
        online = self.gateway.is_online(message.recipient)
        if inspect.isawaitable(online):
            online = await online
        if not online:
            raise RecipientOfflineError(f"user {message.recipient!r} has no live connection")
        payload = {
            "type": "notification",
            "id": message.notification_id,
            "subject": message.subject,
            "text": message.text,
            "data": dict(message.data) if message.data is not None else None,
            "priority": message.priority,
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        try:
            delivered = await self.gateway.send_to_user(message.recipient, payload)
        except RecipientOfflineError:
            raise
        except OSError as exc:
            raise DeliveryError(
                f"gateway could not deliver to {message.recipient!r}: {exc}"
            ) from exc
        return SendReceipt(detail=f"{delivered} local connection(s)")
