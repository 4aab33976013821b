"""redis_errors, validate_redis_url and redact_url: vendor errors mapped, passwords never shown."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions as rexc

from dotmac.communications._redis import redact_url, redis_errors, validate_redis_url
from dotmac.communications.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    OperationTimeoutError,
)


@pytest.mark.parametrize(
    "exc",
    [
        rexc.AuthenticationError("invalid username-password pair or user is disabled."),
        rexc.AuthorizationError("not authorized"),
        rexc.NoPermissionError("this user has no permissions to run the 'get' command"),
        rexc.AuthenticationWrongNumberOfArgsError("wrong number of arguments for 'auth' command"),
    ],
    ids=type,
)
def test_refused_credentials_are_permanent(exc: rexc.RedisError) -> None:
    """Authentication and permission errors become a non-transient BackendError."""
    with pytest.raises(BackendError) as info, redis_errors("ping"):
        raise exc
    assert not isinstance(info.value, BackendUnavailableError)
    assert info.value.transient is False
    assert "ping: Redis authentication or permission check failed" in str(info.value)
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    "exc", [rexc.TimeoutError("read"), TimeoutError("connect")], ids=["redis", "builtin"]
)
def test_timeouts_map_to_operation_timeout(exc: Exception) -> None:
    """redis-py's and the built-in TimeoutError (an OSError) both become OperationTimeoutError."""
    with pytest.raises(OperationTimeoutError) as info, redis_errors("fetch"):
        raise exc
    assert info.value.transient is True
    assert info.value.__cause__ is exc


async def test_asyncio_deadline_maps_to_operation_timeout() -> None:
    """An asyncio.timeout expiring inside the block is an OperationTimeoutError."""
    with pytest.raises(OperationTimeoutError) as info, redis_errors("fetch"):
        async with asyncio.timeout(0):
            await asyncio.sleep(1)
    assert isinstance(info.value.__cause__, TimeoutError)


@pytest.mark.parametrize(
    "exc",
    [rexc.ConnectionError("refused"), ConnectionResetError("reset"), OSError("unreachable")],
    ids=type,
)
def test_connection_errors_stay_transient(exc: Exception) -> None:
    """Connection failures remain a transient BackendUnavailableError."""
    with pytest.raises(BackendUnavailableError) as info, redis_errors("fetch"):
        raise exc
    assert info.value.transient is True


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://:hunter2@host:notaport/0", "port"),
        ("redis://:hunter2@host:99999/0", "port"),
        ("redis://:hunter2@[::1/0", "cannot be parsed"),
    ],
)
def test_bad_urls_are_configuration_errors_without_password(url: str, fragment: str) -> None:
    """A bad port or an unparseable URL is a ConfigurationError naming the field, not the password."""
    with pytest.raises(ConfigurationError, match=fragment) as info:
        validate_redis_url(url, field="events.redis_url")
    message = str(info.value)
    assert message.startswith("events.redis_url: ")
    assert "hunter2" not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_good_urls_pass_validation() -> None:
    """Valid redis, rediss and unix URLs come back unchanged."""
    for url in ("redis://:pw@localhost:6379/0", "rediss://h/1", "unix:///tmp/redis.sock"):
        assert validate_redis_url(url) == url


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:hunter2@host/0", "redis://user:***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://:hunter2@host:notaport/0", "redis://:***@host:notaport/0"),
        ("redis://:hunter2@[::1/0", "<unparseable URL>"),
    ],
)
def test_redact_url_never_raises_nor_leaks(url: str, redacted: str) -> None:
    """redact_url masks the password, and masks the whole URL when it cannot be parsed."""
    assert redact_url(url) == redacted
