"""The private-target guard of the webhook and chat providers, and their shared HTTP client.

A webhook URL comes from whoever configures a notification, so without a guard the library would
POST wherever it is told: to ``http://127.0.0.1:6379``, to a cloud metadata service
(``169.254.169.254``) or to any host on the internal network (server-side request forgery). The
guard refuses targets that are not plain ``http``/``https`` URLs with a host, and hosts that
resolve to a loopback, private, link-local, shared (CGNAT), multicast, reserved or unspecified
address, unless ``allow_private_targets`` is set.

**Pinned resolution.** A check that resolves a name and a connect that resolves it again can be
told apart by a hostile DNS server (DNS rebinding: public address for the check, ``127.0.0.1`` for
the connect). The clients built here avoid that: their httpcore network backend resolves the host
once, checks every address, and connects to the checked address itself (TLS still verifies the
certificate against the host name). :func:`check_target` is the stand-alone check; it is used
before each request only when a ready client was injected, whose connects the guard cannot see, so
injected clients keep the rebinding gap. Proxies are never used (``trust_env=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import select
import socket
import ssl
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import httpcore
import httpx

from dotmac.communications.errors import (
    CommunicationsError,
    ConfigurationError,
    DeliveryError,
    InvalidRecipientError,
    OperationTimeoutError,
    PermanentDeliveryError,
)
from dotmac.communications.notifications.channels._http import (
    REQUEST_ERRORS,
    check_status,
    request_error,
)

__all__ = ["GuardedHttp", "check_target", "describe_url", "user_agent", "validate_url"]

_SCHEMES = frozenset({"http", "https"})
_WEBHOOK_SETTING = "notifications.webhook.allow_private_targets"
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Embedded IPv4 in NAT64's well-known prefix reaches that IPv4 address through the gateway.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@functools.cache
def user_agent() -> str:
    """The ``User-Agent`` of the HTTP providers: ``dotmac-communications/<version>``."""
    try:
        version = metadata.version("dotmac-communications")
    except metadata.PackageNotFoundError:
        version = "0"
    return f"dotmac-communications/{version}"


def describe_url(url: str) -> str:
    """Name ``url`` in a message without its credentials, query or fragment."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return repr(url.split("?", 1)[0][:100])
    if not parsed.scheme or not parsed.host:
        return repr(url.split("?", 1)[0].split("#", 1)[0][:100])
    return repr(str(parsed.copy_with(userinfo=b"", query=None, fragment=None)))


_MAX_HOST_POOLS = 64
"""Connection pools (one per target host) kept open per provider."""


@functools.lru_cache(maxsize=4096)
def _parse(url: str) -> httpx.URL:
    # Cached: one send checks its URL in validate(), again before connecting, and for its
    # per-host slot; parsing is the costliest of those steps. Errors are not cached.
    return httpx.URL(url)


def validate_url(url: str) -> str:
    """Check that ``url`` is an absolute ``http``/``https`` URL with a host (syntax only).

    Returns:
        ``url``, unchanged.

    Raises:
        InvalidRecipientError: Not a string, not http(s), no host, or not a valid URL.
    """
    if not isinstance(url, str):
        raise InvalidRecipientError(f"target URL must be a string, got {type(url).__name__}")
    return _validate_url(url)


@functools.lru_cache(maxsize=4096)  # valid URLs only: a raised error is not cached
def _validate_url(url: str) -> str:
    if not url or any(c.isspace() for c in url):
        raise InvalidRecipientError(f"target URL must be non-empty without spaces: {url[:100]!r}")
    try:
        parsed = _parse(url)
    except httpx.InvalidURL as exc:
        raise InvalidRecipientError(f"invalid target URL {describe_url(url)}: {exc}") from exc
    if parsed.scheme not in _SCHEMES:
        raise InvalidRecipientError(
            f"target URL {describe_url(url)} must use http or https, "
            f"not {parsed.scheme or 'no scheme'!r}"
        )
    if not parsed.host:
        raise InvalidRecipientError(f"target URL {describe_url(url)} has no host")
    return url


def check_literal(url: str, *, allow_private: bool, setting: str = _WEBHOOK_SETTING) -> None:
    """Refuse ``url`` when its host is a private IP literal (no DNS; for ``Provider.validate``).

    Raises:
        InvalidRecipientError: The URL is invalid, or its host is a non-public IP literal.
    """
    validate_url(url)
    if allow_private:
        return
    literal = _ip_literal(_parse(url).host)
    if literal is not None and not _is_public(literal):
        raise InvalidRecipientError(
            f"target URL {describe_url(url)} is a private/loopback address ({literal}); "
            f"set {setting} to allow it"
        )


async def check_target(url: str, *, allow_private: bool, setting: str = _WEBHOOK_SETTING) -> None:
    """Check that ``url`` is an http(s) URL whose host resolves only to public addresses.

    IP literals are checked as they are; names are resolved (``loop.getaddrinfo``) and refused if
    ANY address is not public. The connect that follows resolves again, so a hostile DNS server
    can answer differently then (DNS rebinding): the providers' own clients pin the checked
    address instead (see the module docstring); this function guards injected clients.

    Args:
        url: The target.
        allow_private: Skip the address check (syntax is still checked).
        setting: The setting named in the refusal message.

    Raises:
        InvalidRecipientError: Bad syntax, or a non-public address.
        DeliveryError: The host name does not resolve (transient: DNS may recover).
    """
    parsed = httpx.URL(validate_url(url))
    if allow_private:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = await _resolve(parsed.host, port)
    refused = [a for a in addresses if not _is_public(a)]
    if refused:
        raise InvalidRecipientError(
            f"target URL {describe_url(url)} resolves to a private/loopback address "
            f"({refused[0]}); set {setting} to allow it"
        )


@functools.lru_cache(maxsize=4096)  # valid URLs only (see post)
def _pool_key(url: str) -> tuple[str, str, int | None]:
    # The per-host pool and slot of a valid URL: reading an httpx.URL's parts costs per send.
    parsed = _parse(url)
    return (parsed.scheme, parsed.host, parsed.port)


@functools.lru_cache(maxsize=4096)  # per send for names, where the failed parse costs most
def _ip_literal(host: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_public(address: _IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return _is_public(embedded)
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global  # also shared address space 100.64.0.0/10 (CGNAT)
    )


async def _resolve(host: str, port: int) -> list[_IPAddress]:
    literal = _ip_literal(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DeliveryError(f"cannot resolve target host {host!r}: {exc}") from exc
    addresses: dict[_IPAddress, None] = {}
    for info in infos:
        # The scope of a link-local IPv6 address ("fe80::1%eth0") is not part of the address.
        addresses[ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])] = None
    if not addresses:
        raise DeliveryError(f"cannot resolve target host {host!r}: no addresses")
    return list(addresses)


def _readable(sock: socket.socket | None) -> bool:
    # Whether recv() would return at once (for an idle pooled connection: the server closed
    # it), without reading; a socket without a descriptor counts as readable (closed).
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    """An httpcore network stream with its socket looked up once.

    httpcore asks every pooled connection whether its socket is readable on each request, and
    anyio builds its whole attribute table to answer; here the answer is one ``poll``.
    """

    __slots__ = ("_inner", "_socket")

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return _readable(self._socket)
        if info == "socket":
            return self._socket
        return self._inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """anyio's backend with :class:`_Stream` streams and, when ``setting`` is given, the guard.

    The guard resolves once, refuses non-public addresses and connects to the checked address
    (no rebinding).
    """

    def __init__(self, setting: str | None) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._setting = setting

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._setting is None:
            return _Stream(
                await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
            )
        try:
            async with asyncio.timeout(timeout):
                addresses = await _resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host!r} took over {timeout}s") from exc
        refused = [a for a in addresses if not _is_public(a)]
        if refused:
            raise InvalidRecipientError(
                f"target host {host!r} resolves to a private/loopback address ({refused[0]}); "
                f"set {self._setting} to allow it"
            )
        *others, final = addresses  # _resolve never returns an empty list
        for address in others:
            with contextlib.suppress(httpcore.ConnectError):  # try the next address
                return _Stream(
                    await self._inner.connect_tcp(
                        str(address), port, timeout, local_address, socket_options
                    )
                )
        return _Stream(
            await self._inner.connect_tcp(str(final), port, timeout, local_address, socket_options)
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise InvalidRecipientError("Unix socket targets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _HostPool:
    """Keep-alive HTTP/1.1 connections to one origin, reused most recently used first.

    The caller caps concurrent requests (GuardedHttp's per-host semaphore), so this needs no
    queue: a request takes an idle connection or opens one, and gives it back when the
    response is read. httpcore's own pool rescans every connection and queued request on each
    request and release, about a quarter of a webhook's instructions at 10 connections. A connection
    that failed or was cancelled mid-request has closed itself (httpcore) and is dropped.
    """

    __slots__ = ("_backend", "_closed", "_idle", "_ssl_context")

    def __init__(self, ssl_context: ssl.SSLContext, backend: httpcore.AsyncNetworkBackend) -> None:
        self._ssl_context = ssl_context
        self._backend = backend
        self._idle: list[httpcore.AsyncHTTPConnection] = []
        self._closed = False

    async def request(
        self, target: httpcore.URL, headers: list[tuple[bytes, bytes]], content: bytes
    ) -> httpcore.Response:
        idle = self._idle
        conn = None
        while idle:
            candidate = idle.pop()
            if candidate.is_idle() and not candidate.has_expired():  # one poll(): closed by peer?
                conn = candidate
                break
            await candidate.aclose()
        if conn is None:
            conn = httpcore.AsyncHTTPConnection(
                origin=target.origin,
                ssl_context=self._ssl_context,
                keepalive_expiry=_KEEPALIVE_EXPIRY,
                network_backend=self._backend,
            )
        response = await conn.request(b"POST", target, headers=headers, content=content)
        if self._closed or not conn.is_idle():
            await conn.aclose()  # a closed pool, or the server said Connection: close
        else:
            idle.append(conn)
            oldest = idle[0]
            if oldest is not conn and oldest.has_expired():  # idle past keep-alive
                del idle[0]
                await oldest.aclose()
        return response

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


_CORE_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)
"""What a request on our own httpcore connections raises (httpx maps these for its clients)."""

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_KEEPALIVE_EXPIRY = 5.0  # seconds an idle pooled connection is kept (httpx's default)


@functools.lru_cache(maxsize=4096)  # valid URLs only (see post)
def _core_target(url: str) -> tuple[httpcore.URL, tuple[bytes, bytes]]:
    # The httpcore URL of a valid URL and its Host header (what httpx derives per request).
    parsed = _parse(url)
    core = httpcore.URL(
        scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path
    )
    return core, (b"Host", parsed.netloc)


def _core_error(provider: str, url: str, exc: Exception) -> CommunicationsError:
    # The library error for an httpcore exception (as request_error() does for httpx's).
    if isinstance(exc, httpcore.TimeoutException):
        return OperationTimeoutError(f"{provider}: {type(exc).__name__} talking to "
                                     f"{describe_url(url)}")  # fmt: skip
    if isinstance(exc, httpcore.LocalProtocolError | httpcore.UnsupportedProtocol):
        return PermanentDeliveryError(f"{provider}: cannot send to {describe_url(url)}: "
                                      f"{type(exc).__name__}: {exc}")  # fmt: skip
    return DeliveryError(
        f"{provider}: cannot reach {describe_url(url)}: {type(exc).__name__}: {exc}"
    )


def _encode_headers(provider: str, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    try:
        return [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()]
    except UnicodeEncodeError as exc:
        bad = next(name for name, value in headers.items() if not (name + value).isascii())
        raise PermanentDeliveryError(
            f"{provider}: header {bad!r} is not ASCII; HTTP header values must be"
        ) from exc


def _refuse_redirect(provider: str, url: str, status: int, location: str) -> None:
    # A redirect could lead anywhere (an internal host included) and would drop the POST body.
    raise PermanentDeliveryError(
        f"{provider}: HTTP {status} redirect from {describe_url(url)} to {describe_url(location)}:"
        " redirects are not followed; configure the final URL"
    )


class GuardedHttp:
    """The HTTP client of a webhook or chat provider: guarded targets, per-host concurrency cap.

    Requests go straight to httpcore connections (httpx's own HTTP engine), kept alive per
    target host (:class:`_HostPool`) and made through a network backend that pins the checked
    address. An httpx client would add ~0.65M instructions per request (request and response
    models, cookie jar, hooks, pool scans) that a webhook needs none of; an injected client is
    used as it is.

    Args:
        provider: Provider name used in error messages.
        timeout: Total deadline of one send (queueing, resolution, connect, request, response).
        max_connections: Concurrent requests (and so connections) per target host.
        allow_private_targets: Allow loopback/private/link-local targets.
        setting: The setting named when a private target is refused.
        client: A ready httpx client (not closed here; its connects are not pinned, see the
            module doc).
        default_headers: Headers sent with every request unless the request sets them.
        ssl_context: TLS settings of ``https`` targets (e.g. a private CA); default: the
            system's verification with certifi's CA bundle, as httpx.
    """

    def __init__(
        self,
        provider: str,
        *,
        timeout: float,
        max_connections: int,
        allow_private_targets: bool,
        setting: str = _WEBHOOK_SETTING,
        client: httpx.AsyncClient | None = None,
        default_headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not timeout > 0:
            raise ConfigurationError(f"{provider}: timeout must be > 0, got {timeout!r}")
        if max_connections < 1:
            raise ConfigurationError(
                f"{provider}: max_connections must be >= 1, got {max_connections!r}"
            )
        self.provider = provider
        self.timeout = timeout
        self.max_connections = max_connections
        self.allow_private_targets = allow_private_targets
        self.setting = setting
        self._injected = client
        self._default_headers = dict(default_headers or {})
        self._pools: OrderedDict[tuple[str, str, int | None], _HostPool] = OrderedDict()
        self._ssl_context = ssl_context
        self._closing: set[asyncio.Task[None]] = set()
        self._slots: dict[tuple[str, str, int | None], tuple[asyncio.Semaphore, int]] = {}

    def _get_pool(self, key: tuple[str, str, int | None]) -> _HostPool:
        # One pool per target host, its concurrency capped by the host's semaphore: a pool
        # shared by every host with no per-host limit grew past the cap under load.
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
            return pool
        if self._ssl_context is None:  # built once: an SSL context costs milliseconds
            self._ssl_context = httpx.create_ssl_context(trust_env=False)
        pool = _HostPool(
            self._ssl_context, _Backend(None if self.allow_private_targets else self.setting)
        )
        self._pools[key] = pool
        self._evict_idle_pools()
        return pool

    def _evict_idle_pools(self) -> None:
        # Bounded: past _MAX_HOST_POOLS, the least recently used pools with no request in
        # flight are closed (a pool in use is never closed under its requests).
        for key in list(self._pools):
            if len(self._pools) <= _MAX_HOST_POOLS:
                return
            if key not in self._slots:
                pool = self._pools.pop(key)
                task = asyncio.get_running_loop().create_task(pool.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POST ``content`` to ``url`` (``params`` added to its query) within the deadline.

        Returns:
            The 2xx response (its body read).

        Raises:
            InvalidRecipientError: The target is invalid or private (and not allowed).
            OperationTimeoutError: The deadline passed (transient).
            DeliveryError: Network error, unresolvable host, 408/425/429 or 5xx (transient).
            PermanentDeliveryError: A redirect, any other non-2xx answer, or a header value
                that is not ASCII.
        """
        key = _pool_key(validate_url(url))
        if params:
            # Merged into the URL's own query: httpx's ``params=`` would replace it.
            url = str(_parse(url).copy_merge_params(dict(params)))
        injected = self._injected
        try:
            # The one total deadline (queueing, resolution, connect, request, response).
            async with asyncio.timeout(self.timeout):
                # The per-host slot: requests in flight (a pool in use is never evicted) and the
                # per-host cap (our pools rely on it: they have no queue). Inline, acquired and
                # released without ``async with``: this runs per send, and coroutine layers
                # cost per resumption.
                slots = self._slots
                semaphore, users = slots.get(key) or (asyncio.Semaphore(self.max_connections), 0)
                slots[key] = (semaphore, users + 1)
                try:
                    await semaphore.acquire()
                    try:
                        response = await (
                            self._own(key, url, headers, content)
                            if injected is None
                            else self._foreign(injected, url, headers, content)
                        )
                    except REQUEST_ERRORS as exc:
                        raise request_error(self.provider, url, self.timeout, exc) from exc
                    finally:
                        semaphore.release()
                finally:
                    semaphore, users = slots[key]
                    if users == 1:
                        del slots[key]  # idle hosts are forgotten, so the map stays small
                    else:
                        slots[key] = (semaphore, users - 1)
        except OperationTimeoutError:
            raise
        except TimeoutError as exc:  # the total deadline passed
            raise OperationTimeoutError(
                f"{self.provider}: no answer from {describe_url(url)} within {self.timeout}s"
            ) from exc
        return self._checked(url, response)

    async def _own(
        self, key: tuple[str, str, int | None], url: str, headers: Mapping[str, str], content: bytes
    ) -> httpx.Response:
        # One request on our own pool for the host; it reads the body and frees the connection.
        target, raw = self._prepare(url, headers, content)
        try:
            answer = await self._get_pool(key).request(target, raw, content)
        except _CORE_ERRORS as exc:
            raise _core_error(self.provider, url, exc) from exc
        return httpx.Response(answer.status, headers=answer.headers, content=answer.content)

    async def _foreign(
        self, client: httpx.AsyncClient, url: str, headers: Mapping[str, str], content: bytes
    ) -> httpx.Response:
        # An injected client: its connects cannot be pinned, so the target is checked first.
        if not self.allow_private_targets:
            await check_target(url, allow_private=False, setting=self.setting)
        return await client.request("POST", url, content=content, headers=headers)

    def _prepare(
        self, url: str, headers: Mapping[str, str], content: bytes
    ) -> tuple[httpcore.URL, list[tuple[bytes, bytes]]]:
        # What httpx would build per request for one of our pools: the target and raw headers.
        target, host = _core_target(url)
        defaults = self._default_headers
        raw = _encode_headers(self.provider, {**defaults, **headers} if defaults else headers)
        raw.append(host)
        raw.append((b"Content-Length", b"%d" % len(content)))
        return target, raw

    def _checked(self, url: str, response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if status in _REDIRECTS and "location" in response.headers:
            _refuse_redirect(self.provider, url, status, response.headers["location"])
        check_status(self.provider, response, url=url)
        return response

    async def aclose(self) -> None:
        """Close the pools this object created (an injected client is left open)."""
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
