"""Firebase Cloud Messaging (HTTP v1 API) push provider.

Authentication is a Google service account: the provider signs a JWT assertion (RS256) with the
account's private key, trades it for an OAuth2 access token at the account's ``token_uri``, and
caches the token until shortly before it expires. Concurrent sends share one refresh; a ``401``
from FCM drops the token, refreshes once and retries the send once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import httpx

from dotmac.communications.errors import (
    ConfigurationError,
    DeliveryError,
    InvalidRecipientError,
    PermanentDeliveryError,
    RecipientUnregisteredError,
)
from dotmac.communications.notifications._models import OutboundMessage, SendReceipt
from dotmac.communications.notifications.channels._http import (
    _TRANSIENT_STATUSES,
    HttpSender,
    _host,
    parse_retry_after,
)
from dotmac.communications.notifications.channels.base import Provider
from dotmac.communications.notifications.channels.sms import _http_url, _json_or_none

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["FCMProvider"]

_EXTRA = "FCM needs the 'push' extra: pip install 'dotmac-communications[push]'"
_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105 -- a URL, not a secret
_ASSERTION_LIFETIME = 3600
_REFRESH_MARGIN = 60.0
"""Seconds before ``expires_in`` runs out at which the cached access token is replaced."""
_MAX_TOKEN_LENGTH = 4096
_RESERVED_DATA_KEYS = frozenset({"from", "message_type"})
_RESERVED_DATA_PREFIXES = ("google", "gcm")


@dataclass(frozen=True, slots=True)
class _AccessToken:
    value: str
    expires_at: float


def _load_service_account(source: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    text = os.fspath(source)
    where = "service_account JSON text"
    if not text.lstrip().startswith("{"):
        where = f"service account file {text!r}"
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"fcm: cannot read {where}: {exc.strerror or exc}") from exc
    try:
        account = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"fcm: {where} is not valid JSON: {exc}") from exc
    if not isinstance(account, dict):
        raise ConfigurationError(f"fcm: {where} must hold a JSON object")
    return account


def _load_rsa_key(pem: str, email: str) -> RSAPrivateKey:
    try:
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 -- optional
        from cryptography.hazmat.primitives.asymmetric.rsa import (  # noqa: PLC0415 -- optional
            RSAPrivateKey,
        )
        from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415 -- optional
            load_pem_private_key,
        )
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(_EXTRA) from exc
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The key text never goes into the message.
        raise ConfigurationError(
            f"fcm: private_key of service account {email!r} is not a PEM private key"
        ) from exc
    if not isinstance(key, RSAPrivateKey):
        raise ConfigurationError(
            f"fcm: private_key of service account {email!r} must be an RSA key, "
            f"got {type(key).__name__}"
        )
    return key


def _data_strings(provider: str, data: Mapping[str, Any]) -> dict[str, str]:
    # FCM data values must be strings: other values are sent as their JSON text (1, true, {...}).
    strings: dict[str, str] = {}
    for key, value in data.items():
        name = str(key)
        if name in _RESERVED_DATA_KEYS or name.lower().startswith(_RESERVED_DATA_PREFIXES):
            raise PermanentDeliveryError(
                f"{provider}: data key {name!r} is reserved by FCM "
                "('from', 'message_type', or starting with 'google' or 'gcm')"
            )
        if isinstance(value, str):
            strings[name] = value
            continue
        try:
            strings[name] = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise PermanentDeliveryError(
                f"{provider}: data value of {name!r} is not JSON-serialisable: {exc}"
            ) from exc
    return strings


def _fcm_error(response: httpx.Response) -> tuple[str | None, str]:
    """Return FCM's ``errorCode`` (from the error details) and a readable description."""
    answer = _json_or_none(response)
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        body = response.text[:300].strip()
        return None, body or "no error body"
    code = None
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and isinstance(detail.get("errorCode"), str):
            code = detail["errorCode"]
            break
    label = code or error.get("status") or ""
    return code, f"{label}: {error.get('message') or 'no message'}".lstrip(": ")


class FCMProvider(Provider):
    """Send push notifications through Firebase Cloud Messaging (HTTP v1).

    The recipient is a device registration token. ``subject`` and ``text`` become the
    notification title and body, ``data`` the data payload (non-string values sent as JSON
    text), and ``priority`` high/urgent maps to Android ``high`` and APNs priority 10.

    Args:
        service_account: The service account key: a mapping, a path to its JSON file, or the
            JSON text itself.
        project_id: Firebase project id; defaults to the service account's ``project_id``.
        base_url: FCM API root (a loopback server in tests).
        token_url: OAuth2 token endpoint; defaults to the service account's ``token_uri``.
        timeout: Total deadline of one request, seconds.
        client: A ready ``httpx.AsyncClient`` to use (not closed by :meth:`aclose`).
        clock: Wall clock in seconds (JWT times and token expiry); injectable for tests.
        name: Provider name in results, metrics and breakers.

    Raises:
        ConfigurationError: Unreadable service account, missing fields, or a key that is not RSA.
        ImportError: PyJWT or cryptography is missing (the ``push`` extra).
    """

    channel: ClassVar[str] = "push"

    def __init__(
        self,
        *,
        service_account: Mapping[str, Any] | str | os.PathLike[str],
        project_id: str | None = None,
        base_url: str = "https://fcm.googleapis.com",
        token_url: str | None = None,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "fcm",
    ) -> None:
        try:
            import jwt  # noqa: F401, PLC0415 -- fail at construction, not at the first send
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(_EXTRA) from exc
        account = _load_service_account(service_account)
        missing = [
            field
            for field in ("client_email", "private_key")
            if not isinstance(account.get(field), str) or not account[field]
        ]
        project = project_id or account.get("project_id")
        if not project or not isinstance(project, str):
            missing.append("project_id (argument or service account field)")
        if missing:
            raise ConfigurationError(f"fcm provider {name!r}: missing {', '.join(missing)}")
        self.name = name
        self.project_id = project
        self.client_email: str = account["client_email"]
        self.token_url = _http_url(
            token_url or account.get("token_uri") or _GOOGLE_TOKEN_URL,
            f"fcm provider {name!r}: token_url",
        )
        self._key = _load_rsa_key(account["private_key"], self.client_email)
        key_id = account.get("private_key_id")
        self._key_id = key_id if isinstance(key_id, str) and key_id else None
        base = _http_url(base_url, f"fcm provider {name!r}: base_url").rstrip("/")
        self._send_url = f"{base}/v1/projects/{project}/messages:send"
        self._http = HttpSender(name, timeout=timeout, client=client)
        self._clock = clock
        self._token: _AccessToken | None = None
        self._refresh_lock = asyncio.Lock()

    def validate(self, recipient: str) -> str:
        """Check that ``recipient`` looks like a registration token (printable, no spaces).

        Raises:
            InvalidRecipientError: Empty, too long, or containing spaces or control characters.
        """
        token = recipient.strip()
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            raise InvalidRecipientError(
                f"FCM registration token must be 1 to {_MAX_TOKEN_LENGTH} characters, "
                f"got {len(token)}"
            )
        if not token.isascii() or not token.isprintable() or " " in token:
            raise InvalidRecipientError(
                f"FCM registration token {token[:40]!r} has spaces or non-ASCII characters"
            )
        return token

    def handles(self, recipient: str) -> bool:
        """Serve device tokens, not Web Push subscriptions (JSON objects)."""
        return not recipient.lstrip().startswith("{") and "://" not in recipient

    async def aclose(self) -> None:
        """Close the HTTP client (if this provider created it)."""
        await self._http.aclose()

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send one FCM message; FCM's message ``name`` is the provider message id.

        Raises:
            InvalidRecipientError: A malformed token (before any request).
            RecipientUnregisteredError: FCM says the token is unregistered.
            PermanentDeliveryError: Nothing to send, reserved data keys, refused credentials,
                or another 4xx from FCM.
            DeliveryError: Network error, timeout, 429 or 5xx (transient).
        """
        body = {"message": self._message(message, self.validate(message.recipient))}
        token = await self._access_token()
        response = await self._post(token, body)
        if response.status_code == 401 and _fcm_error(response)[0] != "THIRD_PARTY_AUTH_ERROR":
            # The token was revoked or expired early: one fresh token, one more try.
            self._forget(token)
            response = await self._post(await self._access_token(), body)
        if not response.is_success:
            self._raise_for_send_status(response)
        answer = _json_or_none(response)
        name = answer.get("name") if isinstance(answer, dict) else None
        return SendReceipt(
            provider_message_id=str(name) if name else None,
            detail=f"HTTP {response.status_code}",
        )

    def _message(self, message: OutboundMessage, token: str) -> dict[str, Any]:
        urgent = message.priority in ("high", "urgent")
        fcm: dict[str, Any] = {"token": token}
        notification = {
            key: value
            for key, value in (("title", message.subject), ("body", message.text))
            if value is not None
        }
        if notification:
            fcm["notification"] = notification
        if message.data:
            fcm["data"] = _data_strings(self.name, message.data)
        if "notification" not in fcm and "data" not in fcm:
            raise PermanentDeliveryError(
                f"{self.name}: push needs a subject, text or data; message "
                f"{message.notification_id} has none"
            )
        fcm["android"] = {"priority": "high" if urgent else "normal"}
        fcm["apns"] = {"headers": {"apns-priority": "10" if urgent else "5"}}
        return fcm

    async def _post(self, token: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return await self._http.request(
            "POST", self._send_url, check=False, json=body, headers=headers
        )

    def _raise_for_send_status(self, response: httpx.Response) -> NoReturn:
        status = response.status_code
        code, description = _fcm_error(response)
        text = f"{self.name}: HTTP {status} from {_host(self._send_url)}: {description}"
        if code == "UNREGISTERED":
            raise RecipientUnregisteredError(text)
        if status in _TRANSIENT_STATUSES or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise DeliveryError(text, retry_after=retry_after)
        if status == 401:
            text += f" (access token of service account {self.client_email!r} refused twice)"
        elif status == 404:
            text += f" (no UNREGISTERED code: check project_id {self.project_id!r})"
        raise PermanentDeliveryError(text)

    async def _access_token(self) -> str:
        token = self._token
        if token is not None and self._clock() < token.expires_at:
            return token.value
        async with self._refresh_lock:
            # Whoever waited on the lock finds the token the first holder fetched.
            token = self._token
            if token is None or self._clock() >= token.expires_at:
                token = self._token = await self._fetch_token()
            return token.value

    def _forget(self, value: str) -> None:
        # Only the token that failed: a concurrent send may already have replaced it.
        if self._token is not None and self._token.value == value:
            self._token = None

    def _assertion(self, now: int) -> str:
        import jwt  # noqa: PLC0415 -- optional dependency, checked in __init__

        claims = {
            "iss": self.client_email,
            "scope": _SCOPE,
            "aud": self.token_url,
            "iat": now,
            "exp": now + _ASSERTION_LIFETIME,
        }
        headers = {"kid": self._key_id} if self._key_id else None
        try:
            return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)
        except jwt.PyJWTError as exc:
            raise PermanentDeliveryError(
                f"{self.name}: cannot sign the token request of {self.client_email!r}: {exc}"
            ) from exc

    async def _fetch_token(self) -> _AccessToken:
        now = self._clock()
        form = {"grant_type": _GRANT_TYPE, "assertion": self._assertion(int(now))}
        response = await self._http.request("POST", self.token_url, check=False, data=form)
        status = response.status_code
        answer = _json_or_none(response)
        answer = answer if isinstance(answer, dict) else {}
        if response.is_success:
            value = answer.get("access_token")
            if not isinstance(value, str) or not value:
                raise PermanentDeliveryError(
                    f"{self.name}: token endpoint {_host(self.token_url)} answered "
                    f"HTTP {status} without an access_token"
                )
            expires_in = answer.get("expires_in", _ASSERTION_LIFETIME)
            if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
                expires_in = _ASSERTION_LIFETIME
            return _AccessToken(value, now + float(expires_in) - _REFRESH_MARGIN)
        reason = ": ".join(
            str(answer[field]) for field in ("error", "error_description") if answer.get(field)
        )
        text = (
            f"{self.name}: token endpoint {_host(self.token_url)} answered HTTP {status} "
            f"for service account {self.client_email!r}: "
            f"{reason or response.text[:300].strip() or 'no error body'}"
        )
        if status in _TRANSIENT_STATUSES or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise DeliveryError(text, retry_after=retry_after)
        raise PermanentDeliveryError(text)
