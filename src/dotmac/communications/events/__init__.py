"""Publish and consume events with at-least-once delivery, on memory or Redis Streams.

```python
bus = EventBus(RedisStreamsBackend("redis://localhost:6379/0"))

@bus.subscribe("orders.*", group="billing")
async def bill(event: Event) -> None:
    ...

async with bus:
    await bus.publish("orders.created", {"id": 42}, key="customer-7")
```
"""

from __future__ import annotations

from dotmac.communications.errors import (
    EventDecodeError,
    EventError,
    EventSerializationError,
    EventTooLargeError,
    InvalidPatternError,
    InvalidTopicError,
    PublishTimeoutError,
    UnknownBackendError,
)

from ._bus import EventBus
from ._dlq import DeadLetters
from ._event import Event
from ._idempotency import (
    DuplicateInProgressError,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    idempotent,
)
from ._subscription import Handler, Subscription
from ._topics import compile_pattern, validate_topic
from .backends import DeadLetter, EventBackend, MemoryBackend, RedisStreamsBackend

__all__ = [
    "DeadLetter",
    "DeadLetters",
    "DuplicateInProgressError",
    "Event",
    "EventBackend",
    "EventBus",
    "EventDecodeError",
    "EventError",
    "EventSerializationError",
    "EventTooLargeError",
    "Handler",
    "IdempotencyStore",
    "InvalidPatternError",
    "InvalidTopicError",
    "MemoryBackend",
    "MemoryIdempotencyStore",
    "PublishTimeoutError",
    "RedisIdempotencyStore",
    "RedisStreamsBackend",
    "Subscription",
    "UnknownBackendError",
    "compile_pattern",
    "idempotent",
    "validate_topic",
]
