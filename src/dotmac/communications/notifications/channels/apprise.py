"""A bridge to apprise for the long tail of services (Telegram, Matrix, Pushover, ...).

The recipient is an apprise URL (``tgram://bottoken/ChatID``, ``pover://user@token``, ...); the
provider serves whichever channel it is given (default ``chat``). apprise reports only success
or failure, not why, so every failure is a transient
:class:`~dotmac.communications.errors.DeliveryError` (retried, then failed over or
dead-lettered); an URL apprise cannot parse is refused before sending with
:class:`~dotmac.communications.errors.InvalidRecipientError`.

apprise waits between sends to one service by default (``request_rate_per_sec``, 5.5 s for most
plugins); this provider leaves that throttle as apprise sets it: pair it with the service's own
``rate_limit_per_minute`` instead, if needed. Needs the ``apprise`` extra.
"""

from __future__ import annotations

import importlib
from typing import Any

from dotmac.communications.errors import DeliveryError, InvalidRecipientError
from dotmac.communications.notifications._models import OutboundMessage, SendReceipt

from .base import Provider

__all__ = ["AppriseProvider"]


def _apprise() -> Any:
    try:
        return importlib.import_module("apprise")
    except ImportError as exc:
        raise ImportError(
            "the apprise provider needs the 'apprise' extra: "
            "pip install 'dotmac-communications[apprise]'"
        ) from exc


def _scheme(url: str) -> str:
    # Only the scheme goes into errors: the rest of an apprise URL holds its tokens.
    return url.split("://", maxsplit=1)[0]


class AppriseProvider(Provider):
    """Send through apprise to the service named by the recipient's apprise URL.

    Args:
        channel: The channel this provider serves (``chat``, ``sms``, ``push``...).
        name: Provider name.
    """

    channel = "chat"

    def __init__(self, *, channel: str = "chat", name: str = "apprise") -> None:
        self._apprise = _apprise()
        self.channel = channel  # type: ignore[misc]  # per instance: apprise serves any channel
        self.name = name

    def handles(self, recipient: str) -> bool:
        """Apprise URLs only (``scheme://...`` other than http/https)."""
        return "://" in recipient and not recipient.lower().startswith(("http://", "https://"))

    def validate(self, recipient: str) -> str:
        """The recipient must be an URL apprise understands."""
        if self._apprise.Apprise.instantiate(recipient) is None:
            raise InvalidRecipientError(
                f"{self.name}: not an apprise URL apprise can use: {_scheme(recipient)}://…"
            )
        return recipient

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Notify through apprise; a falsy answer is a transient failure."""
        sender = self._apprise.Apprise()
        sender.add(message.recipient)
        body = message.text or message.html or ""
        result = await sender.async_notify(body=body, title=message.subject or "")
        if not result:
            raise DeliveryError(
                f"{self.name}: apprise could not notify {_scheme(message.recipient)}://…"
            )
        return SendReceipt(detail="apprise: sent")
