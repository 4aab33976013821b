"""Signed webhooks: a JSON POST to the recipient URL, HMAC-SHA256 signed with a timestamp.

What the target receives:

- the body: ``message.data`` as JSON when it is set, else a JSON object of the non-empty
  ``subject``, ``text`` and ``html``;
- ``Content-Type: application/json``, ``User-Agent: dotmac-communications/<version>``,
  ``X-Dotmac-Delivery`` and ``Idempotency-Key`` (both the notification id: a retried delivery
  carries the same id, so the receiver can drop duplicates);
- with a secret, ``X-Dotmac-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``, the HMAC keyed
  with the secret over ``"<t>." + <raw body bytes>``. While a secret is rotated, give the provider
  both secrets: the header then carries one ``v1=`` entry per secret.

**Verifying a delivery** (the receiver's side). Use the raw request body exactly as received,
before any JSON parsing::

    from dotmac.communications.notifications.channels.webhook import verify_signature

    body = await request.body()  # bytes, untouched
    if not verify_signature(body, request.headers.get("X-Dotmac-Signature", ""), SECRET):
        return Response(status_code=401)

In another language: split the header on ``,``; take ``t`` and every ``v1``; refuse when
``|now - t| > 300`` seconds (replays); compute ``hex(HMAC_SHA256(secret, t + "." + body))`` and
compare it with each ``v1`` in constant time; accept if one matches.

Answers: 2xx = sent; 408/425/429/5xx and network errors are transient (``Retry-After`` honoured);
any other status is permanent, redirects included (never followed: configure the final URL).
Targets on loopback/private/link-local addresses are refused unless ``allow_private_targets``
(see :mod:`~dotmac.communications.notifications.channels._targets`).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import httpx
import orjson

from dotmac.communications.errors import ConfigurationError, PermanentDeliveryError
from dotmac.communications.notifications._models import OutboundMessage, SendReceipt
from dotmac.communications.notifications.channels._targets import (
    GuardedHttp,
    check_literal,
    user_agent,
)
from dotmac.communications.notifications.channels.base import Provider

__all__ = ["SIGNATURE_HEADER", "WebhookProvider", "sign_payload", "verify_signature"]

SIGNATURE_HEADER = "X-Dotmac-Signature"
"""The header carrying ``t=<unix seconds>,v1=<hex HMAC-SHA256>``."""

_SETTING = "notifications.webhook.allow_private_targets"
_ID_HEADERS = ("x-request-id", "request-id", "x-amzn-requestid")
_ID_HEADER_NAMES = frozenset(name.encode() for name in _ID_HEADERS)


def _secrets(secret: str | Sequence[str]) -> list[str]:
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets or not all(isinstance(s, str) and s for s in secrets):
        raise ValueError("webhook secret must be a non-empty string (or a list of them)")
    return secrets


class _Hmac:
    """HMAC-SHA256 with one key, keyed once: each message costs a copy of the keyed state.

    The same digests as ``hmac.new(key, msg, hashlib.sha256)``, without redoing the key schedule
    per message.
    """

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def hexdigest(self, message: bytes) -> str:
        mac = self._keyed.copy()
        mac.update(message)
        return mac.hexdigest()


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign_payload(secret: str | Sequence[str], body: bytes, timestamp: int) -> str:
    """Build the ``X-Dotmac-Signature`` value for ``body`` sent at ``timestamp``.

    Args:
        secret: The shared secret, or several (current first) while rotating: one ``v1=`` each.
        body: The exact request body bytes.
        timestamp: Unix time in whole seconds.

    Returns:
        ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`` (one ``v1`` per secret).

    Raises:
        ValueError: An empty secret.
    """
    signatures = ",".join(f"v1={_digest(s, body, timestamp)}" for s in _secrets(secret))
    return f"t={int(timestamp)},{signatures}"


def verify_signature(
    body: bytes,
    header: str | None,
    secret: str | Sequence[str],
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """Tell whether ``header`` is a valid, fresh signature of ``body`` (the receiver's check).

    Args:
        body: The raw request body, exactly as received.
        header: The ``X-Dotmac-Signature`` value (None when the request had none).
        secret: The shared secret, or several (old and new while rotating; any may match).
        tolerance: Largest accepted distance between ``t`` and ``now``, seconds (replay window).
        now: Current Unix time; ``time.time()`` when omitted.

    Returns:
        True when one ``v1`` entry matches one secret and ``t`` is within ``tolerance``; False
        for a malformed header, a wrong signature or a stale (or far future) timestamp.

    Raises:
        ValueError: An empty secret.
    """
    secrets = _secrets(secret)
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not value.isascii():
            return False
        if key == "t":
            if timestamp is not None or not value.isdigit():
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value.encode())
        # Other keys (future schemes such as v2) are skipped, so senders can add them first.
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    matched = False
    for key in secrets:
        expected = _digest(key, body, timestamp).encode()
        for candidate in candidates:
            # No early exit: the time taken does not tell which entry matched.
            matched |= hmac.compare_digest(expected, candidate)
    return matched


class WebhookProvider(Provider):
    """POST each notification as signed JSON to the recipient URL.

    Args:
        secret: HMAC secret (or several while rotating); None sends unsigned requests.
        timeout: Total deadline of one delivery, seconds.
        allow_private_targets: Allow loopback/private/link-local targets (tests, internal hooks).
        max_connections: Concurrent requests (and connections) per target host.
        client: A ready httpx client (not closed by :meth:`aclose`; its connects are checked
            before, not pinned, see ``_targets``).
        ssl_context: TLS settings for ``https`` targets, e.g. one trusting a private CA
            (default: certificates verified against certifi's CA bundle). Not used with
            ``client``, whose own settings apply.
        clock: Unix time for the signature timestamp.
        name: Provider name.

    Raises:
        ConfigurationError: An empty secret, a timeout <= 0 or max_connections < 1.
    """

    channel: ClassVar[str] = "webhook"

    def __init__(
        self,
        *,
        secret: str | Sequence[str] | None = None,
        timeout: float = 10.0,
        allow_private_targets: bool = False,
        max_connections: int = 10,
        client: httpx.AsyncClient | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "webhook",
    ) -> None:
        if secret is not None:
            try:
                _secrets(secret)
            except ValueError as exc:
                raise ConfigurationError(f"{name}: {exc}") from None
        self.name = name
        self._secret = secret
        # The keys, prepared once (what sign_payload does per call).
        self._keys = (
            tuple(_Hmac(s.encode()) for s in _secrets(secret)) if secret is not None else ()
        )
        self._clock = clock
        self.allow_private_targets = allow_private_targets
        self._http = GuardedHttp(
            name,
            timeout=timeout,
            max_connections=max_connections,
            allow_private_targets=allow_private_targets,
            setting=_SETTING,
            client=client,
            ssl_context=ssl_context,
            # Sent with every request: set once on the provider's own clients (see GuardedHttp).
            default_headers={"Content-Type": "application/json", "User-Agent": user_agent()},
        )

    def validate(self, recipient: str) -> str:
        """Check the target URL: http(s), a host, and no private IP literal unless allowed.

        Raises:
            InvalidRecipientError: The URL is malformed or a refused address.
        """
        check_literal(recipient, allow_private=self.allow_private_targets, setting=_SETTING)
        return recipient

    def body(self, message: OutboundMessage) -> bytes:
        """The JSON body sent for ``message``.

        Raises:
            PermanentDeliveryError: ``message.data`` is not JSON-serialisable.
        """
        payload: Any
        if message.data is not None:
            payload = message.data if isinstance(message.data, dict) else dict(message.data)
        else:
            payload = {}
            if message.subject is not None:
                payload["subject"] = message.subject
            if message.text is not None:
                payload["text"] = message.text
            if message.html is not None:
                payload["html"] = message.html
        try:
            return orjson.dumps(payload)
        except orjson.JSONEncodeError as exc:
            raise PermanentDeliveryError(
                f"{self.name}: notification data is not JSON-serialisable: {exc}"
            ) from exc

    def headers(self, message: OutboundMessage, body: bytes) -> dict[str, str]:
        """The request headers for ``body`` (signed now, when a secret is set)."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": user_agent(),
            "X-Dotmac-Delivery": message.notification_id,
            "Idempotency-Key": message.notification_id,
        }
        if self._keys:
            # What sign_payload(secret, body, timestamp) builds, with the keys prepared once.
            timestamp = int(self._clock())
            signed = b"%d." % timestamp + body
            signatures = ",".join(["v1=" + key.hexdigest(signed) for key in self._keys])
            headers[SIGNATURE_HEADER] = f"t={timestamp},{signatures}"
        return headers

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """POST the message to ``message.recipient``.

        Raises:
            InvalidRecipientError: Bad or refused target (nothing is sent).
            OperationTimeoutError: No answer within ``timeout`` (transient).
            DeliveryError: Network error, 408/425/429 or 5xx (transient).
            PermanentDeliveryError: A redirect or another 4xx, or unserialisable data.
        """
        url = self.validate(message.recipient)
        body = self.body(message)
        response = await self._http.post(url, content=body, headers=self.headers(message, body))
        request_id = None
        # One pass over the raw names first: most answers carry none of the id headers.
        if any(name.lower() in _ID_HEADER_NAMES for name, _ in response.headers.raw):
            request_id = next(
                (response.headers[h] for h in _ID_HEADERS if response.headers.get(h)), None
            )
        return SendReceipt(
            provider_message_id=request_id,
            detail=f"HTTP {response.status_code}",
        )

    async def aclose(self) -> None:
        """Close the pooled connections (an injected client is left open)."""
        await self._http.aclose()
