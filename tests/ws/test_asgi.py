"""The gateway mounted in a Starlette app under a real uvicorn, with real `websockets` clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from _support.waiting import eventually
from dotmac.communications.errors import WebSocketError
from dotmac.communications.observability import metrics
from dotmac.communications.websockets import WebSocketGateway
from dotmac.communications.websockets.asgi import GatewayEndpoint, handle_websocket

from .test_gateway import (
    REFUSED,
    SLOW,
    bearer,
    closed_with,
    recv_json,
    send_json,
    subscribe,
    token,
    url,
    ws_settings,
)


def without_denial_extension(app: Any) -> Any:
    """Wrap ``app`` so it sees a server without the websocket.http.response extension."""

    async def wrapped(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions.pop("websocket.http.response", None)
        await app({**scope, "extensions": extensions}, receive, send)

    return wrapped


class Host:
    """A Starlette app with the gateway at /ws (ASGI app) and /fn (a function route)."""

    def __init__(self, gateway: WebSocketGateway, *, ws: str = "auto", denial: bool = True) -> None:
        async def route(websocket: WebSocket) -> None:
            await handle_websocket(gateway, websocket)

        self.gateway = gateway
        app: Any = Starlette(
            routes=[WebSocketRoute("/ws", GatewayEndpoint(gateway)), WebSocketRoute("/fn", route)]
        )
        if not denial:
            app = without_denial_extension(app)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        # Compression off, as the gateway's own default: 16 KiB of "x" must fill the socket.
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            ws=ws,
            ws_ping_interval=None,
            ws_per_message_deflate=False,
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        await eventually(lambda: self.server.started, what="uvicorn started")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@pytest.fixture
async def host() -> AsyncIterator[Callable[..., Awaitable[Host]]]:
    """A started gateway (native port) plus uvicorn serving it over ASGI; all stopped after."""
    running: list[tuple[WebSocketGateway, Host]] = []

    async def run(
        settings: Any = None,
        *,
        start: bool = True,
        listen: bool = True,
        ws: str = "auto",
        denial: bool = True,
        **kwargs: Any,
    ) -> Host:
        gateway = WebSocketGateway(settings or ws_settings(), **kwargs)
        if start:
            await gateway.start("127.0.0.1", 0, listen=listen)
        served = Host(gateway, ws=ws, denial=denial)
        await served.start()
        running.append((gateway, served))
        return served

    yield run
    for gateway, served in running:
        await gateway.stop()
        await served.stop()


async def open_client(address: str, value: str | None = None, **kwargs: Any) -> ClientConnection:
    headers = bearer(value or token()) if value != "" else {}
    return await connect(address, additional_headers=headers, close_timeout=1, **kwargs)


async def refused(address: str, **kwargs: Any) -> httpx.Headers:
    with pytest.raises(InvalidStatus) as info:
        async with connect(address, **kwargs):
            pass
    response = info.value.response
    return httpx.Headers(
        {"status": str(response.status_code), **dict(response.headers.raw_items())}
    )


# ------------------------------------------------------------------------------------ handshake
async def test_asgi_handshake_checks_credentials_and_origin(host) -> None:
    """No/bad token: 401 + Bearer challenge; a foreign origin: 403; counted like native refusals."""
    served = await host(ws_settings(allowed_origins=["https://app.example"]))
    origin = {"origin": "https://app.example"}
    missing = await refused(served.url(), additional_headers=origin)
    assert missing["status"] == "401"
    assert missing["www-authenticate"] == "Bearer"
    bad = await refused(served.url(), additional_headers={**origin, **bearer(token(key="x" * 32))})
    assert bad["status"] == "401"
    foreign = await refused(
        served.url(), additional_headers={"origin": "https://evil.example", **bearer(token())}
    )
    assert foreign["status"] == "403"
    assert metrics.value(REFUSED, {"reason": "unauthorized"}) == 2
    assert metrics.value(REFUSED, {"reason": "origin"}) == 1
    async with connect(served.url(), additional_headers={**origin, **bearer(token())}) as ok:
        await send_json(ok, {"type": "ping"})
        assert (await recv_json(ok))["type"] == "pong"


async def test_asgi_accepts_query_token_and_bearer_subprotocol(host) -> None:
    """Browser credentials work over ASGI; the bearer marker is echoed as the subprotocol."""
    served = await host()
    async with connect(f"{served.url()}?token={token('q')}") as by_query:
        assert (await subscribe(by_query, "user:q"))["type"] == "subscribed"
    async with connect(served.url(), subprotocols=["bearer", token("s")]) as by_protocol:
        assert by_protocol.subprotocol == "bearer"


async def test_asgi_refuses_with_503_until_the_gateway_is_started(host) -> None:
    """The hub's backend runs only once the gateway is started: before, handshakes get 503."""
    served = await host(start=False)
    answer = await refused(served.url(), additional_headers=bearer(token()))
    assert answer["status"] == "503"
    assert metrics.value(REFUSED, {"reason": "not_started"}) == 1


async def test_asgi_only_gateway_without_a_port_of_its_own(host) -> None:
    """start(listen=False): no port is bound, ASGI connections are served, stop drains them."""
    served = await host(listen=False)
    gateway = served.gateway
    with pytest.raises(WebSocketError, match="not listening"):
        _ = gateway.port
    assert (await gateway.health.check()).status == "pass"
    ws = await open_client(served.url())
    assert (await subscribe(ws, "news"))["type"] == "subscribed"
    assert await gateway.publish("news", "hi") == 1
    assert (await recv_json(ws))["data"] == "hi"
    stopping = asyncio.create_task(gateway.stop())
    assert (await closed_with(ws))[0] == 1001
    await stopping


@contextlib.contextmanager
def uvicorn_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture the "uvicorn.error" logger at INFO and above into ``caplog.records``."""
    logger = logging.getLogger("uvicorn.error")
    # uvicorn.Config replaces this logger's handlers and stops it propagating to the root logger,
    # where caplog listens: attach caplog's handler to it directly, once uvicorn is configured.
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="uvicorn.error"):
            yield
    finally:
        logger.removeHandler(caplog.handler)


async def asgi_tasks_done(served: Host) -> None:
    """Wait until uvicorn has run every ASGI task to its end (it logs as each one returns)."""
    await eventually(lambda: not served.server.server_state.tasks, what="ASGI tasks finished")


def handshake_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What uvicorn logged per handshake: the status, or "[accepted]"."""
    messages = (record.getMessage() for record in caplog.records)
    return sorted(m.rsplit('" ', 1)[1] for m in messages if '"WebSocket /' in m)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("ws", ["websockets-sansio", "wsproto"])
async def test_asgi_refusals_keep_their_status_and_log_no_error(
    host, caplog: pytest.LogCaptureFixture, ws: str
) -> None:
    """401/403/503 reach the client through the denial extension; uvicorn logs them at INFO only."""
    served = await host(
        ws_settings(allowed_origins=["https://app.example"], max_connections=1), ws=ws
    )
    origin = {"origin": "https://app.example"}
    foreign = {"origin": "https://evil.example", **bearer(token())}
    with uvicorn_log(caplog):
        for path in ("/ws", "/fn"):
            missing = await refused(served.url(path), additional_headers=origin)
            assert (missing["status"], missing["www-authenticate"]) == ("401", "Bearer")
            assert (await refused(served.url(path), additional_headers=foreign))["status"] == "403"
        async with connect(served.url(), additional_headers={**origin, **bearer(token())}):
            for path in ("/ws", "/fn"):
                over = await refused(
                    served.url(path), additional_headers={**origin, **bearer(token("x"))}
                )
                assert over["status"] == "503"
        await asgi_tasks_done(served)
    assert errors(caplog) == []
    assert handshake_lines(caplog) == ["401", "401", "403", "403", "503", "503", "[accepted]"]


async def test_asgi_refusal_without_the_denial_extension_is_a_close(
    host, caplog: pytest.LogCaptureFixture
) -> None:
    """Without websocket.http.response the refusal closes before accept: 403, and no ERROR."""
    served = await host(denial=False)
    with uvicorn_log(caplog):
        for path in ("/ws", "/fn"):
            answer = await refused(served.url(path))
            assert answer["status"] == "403"
            assert "www-authenticate" not in answer
        await asgi_tasks_done(served)
    assert errors(caplog) == []
    assert handshake_lines(caplog) == ["403", "403"]
    assert metrics.value(REFUSED, {"reason": "unauthorized"}) == 2


async def test_plain_http_to_the_endpoint_is_426(host) -> None:
    """An HTTP request to the WebSocket route is told to upgrade."""
    served = await host()
    endpoint = GatewayEndpoint(served.gateway)
    transport = httpx.ASGITransport(app=endpoint)
    async with httpx.AsyncClient(transport=transport, base_url="http://host") as http:
        response = await http.get("/ws")
    assert response.status_code == 426


# --------------------------------------------------------------------------------- one gateway
async def test_publish_reaches_asgi_and_native_clients_of_one_hub(host) -> None:
    """gateway.publish is delivered to both kinds; publish counts both; exclude works for ASGI."""
    served = await host()
    gateway = served.gateway
    native = await open_client(url(gateway), token("n"))
    asgi = await open_client(served.url(), token("a"))
    function_route = await open_client(served.url("/fn"), token("f"))
    try:
        for conn in (native, asgi, function_route):
            assert (await subscribe(conn, "news"))["type"] == "subscribed"
        assert len(gateway.connections) == 3
        assert await gateway.publish("news", {"n": 1}) == 3
        for conn in (native, asgi, function_route):
            frame = await recv_json(conn)
            assert (frame["channel"], frame["data"]) == ("news", {"n": 1})
        (asgi_side,) = [c for c in gateway.connections if c.user_id == "a"]
        assert await gateway.publish("news", 2, exclude=asgi_side) == 2
        assert await gateway.send_to_user("a", "direct") == 1
        direct = await recv_json(asgi)
        assert (direct["channel"], direct["data"]) == ("user:a", "direct")
        assert gateway.is_online("a")
        assert await gateway.broadcast("all") == 3
    finally:
        for conn in (native, asgi, function_route):
            await conn.close()
    await eventually(lambda: not gateway.connections, what="connections cleaned up")
    assert not gateway.is_online("a")


async def test_asgi_ping_user_rules_and_disconnect_hooks(host) -> None:
    """App ping/pong, user-channel rules, on_connect/on_disconnect hooks over ASGI."""
    served = await host()
    gateway = served.gateway
    seen: list[str] = []

    @gateway.on_connect
    async def opened(connection: Any) -> None:
        seen.append(f"open:{connection.user_id}")

    @gateway.on_disconnect
    async def closed(connection: Any) -> None:
        seen.append(f"close:{connection.user_id}")

    conn = await open_client(served.url(), token("u1", tenant="t1"))
    await send_json(conn, {"type": "ping", "id": 7})
    assert (await recv_json(conn))["type"] == "pong"
    refused_frame = await subscribe(conn, "user:u2")
    assert (refused_frame["type"], refused_frame["code"]) == ("error", "forbidden")
    assert (await subscribe(conn, "tenant:t1:ops"))["type"] == "subscribed"
    assert (await subscribe(conn, "tenant:t2:ops"))["code"] == "forbidden"
    await conn.close()
    await eventually(lambda: seen == ["open:u1", "close:u1"], what="hooks ran")


async def test_asgi_limits_max_connections_and_stop_drains(host) -> None:
    """Connection slots are shared with native clients (503 over), and stop() closes with 1001."""
    served = await host(ws_settings(max_connections=1))
    gateway = served.gateway
    conn = await open_client(served.url())
    over = await refused(url(gateway), additional_headers=bearer(token("x")))
    assert over["status"] == "503"
    await gateway.stop()
    code, reason = await closed_with(conn)
    assert code == 1001
    assert reason == "server stopping"


async def test_asgi_slow_client_is_closed_1008(host) -> None:
    """An ASGI client that stops reading is cut off at its byte budget, like a native one."""
    served = await host(ws_settings(send_buffer_limit=65_536, ping_timeout=15))
    gateway = served.gateway
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", served.port))
    slow = await connect(
        served.url(), sock=sock, max_queue=1, additional_headers=bearer(token("slow"))
    )
    await subscribe(slow, "feed")
    payload = "x" * 16_384
    published = 0
    while metrics.value(SLOW) == 0:
        await gateway.publish("feed", payload)
        published += 1
        assert published < 3000, "the slow client was never cut off"
        await asyncio.sleep(0)
    code, reason = await closed_with(slow, timeout=10)
    assert code == 1008
    assert "slow consumer" in reason
