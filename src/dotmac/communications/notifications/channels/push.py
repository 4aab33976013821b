"""Push providers: Firebase Cloud Messaging (HTTP v1) and Web Push (RFC 8030/8291/8292).

Both need the ``push`` extra (PyJWT, cryptography, http-ece), imported when a provider is built,
so importing this module never fails for want of it.
"""

from __future__ import annotations

from dotmac.communications.notifications.channels._fcm import FCMProvider
from dotmac.communications.notifications.channels._webpush import WebPushProvider

__all__ = ["FCMProvider", "WebPushProvider"]
