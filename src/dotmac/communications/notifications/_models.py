"""The notification data model: what callers send and what they get back.

``Notification`` is validated when it is built (pydantic): a bad channel, an empty recipient list,
a naive ``send_at`` or a header with CR/LF fails at the call with a message naming the field.
Results are plain frozen dataclasses; :class:`DeliveryStatus` and friends are ``StrEnum`` so they
compare equal to their string values (``result.status == "sent"``).
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Attachment",
    "DeliveryResult",
    "DeliveryStatus",
    "Notification",
    "NotificationChannel",
    "NotificationPriority",
    "NotificationResult",
    "NotificationStatus",
    "OutboundMessage",
    "SendReceipt",
    "new_notification_id",
]


class NotificationChannel(StrEnum):
    """Where a notification goes."""

    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    WEBHOOK = "webhook"
    CHAT = "chat"
    WEBSOCKET = "websocket"


class NotificationPriority(StrEnum):
    """How urgent a notification is (mapped to provider priorities where they have one)."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class DeliveryStatus(StrEnum):
    """Outcome for one recipient."""

    SENT = "sent"
    """The provider accepted the message (SMTP 250, HTTP 2xx, a live WebSocket took it)."""
    FAILED = "failed"
    """Every attempt on every provider failed; the delivery is in the dead letters."""
    DEDUPLICATED = "deduplicated"
    """The idempotency key was seen within its TTL; nothing was sent."""
    SCHEDULED = "scheduled"
    """``send_at`` is in the future; the scheduler sends it then."""
    SUPPRESSED = "suppressed"
    """The recipient is known to be gone (push token unregistered); nothing was sent."""
    CANCELLED = "cancelled"
    """A scheduled notification was cancelled before it was due."""


class NotificationStatus(StrEnum):
    """Overall outcome of a notification: its deliveries' status, or ``partial`` when mixed."""

    SENT = "sent"
    FAILED = "failed"
    PARTIAL = "partial"
    DEDUPLICATED = "deduplicated"
    SCHEDULED = "scheduled"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"


def new_notification_id() -> str:
    """Return a new notification id (32 hex characters, random)."""
    return os.urandom(16).hex()


def _no_crlf(value: str, what: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} must not contain CR or LF (header injection), got {value!r}")
    return value


class Attachment(BaseModel):
    """A file attached to an email.

    Args:
        filename: Name shown to the recipient (no path, no CR/LF).
        content: The bytes.
        content_type: MIME type (``type/subtype``); guessed from ``filename`` when omitted.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    filename: str = Field(min_length=1, max_length=255)
    content: bytes
    content_type: str = ""

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        _no_crlf(value, "attachment filename")
        if "/" in value or "\\" in value:
            raise ValueError(f"attachment filename must not contain a path, got {value!r}")
        return value

    @model_validator(mode="after")
    def _guess_type(self) -> Self:
        if not self.content_type:
            guessed = mimetypes.guess_type(self.filename)[0] or "application/octet-stream"
            object.__setattr__(self, "content_type", guessed)
        main, _, sub = self.content_type.partition("/")
        if not main or not sub or "\r" in self.content_type or "\n" in self.content_type:
            raise ValueError(f"content_type must be 'type/subtype', got {self.content_type!r}")
        return self

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], content_type: str = "") -> Attachment:
        """Read a file into an attachment named after it."""
        file = Path(path)
        return cls(filename=file.name, content=file.read_bytes(), content_type=content_type)


class Notification(BaseModel):
    """One notification to one or many recipients on one channel.

    Args:
        channel: ``email``, ``sms``, ``push``, ``webhook``, ``chat`` or ``websocket``.
        to: Recipient(s): addresses, E.164 numbers, push tokens / subscription JSON, URLs,
            chat webhook URLs or user ids, depending on the channel.
        subject: Email subject / push title / chat title.
        text: Plain-text body (email text part, SMS body, push body, chat text).
        html: HTML body (email).
        template: Name of a registered template; rendered with ``context``.
        context: Template variables.
        data: Structured payload (webhook JSON body, push data, in-app message data).
        attachments: Email attachments.
        priority: ``low``, ``normal``, ``high`` or ``urgent``.
        send_at: Aware datetime; in the future → stored and sent then.
        idempotency_key: Same key within ``idempotency_ttl_seconds`` → sent once.
        tenant_id: Tenant the notification belongs to.
        metadata: Free-form string metadata, kept in the status history and events.
        sender: From address / number overriding the configured default.
        reply_to: Email Reply-To.
        headers: Extra email headers (no CR/LF in names or values).
        fallback: For ``websocket``: channel used for recipients with no live connection.
        fallback_to: For ``fallback``: user id → address on the fallback channel.
        id: Notification id; generated when omitted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: NotificationChannel
    to: tuple[str, ...]
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    template: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] | None = None
    attachments: tuple[Attachment, ...] = ()
    priority: NotificationPriority = NotificationPriority.NORMAL
    send_at: datetime | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    tenant_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    sender: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    fallback: NotificationChannel | None = None
    fallback_to: dict[str, str] = Field(default_factory=dict)
    id: str = Field(default_factory=new_notification_id, min_length=1, max_length=100)

    @field_validator("to", mode="before")
    @classmethod
    def _recipients(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("to")
    @classmethod
    def _some_recipients(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one recipient")
        cleaned = tuple(dict.fromkeys(map(str.strip, value)))  # trimmed, duplicates once
        if "" in cleaned:
            raise ValueError("recipients must be non-empty strings")
        return cleaned

    @field_validator("subject", "sender", "reply_to")
    @classmethod
    def _single_line(cls, value: str | None) -> str | None:
        if value is not None:
            _no_crlf(value, "subject, sender and reply_to")
        return value

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            _no_crlf(name, "header name")
            _no_crlf(text, f"header {name!r}")
            if not name or ":" in name or not name.isascii():
                raise ValueError(f"header name must be ASCII without ':', got {name!r}")
        return value

    @field_validator("send_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("send_at must be timezone-aware (e.g. datetime.now(UTC))")
        return value

    @model_validator(mode="after")
    def _content(self) -> Self:
        if self.fallback is not None and self.channel != NotificationChannel.WEBSOCKET:
            raise ValueError("fallback applies to the websocket channel only")
        if self.fallback == NotificationChannel.WEBSOCKET:
            raise ValueError("fallback must be another channel than websocket")
        if self.attachments and self.channel != NotificationChannel.EMAIL:
            raise ValueError("attachments are for the email channel only")
        if self.template is None and self.text is None and self.html is None and self.data is None:
            raise ValueError("nothing to send: give text, html, data or a template")
        return self

    def due(self, now: datetime | None = None) -> bool:
        """True when ``send_at`` is unset or not in the future."""
        return self.send_at is None or self.send_at <= (now or datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What a provider sends to one recipient: the notification with its content rendered."""

    notification_id: str
    channel: str
    recipient: str
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    data: Mapping[str, Any] | None = None
    attachments: tuple[Attachment, ...] = ()
    priority: str = "normal"
    sender: str | None = None
    reply_to: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    tenant_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """A provider's acknowledgement of one accepted message."""

    provider_message_id: str | None = None
    """The provider's id (SMTP Message-ID, Twilio sid, FCM name, ...), when it gives one."""
    detail: str | None = None
    """Short provider answer worth keeping in the history (``250 OK``, ``201 Created``)."""


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """Outcome for one recipient."""

    recipient: str
    status: DeliveryStatus
    provider: str | None = None
    attempts: int = 0
    error: str | None = None
    provider_message_id: str | None = None
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class NotificationResult:
    """Outcome of a send: the overall status and one :class:`DeliveryResult` per recipient."""

    id: str
    status: NotificationStatus
    deliveries: tuple[DeliveryResult, ...]

    @classmethod
    def of(cls, notification_id: str, deliveries: tuple[DeliveryResult, ...]) -> NotificationResult:
        """Build a result whose overall status summarises ``deliveries``."""
        if len(deliveries) == 1:  # the common case: no set built
            only = deliveries[0].status
            overall = _OVERALL.get(only) or NotificationStatus(only.value)
            return cls(notification_id, overall, deliveries)
        statuses = {d.status for d in deliveries}
        if len(statuses) == 1:
            only = next(iter(statuses))
            overall = _OVERALL.get(only) or NotificationStatus(only.value)
        elif statuses <= {DeliveryStatus.SENT, DeliveryStatus.DEDUPLICATED}:
            overall = NotificationStatus.SENT
        else:
            overall = NotificationStatus.PARTIAL
        return cls(notification_id, overall, deliveries)

    @property
    def ok(self) -> bool:
        """True when no delivery failed."""
        return all(d.status != DeliveryStatus.FAILED for d in self.deliveries)


# The overall status of deliveries that all have one status (a lookup, not an enum call).
_OVERALL = {status: NotificationStatus(status.value) for status in DeliveryStatus}
