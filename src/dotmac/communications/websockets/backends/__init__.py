"""Gateway backends: how messages, presence and history reach the gateways of other processes."""

from __future__ import annotations

from .base import (
    BROADCAST_CHANNEL,
    Deliver,
    GatewayBackend,
    HistoryReplay,
    PresenceEvent,
    ReconnectHook,
    new_epoch,
    presence_channel,
    with_position,
)
from .memory import MemoryBackend
from .redis import RedisBackend

__all__ = [
    "BROADCAST_CHANNEL",
    "Deliver",
    "GatewayBackend",
    "HistoryReplay",
    "MemoryBackend",
    "PresenceEvent",
    "ReconnectHook",
    "RedisBackend",
    "new_epoch",
    "presence_channel",
    "with_position",
]
