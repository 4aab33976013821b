"""Send notifications over email, SMS, push, webhooks, chat and in-app WebSocket."""

from __future__ import annotations

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
)
from .channels.base import CallbackProvider, Provider

__all__ = [
    "Attachment",
    "CallbackProvider",
    "DeliveryResult",
    "DeliveryStatus",
    "Notification",
    "NotificationChannel",
    "NotificationPriority",
    "NotificationResult",
    "NotificationStatus",
    "OutboundMessage",
    "Provider",
    "SendReceipt",
]
