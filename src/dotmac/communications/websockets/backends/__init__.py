"""Gateway backends: how messages reach the gateways of other processes."""

from __future__ import annotations

from .base import BROADCAST_CHANNEL, Deliver, GatewayBackend
from .memory import MemoryBackend

__all__ = ["BROADCAST_CHANNEL", "Deliver", "GatewayBackend", "MemoryBackend"]
