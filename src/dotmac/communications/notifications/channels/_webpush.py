"""Web Push provider: RFC 8291 message encryption (aes128gcm) and RFC 8292 VAPID.

The recipient is the browser's ``PushSubscription`` as JSON (``subscription.toJSON()``)::

    {"endpoint": "https://push.example/...", "keys": {"p256dh": "...", "auth": "..."}}

Each message is encrypted for the subscription's keys with a fresh ephemeral P-256 key, and the
request carries a VAPID JWT (ES256) for the push service's origin, signed with the application
server key whose public half the page passed to ``pushManager.subscribe()``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from dotmac.communications.errors import (
    ConfigurationError,
    InvalidRecipientError,
    PermanentDeliveryError,
)
from dotmac.communications.notifications._models import OutboundMessage, SendReceipt
from dotmac.communications.notifications.channels._http import HttpSender
from dotmac.communications.notifications.channels._targets import check_target
from dotmac.communications.notifications.channels.base import Provider

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

__all__ = ["WebPushProvider"]

_EXTRA = "Web Push needs the 'push' extra: pip install 'dotmac-communications[push]'"
_MAX_BODY = 4096
"""Push services must accept encrypted bodies up to 4096 bytes (RFC 8030 §7.2); bigger may fail."""
_ECE_OVERHEAD = 16 + 4 + 1 + 65 + 1 + 16
"""aes128gcm: salt, record size, key id length, sender key, padding delimiter, GCM tag."""
_VAPID_LIFETIME = 12 * 3600
_URGENCY = {"low": "low", "normal": "normal", "high": "high", "urgent": "high"}
_GONE = (404, 410)
_PRIVATE_SETTING = "notifications.webhook.allow_private_targets"


@dataclass(frozen=True, slots=True)
class _Subscription:
    endpoint: str
    origin: str
    p256dh: bytes
    auth: bytes


def _b64url_decode(text: str) -> bytes:
    # Browsers give base64url without padding; tolerate padding and the standard alphabet.
    clean = text.strip().rstrip("=").replace("+", "-").replace("/", "_")
    return base64.b64decode(clean + "=" * (-len(clean) % 4), altchars=b"-_", validate=True)


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_subscription(recipient: str) -> _Subscription:
    try:
        sub = json.loads(recipient)
    except ValueError as exc:
        raise InvalidRecipientError(f"push subscription is not valid JSON: {exc}") from exc
    if not isinstance(sub, dict):
        raise InvalidRecipientError("push subscription must be a JSON object")
    endpoint, keys = sub.get("endpoint"), sub.get("keys")
    if not isinstance(endpoint, str) or not endpoint:
        raise InvalidRecipientError("push subscription has no 'endpoint' string")
    if not isinstance(keys, dict):
        raise InvalidRecipientError("push subscription has no 'keys' object")
    origin = _endpoint_origin(endpoint)
    p256dh, auth = _subscription_keys(keys)
    return _Subscription(endpoint, origin, p256dh, auth)


def _endpoint_origin(endpoint: str) -> str:
    try:
        url = httpx.URL(endpoint)
    except httpx.InvalidURL as exc:
        raise InvalidRecipientError(f"push subscription endpoint is not a URL: {exc}") from exc
    if not url.host or not (
        url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.host))
    ):
        raise InvalidRecipientError(
            "push subscription endpoint must be an https URL (http only on loopback), got "
            f"{url.scheme}://{url.host}"
        )
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}" + (f":{url.port}" if url.port is not None else "")


def _subscription_keys(keys: dict[str, Any]) -> tuple[bytes, bytes]:
    try:
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 -- optional
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(_EXTRA) from exc
    decoded: dict[str, bytes] = {}
    for field in ("p256dh", "auth"):
        value = keys.get(field)
        if not isinstance(value, str) or not value:
            raise InvalidRecipientError(f"push subscription has no keys.{field} string")
        try:
            decoded[field] = _b64url_decode(value)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRecipientError(
                f"push subscription keys.{field} is not base64url: {exc}"
            ) from exc
    if len(decoded["auth"]) != 16:
        raise InvalidRecipientError(
            f"push subscription keys.auth must be 16 bytes, got {len(decoded['auth'])}"
        )
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), decoded["p256dh"])
    except ValueError as exc:
        raise InvalidRecipientError(
            "push subscription keys.p256dh is not an uncompressed P-256 public key "
            f"({len(decoded['p256dh'])} bytes)"
        ) from exc
    return decoded["p256dh"], decoded["auth"]


def _load_vapid_key(text: str) -> EllipticCurvePrivateKey:
    try:
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 -- optional
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 -- optional
        from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415 -- optional
            load_der_private_key,
            load_pem_private_key,
        )
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(_EXTRA) from exc
    # The key text never goes into an error message.
    try:
        if "-----BEGIN" in text:
            key = load_pem_private_key(text.strip().encode(), password=None)
        else:
            raw = _b64url_decode(text)
            if len(raw) == 32:  # the raw scalar, as `web-push generate-vapid-keys` prints it
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            else:  # DER (PKCS#8 or SEC1), as py-vapid's `Vapid.from_string` takes it
                key = load_der_private_key(raw, password=None)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise ConfigurationError(
            "vapid_private_key must be a PEM EC key or a base64url P-256 private key "
            f"(raw 32 bytes or DER): {type(exc).__name__}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigurationError("vapid_private_key must be a P-256 (prime256v1) EC key")
    return key


class WebPushProvider(Provider):
    """Send browser push messages (Web Push protocol, encrypted, VAPID-authenticated).

    The payload is the JSON ``{"title": subject, "body": text, "data": data}`` (absent fields
    left out), which the service worker reads with ``event.data.json()``.

    Args:
        vapid_private_key: The application server's P-256 private key: PEM text, or base64url
            of the raw 32-byte key (``web-push generate-vapid-keys``) or of its DER form.
        vapid_subject: Contact for the push service: ``mailto:...`` or an ``https://`` URL.
        ttl: Seconds the push service keeps an undelivered message (``TTL`` header).
        timeout: Total deadline of one request, seconds.
        client: A ready ``httpx.AsyncClient`` to use (not closed by :meth:`aclose`).
        clock: Wall clock in seconds (VAPID expiry); injectable for tests.
        name: Provider name in results, metrics and breakers.
        allow_private_targets: Allow endpoints on loopback/private addresses (tests only);
            checked before each send, as for webhooks.

    Raises:
        ConfigurationError: A bad key, subject or ttl.
        ImportError: PyJWT, cryptography or http-ece is missing (the ``push`` extra).
    """

    channel: ClassVar[str] = "push"

    def __init__(
        self,
        *,
        vapid_private_key: str,
        vapid_subject: str,
        ttl: int = 86400,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "webpush",
        allow_private_targets: bool = False,
    ) -> None:
        try:
            import http_ece  # type: ignore[import-untyped]  # noqa: F401, PLC0415 -- checked here
            import jwt  # noqa: F401, PLC0415 -- fail at construction, not at the first send
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(_EXTRA) from exc
        if not (
            (vapid_subject.startswith("mailto:") and "@" in vapid_subject)
            or (vapid_subject.startswith("https://") and len(vapid_subject) > len("https://"))
        ):
            raise ConfigurationError(
                f"webpush provider {name!r}: vapid_subject must be 'mailto:<address>' or an "
                f"https:// URL, got {vapid_subject!r}"
            )
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0:
            raise ConfigurationError(
                f"webpush provider {name!r}: ttl must be an int >= 0, got {ttl!r}"
            )
        try:
            self._key = _load_vapid_key(vapid_private_key)
        except ConfigurationError as exc:
            raise ConfigurationError(f"webpush provider {name!r}: {exc}") from exc
        from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415 -- optional
            Encoding,
            PublicFormat,
        )

        public = self._key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        self.application_server_key = _b64url_encode(public)
        """The public key (base64url) to pass to ``pushManager.subscribe()``."""
        self.vapid_subject = vapid_subject
        self.ttl = ttl
        self.name = name
        self._clock = clock
        self.allow_private_targets = allow_private_targets
        self._http = HttpSender(name, timeout=timeout, client=client)

    def validate(self, recipient: str) -> str:
        """Check that ``recipient`` is a usable push subscription JSON.

        Raises:
            InvalidRecipientError: Not JSON, missing ``endpoint``/``keys``, keys of the wrong
                size or not base64url, or an endpoint that is not https (http on loopback only).
        """
        _parse_subscription(recipient)
        return recipient

    def handles(self, recipient: str) -> bool:
        """Serve subscription JSON objects; device tokens go to FCM on the same channel."""
        return recipient.lstrip().startswith("{")

    async def aclose(self) -> None:
        """Close the HTTP client (if this provider created it)."""
        await self._http.aclose()

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Encrypt and POST one message to the subscription's endpoint.

        Returns:
            A receipt whose id is the push service's ``Location`` (the message resource).

        Raises:
            InvalidRecipientError: A bad subscription (before any request).
            RecipientUnregisteredError: The push service answered 404 or 410 (subscription gone).
            PermanentDeliveryError: Nothing to send, a payload over 4096 bytes once encrypted,
                or another 4xx (413 too large, 403 VAPID refused, ...).
            DeliveryError: Network error, timeout, 429 or 5xx (transient).
        """
        sub = _parse_subscription(message.recipient)
        # The endpoint comes from a browser, so from whoever controls one: refuse endpoints on
        # private networks (server-side request forgery) as webhooks do.
        await check_target(
            sub.endpoint, allow_private=self.allow_private_targets, setting=_PRIVATE_SETTING
        )
        plaintext = self._payload(message)
        headers = {
            "Authorization": self._vapid_authorization(sub.origin),
            "TTL": str(self.ttl),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Urgency": _URGENCY.get(message.priority, "normal"),
        }
        response = await self._http.request(
            "POST",
            sub.endpoint,
            content=self._encrypt(plaintext, sub),
            headers=headers,
            gone_statuses=_GONE,
        )
        return SendReceipt(
            provider_message_id=response.headers.get("location") or None,
            detail=f"HTTP {response.status_code}",
        )

    def _payload(self, message: OutboundMessage) -> bytes:
        content: dict[str, Any] = {
            key: value
            for key, value in (
                ("title", message.subject),
                ("body", message.text),
                ("data", None if message.data is None else dict(message.data)),
            )
            if value is not None
        }
        if not content:
            raise PermanentDeliveryError(
                f"{self.name}: push needs a subject, text or data; message "
                f"{message.notification_id} has none"
            )
        try:
            plaintext = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise PermanentDeliveryError(
                f"{self.name}: push data is not JSON-serialisable: {exc}"
            ) from exc
        if len(plaintext) + _ECE_OVERHEAD > _MAX_BODY:
            raise PermanentDeliveryError(
                f"{self.name}: payload of {len(plaintext)} bytes is too large for Web Push: "
                f"encrypted it would exceed {_MAX_BODY} bytes (keep the JSON under "
                f"{_MAX_BODY - _ECE_OVERHEAD} bytes)"
            )
        return plaintext

    def _encrypt(self, plaintext: bytes, sub: _Subscription) -> bytes:
        import http_ece  # noqa: PLC0415 -- optional dependency, checked in __init__
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 -- optional

        ephemeral = ec.generate_private_key(ec.SECP256R1())
        try:
            body: bytes = http_ece.encrypt(
                plaintext,
                salt=os.urandom(16),
                private_key=ephemeral,
                dh=sub.p256dh,
                auth_secret=sub.auth,
                version="aes128gcm",
            )
        except (http_ece.ECEException, ValueError) as exc:
            raise PermanentDeliveryError(f"{self.name}: cannot encrypt the payload: {exc}") from exc
        return body

    def _vapid_authorization(self, audience: str) -> str:
        import jwt  # noqa: PLC0415 -- optional dependency, checked in __init__

        claims = {
            "aud": audience,
            "exp": int(self._clock()) + _VAPID_LIFETIME,
            "sub": self.vapid_subject,
        }
        try:
            token = jwt.encode(claims, self._key, algorithm="ES256")
        except jwt.PyJWTError as exc:
            raise PermanentDeliveryError(f"{self.name}: cannot sign the VAPID JWT: {exc}") from exc
        return f"vapid t={token}, k={self.application_server_key}"
