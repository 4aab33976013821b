"""Send notifications over email, SMS, push, webhooks, chat and in-app WebSocket.

```python
svc = NotificationService.from_config(CommunicationsConfig().notifications)
async with svc:
    result = await svc.send(Notification(channel="email", to="ann@example.com",
                                         subject="Hi", text="Welcome!"))
    assert result.status == "sent"
```

Providers live in ``dotmac.communications.notifications.channels.*`` (``email``, ``sms``,
``push``, ``webhook``, ``chat``, ``websocket``); each is imported when first used.
"""

from __future__ import annotations

from dotmac.communications.errors import (
    DeliveryError,
    InvalidRecipientError,
    NotificationError,
    PermanentDeliveryError,
    RecipientOfflineError,
    RecipientUnregisteredError,
    TemplateError,
)

from ._models import (
    Attachment,
    DeliveryResult,
    DeliveryStatus,
    Notification,
    NotificationChannel,
    NotificationPriority,
    NotificationResult,
    NotificationStatus,
    OutboundMessage,
    SendReceipt,
    new_notification_id,
)
from ._service import NotificationDeadLetters, NotificationService
from ._store import NotificationDeadLetter, NotificationStore, StatusEntry
from ._store_memory import MemoryStore
from ._templates import RenderedTemplate, TemplateRegistry
from .channels.base import CallbackProvider, Provider

__all__ = [
    "Attachment",
    "CallbackProvider",
    "DeliveryError",
    "DeliveryResult",
    "DeliveryStatus",
    "InvalidRecipientError",
    "MemoryStore",
    "Notification",
    "NotificationChannel",
    "NotificationDeadLetter",
    "NotificationDeadLetters",
    "NotificationError",
    "NotificationPriority",
    "NotificationResult",
    "NotificationService",
    "NotificationStatus",
    "NotificationStore",
    "OutboundMessage",
    "PermanentDeliveryError",
    "Provider",
    "RecipientOfflineError",
    "RecipientUnregisteredError",
    "RedisStore",
    "RenderedTemplate",
    "SendReceipt",
    "StatusEntry",
    "TemplateError",
    "TemplateRegistry",
    "new_notification_id",
]


def __getattr__(name: str) -> object:
    # RedisStore is imported on first use: hosts without Redis never load redis-py here.
    if name == "RedisStore":
        from ._store_redis import RedisStore  # noqa: PLC0415

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
