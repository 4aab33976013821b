"""The WebSocket gateway (in progress): handshake authentication and the wire protocol.

The gateway server itself (``WebSocketGateway``) is not built yet; what is here is used by it and
is public already: authenticators that turn a handshake into an :class:`Identity` (or refuse it
with HTTP 401/403), and the sans-I/O protocol documented in ``docs/protocol.md``.
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

__all__ = [
    "AnonymousAuthenticator",
    "Authenticator",
    "ChainAuthenticator",
    "HandshakeRequest",
    "Identity",
    "JWTAuthenticator",
    "SessionAuthenticator",
    "SessionResolver",
    "check_origin",
    "token_expiry_delay",
    "validate_allowed_origins",
]
