"""The WebSocket gateway: authenticated connections, channels, fan-out, presence and history.

``WebSocketGateway`` serves the JSON protocol of ``docs/protocol.md`` with ``websockets``:
authenticators turn a handshake into an :class:`Identity` (or refuse it with HTTP 401/403), the
same port answers ``/health`` and ``/metrics``, and ``dotmac-comms serve`` runs it.
:mod:`dotmac.communications.websockets.asgi` mounts the same connection handling in a
Starlette/FastAPI app. One process needs nothing more (:class:`MemoryBackend`);
:class:`RedisBackend` spreads fan-out, presence, history and tenant limits over processes.
"""

from __future__ import annotations

from ._auth import (
    AnonymousAuthenticator,
    Authenticator,
    ChainAuthenticator,
    HandshakeRequest,
    Identity,
    JWTAuthenticator,
    SessionAuthenticator,
    SessionResolver,
    check_origin,
    token_expiry_delay,
    validate_allowed_origins,
)
from ._connection import (
    AuthorizeAction,
    Authorizer,
    ConnectionHook,
    GatewayConnection,
    MessageHandler,
)
from ._gateway import WebSocketGateway
from ._protocol import StreamPosition
from .backends import (
    BROADCAST_CHANNEL,
    GatewayBackend,
    HistoryReplay,
    MemoryBackend,
    RedisBackend,
)

__all__ = [
    "BROADCAST_CHANNEL",
    "AnonymousAuthenticator",
    "Authenticator",
    "AuthorizeAction",
    "Authorizer",
    "ChainAuthenticator",
    "ConnectionHook",
    "GatewayBackend",
    "GatewayConnection",
    "HandshakeRequest",
    "HistoryReplay",
    "Identity",
    "JWTAuthenticator",
    "MemoryBackend",
    "MessageHandler",
    "RedisBackend",
    "SessionAuthenticator",
    "SessionResolver",
    "StreamPosition",
    "WebSocketGateway",
    "check_origin",
    "token_expiry_delay",
    "validate_allowed_origins",
]
