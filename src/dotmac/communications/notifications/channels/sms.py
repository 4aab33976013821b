"""SMS providers: Twilio's REST API and a generic JSON-over-HTTP gateway.

Recipients (and sender numbers) are phone numbers in international E.164 form (``+`` and the
country code); :func:`normalize_e164` checks them with ``phonenumbers`` before anything is sent,
so a bad number fails with :class:`~dotmac.communications.errors.InvalidRecipientError` and no
request is made.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

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

__all__ = ["HttpSmsProvider", "TwilioProvider", "normalize_e164"]

# Twilio error codes (https://www.twilio.com/docs/api/errors) that condemn the recipient itself:
# no other provider can do better, so they are not failed over.
_TWILIO_BAD_NUMBER = frozenset({21211, 21214, 21217, 21401, 21407, 21614})
"""Invalid 'To' number, not reachable / not a mobile number, unsupported region."""
_TWILIO_OPTED_OUT = frozenset({21610})
"""The recipient replied STOP: sending again is refused (and unlawful in many places)."""

_PLACEHOLDER = re.compile(r"\{(to|from|body|id)\}")


def normalize_e164(number: str) -> str:
    """Check a phone number and return it in E.164 form (``+442079460958``).

    The number must be international (``+`` and the country code); spaces, dashes and
    parentheses are allowed and removed. No default region is assumed.

    Args:
        number: The phone number, e.g. ``"+44 20 7946 0958"``.

    Returns:
        The number in E.164 form.

    Raises:
        InvalidRecipientError: The number is not international, cannot be parsed, or is not a
            possible and valid number for its country.
    """
    import phonenumbers  # noqa: PLC0415 -- a core dependency, but loading its metadata is slow

    text = number.strip()
    if not text.startswith("+"):
        raise InvalidRecipientError(
            f"phone number {number!r} must be in international E.164 form, "
            "starting with '+' and the country code (e.g. +14155550100)"
        )
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidRecipientError(f"phone number {number!r} cannot be parsed: {exc}") from exc
    if not phonenumbers.is_possible_number(parsed):
        raise InvalidRecipientError(
            f"phone number {number!r} is impossible (wrong length for its country code)"
        )
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidRecipientError(f"phone number {number!r} is not a valid number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # not JSON (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
        return None


def _needs_text(provider: str, message: OutboundMessage) -> str:
    if not message.text:
        raise PermanentDeliveryError(
            f"{provider}: sms needs text, and message {message.notification_id} has none"
        )
    return message.text


def _http_url(url: str, what: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(f"{what} is not a valid URL: {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(f"{what} must be an http(s) URL with a host, got {url!r}")
    return url


class _SmsProvider(Provider):
    """E.164 recipients and senders, a text body: what every SMS provider checks first."""

    def validate(self, recipient: str) -> str:
        """Return ``recipient`` in E.164 form.

        Raises:
            InvalidRecipientError: Not a valid international phone number.
        """
        return normalize_e164(recipient)

    def check(self, message: OutboundMessage) -> None:
        """Refuse a malformed ``sender`` number or an empty body before anything is sent."""
        if message.sender:
            normalize_e164(message.sender)
        _needs_text(self.name, message)


class TwilioProvider(_SmsProvider):
    """Send SMS through Twilio's Programmable Messaging REST API.

    Args:
        account_sid: The account SID (``AC...``); also the basic-auth user name.
        auth_token: The auth token (basic-auth password).
        from_number: Default sender number (E.164); ``message.sender`` overrides it.
        messaging_service_sid: Messaging Service SID (``MG...``), used when no sender number is
            known (or beside it: Twilio then picks the service's settings). One of
            ``from_number`` and ``messaging_service_sid`` is required.
        base_url: API root (a loopback server in tests).
        timeout: Total deadline of one request, seconds.
        client: A ready ``httpx.AsyncClient`` to use (not closed by :meth:`aclose`).
        name: Provider name in results, metrics and breakers.

    Raises:
        ConfigurationError: Missing credentials, no sender, or a sender that is not E.164.

    Errors while sending: Twilio error 21610 (recipient opted out with STOP) raises
    :class:`~dotmac.communications.errors.RecipientUnregisteredError`; invalid / unreachable /
    non-mobile ``To`` numbers (21211, 21214, 21217, 21401, 21407, 21614) raise
    :class:`~dotmac.communications.errors.InvalidRecipientError`; 429 and 5xx are transient; any
    other 4xx is permanent. Twilio's error code and message are in the error text.
    """

    channel: ClassVar[str] = "sms"

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        base_url: str = "https://api.twilio.com",
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        name: str = "twilio",
    ) -> None:
        problems = []
        if not account_sid:
            problems.append("account_sid is required")
        elif not account_sid.isascii() or not account_sid.isalnum():
            problems.append(f"account_sid must be letters and digits (AC...), got {account_sid!r}")
        if not auth_token:
            problems.append("auth_token is required")
        if not from_number and not messaging_service_sid:
            problems.append("give from_number or messaging_service_sid")
        if problems:
            raise ConfigurationError(f"twilio provider {name!r}: " + "; ".join(problems))
        if from_number:
            try:
                from_number = normalize_e164(from_number)
            except InvalidRecipientError as exc:
                raise ConfigurationError(f"twilio provider {name!r}: from_number: {exc}") from exc
        self.name = name
        self.account_sid = account_sid
        self.from_number = from_number or None
        self.messaging_service_sid = messaging_service_sid or None
        base = _http_url(base_url, f"twilio provider {name!r}: base_url").rstrip("/")
        self._url = f"{base}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._auth = httpx.BasicAuth(account_sid, auth_token)
        self._http = HttpSender(name, timeout=timeout, client=client)

    async def aclose(self) -> None:
        """Close the HTTP client (if this provider created it)."""
        await self._http.aclose()

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Create one Twilio Message; its SID is the provider message id.

        Raises:
            InvalidRecipientError: Bad ``To`` or sender number (before any request), or Twilio
                says the number is invalid or unreachable.
            RecipientUnregisteredError: The recipient opted out (Twilio 21610).
            PermanentDeliveryError: No text, or Twilio refused the request.
            DeliveryError: Network error, timeout, 429 or 5xx (transient).
        """
        to = normalize_e164(message.recipient)
        body = _needs_text(self.name, message)
        form = {"To": to}
        sender = normalize_e164(message.sender) if message.sender else self.from_number
        if sender:
            form["From"] = sender
        if self.messaging_service_sid:
            form["MessagingServiceSid"] = self.messaging_service_sid
        form["Body"] = body
        response = await self._http.request(
            "POST", self._url, check=False, data=form, auth=self._auth
        )
        if not response.is_success:
            self._raise_for_status(response, to)
        answer = _json_or_none(response)
        if not isinstance(answer, dict):
            answer = {}
        sid, status = answer.get("sid"), answer.get("status")
        return SendReceipt(
            provider_message_id=str(sid) if sid else None,
            detail=str(status) if status else f"HTTP {response.status_code}",
        )

    def _raise_for_status(self, response: httpx.Response, to: str) -> NoReturn:
        status = response.status_code
        error = _json_or_none(response)
        if isinstance(error, dict) and isinstance(error.get("code"), int):
            code: int = error["code"]
            text = f"{self.name}: Twilio error {code} (HTTP {status}) for {to}: "
            text += str(error.get("message") or "no message")
            if code in _TWILIO_OPTED_OUT:
                raise RecipientUnregisteredError(text)
            if code in _TWILIO_BAD_NUMBER:
                raise InvalidRecipientError(text)
        else:
            text = f"{self.name}: HTTP {status} from {_host(self._url)}"
            if body := response.text[:300].strip():
                text = f"{text}: {body}"
        if status in _TRANSIENT_STATUSES or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise DeliveryError(text, retry_after=retry_after)
        raise PermanentDeliveryError(text)


class HttpSmsProvider(_SmsProvider):
    """Send SMS through any gateway that takes a JSON body over HTTP.

    The body is ``body_template`` with the placeholders ``{to}``, ``{from}``, ``{body}`` and
    ``{id}`` (the notification id) replaced in every string value, at any depth (dicts and
    lists). Replacement is literal and single-pass: text that itself contains ``{to}`` is sent
    as written, and no other braces are interpreted.

    Args:
        url: The gateway endpoint (http or https).
        method: ``POST``, ``PUT`` or ``PATCH``.
        body_template: The JSON body with placeholders, e.g.
            ``{"messages": [{"to": "{to}", "text": "{body}"}]}``.
        from_number: Default sender number (E.164) for ``{from}``; ``message.sender`` overrides.
        auth_header: One header sent with every request, e.g. ``("Authorization", "Bearer x")``.
        message_id_field: Dotted path of the message id in the JSON answer (``data.id``,
            ``messages.0.id``); a missing id is not an error (the gateway accepted the message).
        timeout: Total deadline of one request, seconds.
        client: A ready ``httpx.AsyncClient`` to use (not closed by :meth:`aclose`).
        name: Provider name in results, metrics and breakers.

    Raises:
        ConfigurationError: Bad URL, method, template, sender or header.
    """

    channel: ClassVar[str] = "sms"

    def __init__(
        self,
        *,
        url: str,
        method: str = "POST",
        body_template: Mapping[str, Any],
        from_number: str | None = None,
        auth_header: tuple[str, str] | None = None,
        message_id_field: str | None = None,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        name: str = "http-sms",
    ) -> None:
        where = f"http-sms provider {name!r}"
        self.url = _http_url(url, f"{where}: url")
        self.method = method.upper()
        if self.method not in ("POST", "PUT", "PATCH"):
            raise ConfigurationError(f"{where}: method must be POST, PUT or PATCH, got {method!r}")
        if not isinstance(body_template, Mapping) or not body_template:
            raise ConfigurationError(f"{where}: body_template must be a non-empty mapping")
        try:
            # Mappings at any depth become dicts; anything else must already be JSON.
            json.dumps(
                _substitute(body_template, dict.fromkeys(("to", "from", "body", "id"), ""), name)
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{where}: body_template is not JSON-serialisable: {exc}"
            ) from exc
        self.body_template = body_template
        if from_number:
            try:
                from_number = normalize_e164(from_number)
            except InvalidRecipientError as exc:
                raise ConfigurationError(f"{where}: from_number: {exc}") from exc
        self.from_number = from_number or None
        headers: dict[str, str] = {}
        if auth_header is not None:
            header, value = auth_header
            if not header or any(c in header + value for c in "\r\n") or ":" in header:
                raise ConfigurationError(
                    f"{where}: auth_header must be (name, value) without ':' in the name "
                    f"and no CR/LF, got name {header!r}"
                )
            headers[header] = value
        self._headers = headers
        self.message_id_field = message_id_field or None
        self.name = name
        self._http = HttpSender(name, timeout=timeout, client=client)

    async def aclose(self) -> None:
        """Close the HTTP client (if this provider created it)."""
        await self._http.aclose()

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send the rendered template; the id at ``message_id_field`` is the provider id.

        Raises:
            InvalidRecipientError: Bad recipient or sender number (before any request).
            PermanentDeliveryError: No text, the template needs ``{from}`` and there is no
                sender, or the gateway answered another 4xx.
            DeliveryError: Network error, timeout, 408/425/429 or 5xx (transient).
        """
        to = normalize_e164(message.recipient)
        text = _needs_text(self.name, message)
        sender = normalize_e164(message.sender) if message.sender else self.from_number
        values = {"to": to, "from": sender, "body": text, "id": message.notification_id}
        body = _substitute(self.body_template, values, self.name)
        response = await self._http.request(self.method, self.url, json=body, headers=self._headers)
        detail = f"HTTP {response.status_code}"
        if self.message_id_field is None:
            return SendReceipt(detail=detail)
        found = _dig(_json_or_none(response), self.message_id_field)
        if found is None or isinstance(found, (dict, list)):
            return SendReceipt(detail=f"{detail}; no id at {self.message_id_field!r} in the answer")
        return SendReceipt(provider_message_id=str(found), detail=detail)


def _substitute(template: Any, values: Mapping[str, str | None], provider: str) -> Any:
    if isinstance(template, str):

        def replace(match: re.Match[str]) -> str:
            value = values[match.group(1)]
            if value is None:
                raise PermanentDeliveryError(
                    f"{provider}: body_template uses {{{match.group(1)}}} but the message has "
                    "no sender and no from_number is configured"
                )
            return value

        return _PLACEHOLDER.sub(replace, template)
    if isinstance(template, Mapping):
        return {key: _substitute(item, values, provider) for key, item in template.items()}
    if isinstance(template, list | tuple):
        return [_substitute(item, values, provider) for item in template]
    return template


def _dig(document: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(document, dict):
            document = document.get(part)
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return None
    return document
