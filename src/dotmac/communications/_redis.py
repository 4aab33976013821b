"""The one place Redis clients are created, and where redis-py errors become ours.

Keys used together in one command, script or transaction share a hash tag (see :func:`tagged_key`)
so the same code runs unchanged on Redis Cluster; when Cluster support lands,
:func:`create_redis_client` is the only function that learns to return a cluster client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc

from .errors import BackendError, BackendUnavailableError, ConfigurationError, OperationTimeoutError

__all__ = [
    "bounded_redis_call",
    "create_redis_client",
    "redact_url",
    "redis_errors",
    "tagged_key",
    "validate_redis_url",
]

_SCHEMES = frozenset({"redis", "rediss", "unix"})
_UNPARSEABLE = "<unparseable URL>"
# Refused credentials or commands: retrying the same call never helps, although redis-py derives
# AuthenticationError and AuthorizationError from its ConnectionError.
_AUTH_ERRORS = (
    rexc.AuthenticationError,
    rexc.AuthenticationWrongNumberOfArgsError,
    rexc.AuthorizationError,
    rexc.NoPermissionError,
)


def validate_redis_url(url: str, *, field: str = "redis_url") -> str:
    """Check that ``url`` is a Redis URL this library can connect to.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        field: Name of the setting, for the error message.

    Returns:
        The URL unchanged.

    Raises:
        ConfigurationError: The URL cannot be parsed, its scheme is not one of redis, rediss,
            unix, its host is missing or its port is not a number from 0 to 65535. The message
            never contains the password.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        # The message of urlsplit's error may quote the URL, password included.
        raise ConfigurationError(
            f"{field}: the Redis URL cannot be parsed (not shown: it may contain a password)"
        ) from None
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"{field}: unsupported Redis URL scheme {parts.scheme!r} in {redact_url(url)!r}; "
            "use redis://, rediss:// or unix://"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigurationError(f"{field}: Redis URL {redact_url(url)!r} has no host")
    try:
        parts.port  # noqa: B018 - parsed lazily; raises ValueError for a bad port
    except ValueError:
        raise ConfigurationError(
            f"{field}: Redis URL {redact_url(url)!r} has a port that is not a number "
            "from 0 to 65535"
        ) from None
    return url


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``; never raises.

    A URL that cannot be parsed might hide a password anywhere, so it comes back as
    ``"<unparseable URL>"``.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _UNPARSEABLE
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def create_redis_client(
    url: str,
    *,
    socket_timeout: float | None = 5.0,
    socket_connect_timeout: float | None = 5.0,
    **kwargs: Any,
) -> aioredis.Redis:
    """Create an asyncio Redis client for ``url``; nothing connects until the first command.

    Args:
        url: Redis URL (validated by :func:`validate_redis_url`).
        socket_timeout: Per-command socket timeout in seconds (``None``: wait forever).
        socket_connect_timeout: Connect timeout in seconds.
        **kwargs: Passed to :meth:`redis.asyncio.Redis.from_url`.

    Returns:
        A client that owns its connection pool; close it with ``await client.aclose()``.
    """
    validate_redis_url(url)
    return aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        **kwargs,
    )


def tagged_key(tag: str, *parts: str) -> str:
    """Build a Redis key inside the hash tag ``{tag}``.

    Every key built from the same ``tag`` lands in the same Cluster slot, so one Lua script or
    transaction may touch them together.

    Args:
        tag: The hash tag without braces, for example ``"dotmac:orders"``.
        *parts: Further key segments, joined with ``:``.

    Returns:
        ``"{tag}:part1:part2"``.

    Raises:
        ValueError: ``tag`` is empty or contains a brace.
    """
    if not tag or "{" in tag or "}" in tag:
        raise ValueError(f"hash tag must be non-empty and brace-free, got {tag!r}")
    return ":".join((f"{{{tag}}}", *parts))


@contextlib.contextmanager
def redis_errors(operation: str) -> Iterator[None]:
    """Translate redis-py exceptions raised inside the block into the library's error tree.

    Args:
        operation: What was being done, for the message (``"rate limiter 'sms' acquire"``).

    Raises:
        OperationTimeoutError: The command timed out.
        BackendUnavailableError: The server could not be reached or the connection dropped.
        BackendError: Redis answered with an error (for example a busy script or wrong type),
            or refused the credentials or the command (``transient=False``).
    """
    try:
        yield
    except Exception as exc:
        if _being_cancelled():
            # redis-py may answer a cancellation mid-command with a connection error; turning
            # that into a retryable error would swallow the cancellation and hang shutdowns.
            raise asyncio.CancelledError(f"{operation}: cancelled") from exc
        _translate(operation, exc)
        raise


@contextlib.asynccontextmanager
async def bounded_redis_call(operation: str, timeout: float) -> AsyncIterator[None]:
    """:func:`redis_errors` plus one deadline for the whole block.

    Clients made with ``socket_timeout=None`` (no per-read timer: redis-py otherwise arms one
    for every reply, 100 per pipeline of 100) stay bounded this way, one timer per operation.

    Raises:
        OperationTimeoutError: The block took longer than ``timeout`` seconds.
    """
    with redis_errors(operation):
        async with asyncio.timeout(timeout):
            yield


def _being_cancelled() -> bool:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: synchronous use
        return False
    return task is not None and task.cancelling() > 0


def _translate(operation: str, exc: Exception) -> None:
    """Raise the library's error for ``exc``; return for exceptions that are not Redis's."""
    if isinstance(exc, _AUTH_ERRORS):
        # Before ConnectionError: redis-py's AuthenticationError is one, but is not transient.
        raise BackendError(
            f"{operation}: Redis authentication or permission check failed: {exc}",
            transient=False,
        ) from exc
    if isinstance(exc, rexc.TimeoutError | TimeoutError):
        # Before OSError: the built-in TimeoutError (asyncio.TimeoutError since 3.11) is one.
        raise OperationTimeoutError(f"{operation}: Redis timed out: {exc}") from exc
    if isinstance(exc, rexc.ConnectionError | rexc.BusyLoadingError | ConnectionError | OSError):
        raise BackendUnavailableError(f"{operation}: Redis is unavailable: {exc}") from exc
    if isinstance(exc, rexc.RedisError):
        # Read-only replicas, OOM and cluster re-sharding answers clear up on their own.
        transient = isinstance(exc, rexc.ReadOnlyError | rexc.TryAgainError) or str(exc).startswith(
            ("OOM", "LOADING", "MASTERDOWN")
        )
        raise BackendError(f"{operation}: Redis error: {exc}", transient=transient) from exc
