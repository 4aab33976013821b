"""create_redis_client and redis_errors against a real password-protected redis-server."""

from __future__ import annotations

import pytest

from _support.redis_server import RedisServer
from dotmac.communications._redis import create_redis_client, redis_errors
from dotmac.communications.errors import BackendError, BackendUnavailableError

pytestmark = pytest.mark.redis


@pytest.fixture
def protected(redis_server_factory: type[RedisServer]) -> RedisServer:
    """A private redis-server requiring the password ``right``."""
    server = redis_server_factory(extra_args=["--requirepass", "right"], password="right")
    server.start()
    return server


def url_with(server: RedisServer, credentials: str) -> str:
    return f"redis://{credentials}@127.0.0.1:{server.port}/0"


async def test_right_password_connects(protected: RedisServer) -> None:
    """The right password reaches the server."""
    client = create_redis_client(url_with(protected, ":right"))
    try:
        with redis_errors("ping"):
            assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.parametrize("credentials", [":wrong", "nobody:right"])
async def test_refused_credentials_are_a_permanent_error(
    protected: RedisServer, credentials: str
) -> None:
    """A wrong password or user is a non-transient BackendError, not 'Redis is unavailable'."""
    client = create_redis_client(url_with(protected, credentials))
    try:
        with pytest.raises(BackendError) as info, redis_errors("ping"):
            await client.ping()
    finally:
        await client.aclose()
    assert not isinstance(info.value, BackendUnavailableError)
    assert info.value.transient is False
    assert "authentication or permission check failed" in str(info.value)
    assert "wrong" not in str(info.value)


async def test_missing_password_is_a_permanent_error(protected: RedisServer) -> None:
    """A client without the password gets NOAUTH, mapped to a non-transient BackendError."""
    client = create_redis_client(f"redis://127.0.0.1:{protected.port}/0")
    try:
        with pytest.raises(BackendError) as info, redis_errors("get"):
            await client.get("key")
    finally:
        await client.aclose()
    assert info.value.transient is False


async def test_denied_command_is_a_permanent_error(protected: RedisServer) -> None:
    """A command the ACL user may not run (NOPERM) is a non-transient BackendError."""
    admin = create_redis_client(url_with(protected, ":right"))
    limited = create_redis_client(url_with(protected, "limited:secret"))
    try:
        await admin.acl_setuser(
            "limited", enabled=True, passwords=["+secret"], keys=["*"], commands=["+ping"]
        )
        with redis_errors("ping"):
            assert await limited.ping()
        with pytest.raises(BackendError) as info, redis_errors("get"):
            await limited.get("key")
    finally:
        await limited.aclose()
        await admin.aclose()
    assert info.value.transient is False
    assert "permission check failed" in str(info.value)
