"""Shared HTTP plumbing for the HTTP providers (SMS, push, webhook, chat).

One pooled httpx client per provider, a total deadline per request, and the mapping of httpx
errors and HTTP statuses to the library's errors.

Status classes: 2xx = accepted; 408, 425, 429 and 5xx = transient (:class:`DeliveryError`, with
``Retry-After`` honoured); 404/410 = :class:`RecipientUnregisteredError` when the provider says so
(``gone_statuses``); any other 4xx = :class:`PermanentDeliveryError`.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Collection, Mapping
from typing import Any

import httpx

from dotmac.communications.errors import (
    CommunicationsError,
    DeliveryError,
    OperationTimeoutError,
    PermanentDeliveryError,
    RecipientUnregisteredError,
)

__all__ = ["HttpSender", "check_status", "parse_retry_after", "request_error"]

_TRANSIENT_STATUSES = frozenset({408, 425, 429})
_MAX_BODY_IN_ERROR = 300


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


REQUEST_ERRORS = (TimeoutError, httpx.TransportError, httpx.InvalidURL)
"""What a request raises that :func:`request_error` maps (httpx's timeouts are transport errors)."""


def request_error(
    provider: str, url: str, timeout: float, exc: BaseException
) -> CommunicationsError:
    """The library error for ``exc``, one of :data:`REQUEST_ERRORS`, raised requesting ``url``.

    A timeout (the total deadline, or one of httpx's) is an :class:`OperationTimeoutError`, any
    other transport error a :class:`DeliveryError` (both transient), an invalid URL a
    :class:`PermanentDeliveryError`.
    """
    if isinstance(exc, TimeoutError):
        return OperationTimeoutError(f"{provider}: no answer from {_host(url)} within {timeout}s")
    if isinstance(exc, httpx.TimeoutException):
        return OperationTimeoutError(f"{provider}: {type(exc).__name__} talking to {_host(url)}")
    if isinstance(exc, httpx.TransportError):
        return DeliveryError(f"{provider}: cannot reach {_host(url)}: {type(exc).__name__}: {exc}")
    return PermanentDeliveryError(f"{provider}: invalid URL {url!r}: {exc}")


class HttpSender:
    """A pooled ``httpx.AsyncClient`` with error mapping, owned by one provider.

    Args:
        provider: Provider name used in error messages.
        timeout: Total deadline of one request (connect + send + wait + read), seconds.
        max_connections: Connections kept per client (caps per-host concurrency).
        client: A ready client to use instead (not closed by :meth:`aclose`).
        headers: Headers sent with every request.
        auth: httpx auth (basic auth for Twilio).
    """

    def __init__(
        self,
        provider: str,
        *,
        timeout: float = 10.0,
        max_connections: int = 20,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
    ) -> None:
        self.provider = provider
        self.timeout = timeout
        self._owned = client is None
        self._client = client
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._headers = dict(headers or {})
        self._auth = auth

    @property
    def client(self) -> httpx.AsyncClient:
        """The client (created on first use)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=self._limits,
                timeout=httpx.Timeout(self.timeout),
                headers=self._headers,
                auth=self._auth,
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the client if this sender created it."""
        client, self._client = self._client, None
        if client is not None and self._owned:
            await client.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        gone_statuses: Collection[int] = (),
        check: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request within the total deadline; return a 2xx response or raise.

        With ``check=False`` any answer is returned, for providers that read an error body
        before deciding (Twilio's and FCM's error codes); transport errors still raise.

        Raises:
            OperationTimeoutError: No full answer within ``timeout`` (transient).
            DeliveryError: Network error, 408/425/429 or 5xx (transient, ``retry_after`` set
                from ``Retry-After``).
            RecipientUnregisteredError: A status in ``gone_statuses``.
            PermanentDeliveryError: Any other non-2xx answer.
        """
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.client.request(method, url, **kwargs)
        except REQUEST_ERRORS as exc:
            raise request_error(self.provider, url, self.timeout, exc) from exc
        if check:
            check_status(self.provider, response, gone_statuses=gone_statuses)
        return response


def check_status(
    provider: str,
    response: httpx.Response,
    *,
    gone_statuses: Collection[int] = (),
    url: str | None = None,
) -> None:
    """Raise the library error for a non-2xx ``response`` (see the module docstring).

    ``url`` names the target when the response carries no request.
    """
    status = response.status_code
    if 200 <= status < 300:
        return
    body = response.text[:_MAX_BODY_IN_ERROR].strip()
    what = f"{provider}: HTTP {status} from {_host(url or str(response.request.url))}"
    if body:
        what = f"{what}: {body}"
    if status in gone_statuses:
        raise RecipientUnregisteredError(what)
    if status in _TRANSIENT_STATUSES or status >= 500:
        raise DeliveryError(
            what, retry_after=parse_retry_after(response.headers.get("retry-after"))
        )
    raise PermanentDeliveryError(what)


def _host(url: str) -> str:
    # Error messages name the host, never the path or query (tokens and secrets live there).
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid url>"
    return f"{parsed.scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else "")
