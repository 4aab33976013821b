"""Event backends: in-memory (one process) and Redis Streams (many processes)."""

from __future__ import annotations

from .base import DeadLetter, Delivery, EventBackend, GroupConsumer, GroupId
from .memory import MemoryBackend
from .redis_streams import RedisStreamsBackend

__all__ = [
    "DeadLetter",
    "Delivery",
    "EventBackend",
    "GroupConsumer",
    "GroupId",
    "MemoryBackend",
    "RedisStreamsBackend",
]
