"""The gateway server with real `websockets` clients on loopback: handshake, channels, limits."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from _support.waiting import eventually
from dotmac.communications.config import WebSocketsSettings
from dotmac.communications.errors import (
    BackendUnavailableError,
    ConfigurationError,
    InvalidChannelError,
    MessageSerializationError,
    WebSocketError,
)
from dotmac.communications.observability import CheckResult, metrics, use_tracer_provider
from dotmac.communications.websockets import (
    BROADCAST_CHANNEL,
    GatewayConnection,
    Identity,
    MemoryBackend,
    SessionAuthenticator,
    WebSocketGateway,
)
from dotmac.communications.websockets._hub import Hub
from dotmac.communications.websockets.backends import Deliver

SECRET = "k" * 32
SLOW = "dotmac.websockets.slow_consumers"
REFUSED = "dotmac.websockets.handshakes.refused"


# --------------------------------------------------------------------------------------- helpers
def ws_settings(**overrides: Any) -> WebSocketsSettings:
    values: dict[str, Any] = {
        "jwt_secret": SECRET,
        "port": 0,
        "jwt_leeway": 0,
        "ping_interval": 5,
        "ping_timeout": 1,
        "drain_timeout": 1,
    }
    values.update(overrides)
    return WebSocketsSettings(**values)


def token(
    sub: str = "u1", tenant: str | None = "t1", ttl: float = 600, key: str = SECRET, **claims: Any
) -> str:
    payload: dict[str, Any] = {"sub": sub, "exp": time.time() + ttl, **claims}
    if tenant is not None:
        payload["tenant_id"] = tenant
    return jwt.encode(payload, key, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def recv_json(client: ClientConnection, timeout: float = 2.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        frame: dict[str, Any] = json.loads(await client.recv())
    return frame


async def send_json(client: ClientConnection, frame: dict[str, Any]) -> None:
    await client.send(json.dumps(frame))


async def closed_with(client: ClientConnection, timeout: float = 3.0) -> tuple[int | None, str]:
    """Read until the server closes; return the close code and reason it sent."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await client.recv()
        except ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


async def refused_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    return info.value.response.status_code


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[WebSocketGateway]]]:
    """Start gateways on 127.0.0.1:0; every one is stopped after the test."""
    gateways: list[WebSocketGateway] = []

    async def run(settings: WebSocketsSettings | None = None, **kwargs: Any) -> WebSocketGateway:
        gateway = WebSocketGateway(settings or ws_settings(), **kwargs)
        await gateway.start("127.0.0.1", 0)
        gateways.append(gateway)
        return gateway

    yield run
    for gateway in gateways:
        await gateway.stop()


@pytest.fixture
async def client() -> AsyncIterator[Callable[..., Awaitable[ClientConnection]]]:
    """Open real `websockets` clients to a gateway (a token for u1/t1 by default)."""
    opened: list[ClientConnection] = []

    async def open_client(
        gateway: WebSocketGateway, value: str | None = "default", **kwargs: Any
    ) -> ClientConnection:
        headers = kwargs.pop("additional_headers", {})
        if value is not None:
            headers.update(bearer(token() if value == "default" else value))
        kwargs.setdefault("close_timeout", 1)
        conn = await connect(url(gateway), additional_headers=headers, **kwargs)
        opened.append(conn)
        return conn

    yield open_client
    for conn in opened:
        await conn.close()


def url(gateway: WebSocketGateway, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{gateway.port}{path}"


async def subscribe(client: ClientConnection, channel: str) -> dict[str, Any]:
    await send_json(client, {"type": "subscribe", "channel": channel})
    return await recv_json(client)


class RecordingBackend(MemoryBackend):
    """A backend double: records what the gateway tells it; tests play other processes.

    Presence and history stay the memory backend's.
    """

    name = "recording"

    def __init__(self, *, fail_subscribe: set[str] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.published: list[tuple[str, bytes]] = []
        self.deliver: Deliver | None = None
        self.fail_subscribe = fail_subscribe or set()
        self.fail_unsubscribe = False
        self.fail_publish = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.health = CheckResult("pass")

    async def start(self, deliver: Deliver) -> None:
        self.deliver = deliver

    async def close(self) -> None:
        self.deliver = None

    async def publish(self, channel: str, frame: bytes) -> None:
        if self.fail_publish:
            raise BackendUnavailableError("cannot publish")
        self.published.append((channel, frame))

    async def subscribe_channel(self, channel: str) -> None:
        await self.gate.wait()
        if channel in self.fail_subscribe:
            raise BackendUnavailableError(f"cannot subscribe {channel}")
        self.calls.append(("subscribe", channel))

    async def unsubscribe_channel(self, channel: str) -> None:
        if self.fail_unsubscribe:
            raise BackendUnavailableError(f"cannot unsubscribe {channel}")
        self.calls.append(("unsubscribe", channel))

    async def check(self) -> CheckResult:
        return self.health


# ------------------------------------------------------------------------------------ handshake
async def test_missing_token_is_refused_with_401_before_upgrade(start) -> None:
    """No credential: HTTP 401 with a Bearer challenge, no upgrade, counted by reason."""
    gateway = await start()
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(gateway)):
            pass
    assert info.value.response.status_code == 401
    assert info.value.response.headers["WWW-Authenticate"] == "Bearer"
    assert metrics.value(REFUSED, {"reason": "unauthorized"}) == 1
    assert not gateway.connections


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(token(ttl=-5), id="expired"),
        pytest.param(token(key="x" * 32), id="badly-signed"),
        pytest.param(token(aud="other-app"), id="wrong-audience"),
        pytest.param("not.a.jwt", id="malformed"),
    ],
)
async def test_invalid_tokens_are_refused_with_401(start, bad: str) -> None:
    """Expired, badly signed, wrong-audience or malformed tokens never upgrade."""
    gateway = await start(ws_settings(jwt_audience="my-app"))
    assert await refused_status(url(gateway), additional_headers=bearer(bad)) == 401


async def test_token_from_query_and_bearer_subprotocol(start, client) -> None:
    """?token= works, and a browser's ["bearer", token] subprotocol is echoed as "bearer"."""
    gateway = await start()
    by_query = await connect(f"{url(gateway)}?token={token()}")
    async with by_query:
        await send_json(by_query, {"type": "ping"})
        assert await recv_json(by_query) == {"type": "pong"}
    browser = await client(gateway, None, subprotocols=["bearer", token("u2")])
    assert browser.subprotocol == "bearer"
    assert await gateway.send_to_user("u2", "hi") == 1


async def test_anonymous_only_when_allowed(start, client) -> None:
    """allow_anonymous admits clients without a token, yet a bad token is still a 401."""
    closed = await start()
    assert not closed.accepts_anonymous
    assert await refused_status(url(closed)) == 401
    gateway = await start(ws_settings(allow_anonymous=True, jwt_secret=None))
    anonymous = await client(gateway, None)
    [connection] = gateway.connections
    assert connection.identity.anonymous
    assert connection.subscriptions == frozenset()
    assert await gateway.broadcast({"hello": 1}) == 1
    assert (await recv_json(anonymous))["channel"] == BROADCAST_CHANNEL
    both = await start(ws_settings(allow_anonymous=True))
    assert gateway.accepts_anonymous
    assert both.accepts_anonymous
    assert await refused_status(url(both), additional_headers=bearer(token(ttl=-5))) == 401
    await client(both, None)
    await client(both)
    assert sorted(str(c.user_id) for c in both.connections) == ["None", "u1"]


def test_from_config_needs_a_secret_or_anonymous() -> None:
    """Neither jwt_secret nor allow_anonymous: a ConfigurationError naming both settings."""
    with pytest.raises(ConfigurationError, match=r"jwt_secret.*allow_anonymous"):
        WebSocketGateway.from_config(WebSocketsSettings())
    assert isinstance(WebSocketGateway.from_config(ws_settings()).backend, MemoryBackend)


async def test_origin_not_listed_is_refused_with_403(start, client) -> None:
    """With allowed_origins set, another site's (or a missing) Origin gets 403."""
    gateway = await start(ws_settings(allowed_origins=["https://app.example.com"]))
    evil = {"origin": "https://evil.example.net", "additional_headers": bearer(token())}
    assert await refused_status(url(gateway), **evil) == 403
    assert await refused_status(url(gateway), additional_headers=bearer(token())) == 403
    assert metrics.value(REFUSED, {"reason": "origin"}) == 2
    await client(gateway, origin="https://app.example.com")


async def test_session_store_down_is_503(start) -> None:
    """An authenticator whose store is unreachable answers 503, not 401."""

    async def resolve(session_id: str) -> None:
        raise BackendUnavailableError("session store down")

    gateway = await start(authenticator=SessionAuthenticator(resolve))
    status = await refused_status(url(gateway), additional_headers={"Cookie": "session=abc"})
    assert status == 503


async def test_connection_limits_answer_503_and_free_slots(start, client) -> None:
    """Over max_connections or max_connections_per_tenant the handshake gets 503."""
    gateway = await start(ws_settings(max_connections=3, max_connections_per_tenant=2))
    first = await client(gateway, token("a", "t1"))
    await client(gateway, token("b", "t1"))
    status = await refused_status(url(gateway), additional_headers=bearer(token("c", "t1")))
    assert status == 503
    await client(gateway, token("d", "t2"))
    status = await refused_status(url(gateway), additional_headers=bearer(token("e", "t3")))
    assert status == 503
    assert metrics.value(REFUSED, {"reason": "tenant_capacity"}) == 1
    assert metrics.value(REFUSED, {"reason": "capacity"}) == 1
    await first.close()
    await eventually(lambda: len(gateway.connections) == 2, what="a's slot released")
    await client(gateway, token("f", "t1"))


async def test_identity_that_cannot_name_its_channel_is_401(start) -> None:
    """A valid token whose user id holds ':' cannot have a user channel: refused with 401."""
    gateway = await start()
    status = await refused_status(url(gateway), additional_headers=bearer(token("a:b")))
    assert status == 401


async def test_unknown_path_is_404(start) -> None:
    """Only settings.path upgrades; other paths are 404."""
    gateway = await start()
    status = await refused_status(url(gateway, "/other"), additional_headers=bearer(token()))
    assert status == 404


async def test_compression_is_off_by_default(start, client) -> None:
    """permessage-deflate is not negotiated unless websockets.compression is set."""
    plain = await client(await start())
    assert plain.protocol.extensions == []
    deflated = await client(await start(ws_settings(compression=True)))
    assert [e.name for e in deflated.protocol.extensions] == ["permessage-deflate"]


async def test_fan_out_mixes_compressed_and_plain_connections(start, client) -> None:
    """The hub writes one serialised frame to plain connections and deflates per connection."""
    gateway = await start(ws_settings(compression=True))
    deflated = await client(gateway, token("d"))
    plain = await client(gateway, token("p"), compression=None)
    assert plain.protocol.extensions == []
    for conn in (deflated, plain):
        await subscribe(conn, "feed")
    big = "x" * 70_000  # over 64 KiB: the frame length takes the 8-byte form
    assert await gateway.publish("feed", {"big": big}) == 2
    for conn in (deflated, plain):
        assert (await recv_json(conn))["data"] == {"big": big}
    assert await gateway.publish("feed", "small") == 2
    for conn in (deflated, plain):
        assert (await recv_json(conn))["data"] == "small"


# ------------------------------------------------------------------------------------- channels
async def test_user_and_tenant_channels_follow_builtin_rules(start, client) -> None:
    """user:{id} only for that user, tenant:{id}[:…] only inside it; a refusal keeps the link."""
    gateway = await start()
    u1 = await client(gateway, token("u1", "t1"))
    u1_again = await client(gateway, token("u1", "t1"))
    u2 = await client(gateway, token("u2", "t2"))
    refused = await subscribe(u1, "user:u2")
    assert refused["type"] == "error"
    assert (refused["code"], refused["channel"]) == ("forbidden", "user:u2")
    assert (await subscribe(u1, "tenant:t2"))["code"] == "forbidden"
    assert (await subscribe(u1, "tenant:t1:alerts"))["type"] == "subscribed"
    assert (await subscribe(u1, "user:u1"))["type"] == "subscribed"
    await send_json(u1, {"type": "ping"})
    assert await recv_json(u1) == {"type": "pong"}
    assert await gateway.send_to_user("u1", {"n": 1}) == 2
    for conn in (u1, u1_again):
        frame = await recv_json(conn)
        assert (frame["channel"], frame["data"]) == ("user:u1", {"n": 1})
    assert await gateway.send_to_tenant("t2", "only t2") == 1
    assert (await recv_json(u2))["data"] == "only t2"
    assert await gateway.publish("tenant:t1:alerts", "alert") == 1
    assert (await recv_json(u1))["data"] == "alert"
    assert gateway.is_online("u1")
    assert not gateway.is_online("u9")
    assert not gateway.is_online("bad:id")
    with pytest.raises(InvalidChannelError):
        await gateway.send_to_user("bad:id", 1)


async def test_authorizer_decides_subscribes_and_publishes(start, client) -> None:
    """Refused subscribe/publish → forbidden error; allowed publish reaches the publisher too."""
    asked: list[tuple[str | None, str, str]] = []

    async def authorizer(identity: Identity, action: str, channel: str) -> bool:
        asked.append((identity.user_id, action, channel))
        if channel == "boom":
            raise RuntimeError("authorizer bug")
        return channel.startswith("chat:")

    gateway = await start(authorizer=authorizer)
    alice = await client(gateway, token("alice"))
    bob = await client(gateway, token("bob"))
    assert (await subscribe(alice, "admin"))["code"] == "forbidden"
    assert (await subscribe(alice, "boom"))["code"] == "internal_error"
    assert (await subscribe(alice, "chat:1"))["type"] == "subscribed"
    assert (await subscribe(bob, "chat:1"))["type"] == "subscribed"
    await send_json(bob, {"type": "publish", "channel": "chat:1", "data": {"text": "hi"}})
    for conn in (alice, bob):
        frame = await recv_json(conn)
        assert (frame["type"], frame["channel"], frame["data"]) == (
            "message",
            "chat:1",
            {"text": "hi"},
        )
    await send_json(bob, {"type": "publish", "channel": "admin", "data": 1})
    assert (await recv_json(bob))["code"] == "forbidden"
    await send_json(bob, {"type": "publish", "channel": BROADCAST_CHANNEL, "data": 1})
    assert (await recv_json(bob))["code"] == "forbidden"
    assert (await subscribe(bob, BROADCAST_CHANNEL))["code"] == "forbidden"
    assert ("alice", "subscribe", "admin") in asked
    assert ("bob", "publish", "chat:1") in asked
    assert all(channel != "user:alice" for _, _, channel in asked)


async def test_without_authorizer_clients_subscribe_but_never_publish(start, client) -> None:
    """No authorizer: subscribing to any channel works, client publishing is refused."""
    gateway = await start()
    conn = await client(gateway)
    assert (await subscribe(conn, "news"))["type"] == "subscribed"
    await send_json(conn, {"type": "publish", "channel": "news", "data": 1})
    assert (await recv_json(conn))["code"] == "forbidden"
    await send_json(conn, {"type": "unsubscribe", "channel": "news"})
    assert await recv_json(conn) == {"type": "unsubscribed", "channel": "news"}
    assert await gateway.publish("news", 1) == 0


async def test_publish_api_encodes_once_excludes_and_validates(start, client) -> None:
    """Every subscriber gets the same bytes (one id); exclude skips one; bad input raises."""
    gateway = await start()
    conns = [await client(gateway, token(f"u{i}")) for i in range(3)]
    for conn in conns:
        await subscribe(conn, "news")
    assert await gateway.publish("news", {"v": 1}) == 3
    texts = set()
    for conn in conns:
        async with asyncio.timeout(2):
            texts.add(await conn.recv())
    assert len(texts) == 1
    assert metrics.value("dotmac.websockets.messages.sent") == 3
    [sender] = [c for c in gateway.connections if c.user_id == "u0"]
    assert await gateway.publish("news", 2, exclude=sender) == 2
    assert (await recv_json(conns[1]))["data"] == 2
    with pytest.raises(InvalidChannelError):
        await gateway.publish("bad channel", 1)
    with pytest.raises(MessageSerializationError):
        await gateway.publish("news", object())
    assert await gateway.broadcast("all") == 3
    assert (await recv_json(conns[0]))["data"] == "all"


async def test_backend_learns_local_channels_and_carries_frames(start, client) -> None:
    """The backend hears first-in/last-out per channel, gets each frame, and feeds remote ones."""
    backend = RecordingBackend()
    gateway = await start(backend=backend)
    a = await client(gateway, token("a", None))
    b = await client(gateway, token("b", None))
    await subscribe(a, "news")
    await subscribe(b, "news")
    assert backend.calls == [
        ("subscribe", BROADCAST_CHANNEL),
        ("subscribe", "user:a"),
        ("subscribe", "user:b"),
        ("subscribe", "news"),
    ]
    await gateway.publish("news", 1)
    assert [channel for channel, _ in backend.published] == ["news"]
    assert backend.deliver is not None
    remote = orjson.dumps({"type": "message", "channel": "news", "data": "remote", "id": "x"})
    assert backend.deliver("news", remote) == 2
    assert backend.deliver("nobody-here", remote) == 0
    await recv_json(a)
    assert (await recv_json(a))["data"] == "remote"
    await send_json(a, {"type": "unsubscribe", "channel": "news"})
    await recv_json(a)
    await b.close()
    await eventually(lambda: len(backend.calls) == 6, what="b's channels released")
    assert set(backend.calls[-2:]) == {("unsubscribe", "user:b"), ("unsubscribe", "news")}
    assert ("unsubscribe", "user:a") not in backend.calls


async def test_backend_failure_closes_with_1013(start, client) -> None:
    """A channel the backend cannot subscribe closes the connection with 1013 (try later)."""
    backend = RecordingBackend(fail_subscribe={"news", "user:down"})
    gateway = await start(backend=backend)
    conn = await client(gateway)
    await send_json(conn, {"type": "subscribe", "channel": "news"})
    assert (await closed_with(conn))[0] == 1013
    down = await client(gateway, token("down"))
    assert (await closed_with(down))[0] == 1013
    backend.health = CheckResult("fail", "listener down")
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{gateway.port}/health")
    assert response.status_code == 503
    assert response.json()["checks"]["gateway:backend"][0]["status"] == "fail"


async def test_publish_records_a_span_with_deliveries(start, client) -> None:
    """With tracing on, each publish is one span naming the channel and its deliveries."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_tracer_provider(provider)
    try:
        gateway = await start()
        await subscribe(await client(gateway), "news")
        await gateway.publish("news", 1)
    finally:
        use_tracer_provider(None)
        provider.shutdown()
    [span] = exporter.get_finished_spans()
    assert span.name == "websocket.publish"
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == "news"
    assert span.attributes["messaging.system"] == "memory"
    assert span.attributes["dotmac.websocket.deliveries"] == 1


async def test_hub_waits_for_one_backend_subscribe_per_channel() -> None:
    """Concurrent first subscribers share one backend subscribe; its failure reaches them all."""
    backend = RecordingBackend()
    hub = Hub(backend, 1024, lambda ws: None)
    a, b, c = object(), object(), object()
    backend.gate.clear()
    first = asyncio.create_task(hub.attach("news", a))
    second = asyncio.create_task(hub.attach("news", b))
    await asyncio.sleep(0.01)
    assert not first.done()
    assert not second.done()
    backend.gate.set()
    await asyncio.gather(first, second)
    assert backend.calls == [("subscribe", "news")]
    assert hub.subscriber_count("news") == 2
    backend.gate.clear()
    joining = asyncio.create_task(hub.attach("gone", c))
    await asyncio.sleep(0.01)
    await hub.detach("gone", c)  # left before the backend answered
    backend.gate.set()
    await joining
    assert backend.calls[-2:] == [("subscribe", "gone"), ("unsubscribe", "gone")]
    assert hub.channels == frozenset({"news"})
    backend.fail_subscribe = {"down"}
    backend.gate.clear()
    tries = [asyncio.create_task(hub.attach("down", ws)) for ws in (a, b)]
    await asyncio.sleep(0.01)
    backend.gate.set()
    results = await asyncio.gather(*tries, return_exceptions=True)
    assert all(isinstance(r, BackendUnavailableError) for r in results)
    assert not hub.has_subscribers("down")
    backend.fail_unsubscribe = True
    await hub.detach("news", a)
    await hub.detach("news", b)  # the failure is logged, the channel still forgotten
    await hub.detach("news", b)
    assert hub.channels == frozenset()


async def test_backend_failures_on_start_and_publish(start, client) -> None:
    """A backend down at start fails start(); a failed client publish answers internal_error."""
    with pytest.raises(BackendUnavailableError):
        await start(backend=RecordingBackend(fail_subscribe={BROADCAST_CHANNEL}))

    async def authorizer(identity: Identity, action: str, channel: str) -> bool:
        if action == "publish" and channel == "boom":
            raise RuntimeError("authorizer bug")
        return True

    backend = RecordingBackend()
    gateway = await start(backend=backend, authorizer=authorizer)
    conn = await client(gateway)
    await send_json(conn, {"type": "publish", "channel": "boom", "data": 1})
    assert (await recv_json(conn))["code"] == "internal_error"
    backend.fail_publish = True
    await send_json(conn, {"type": "publish", "channel": "news", "data": 1})
    assert await recv_json(conn) == {
        "type": "error",
        "code": "internal_error",
        "message": "publish failed",
        "channel": "news",
    }


# ------------------------------------------------------------------------------------- fan-out
async def test_slow_client_is_closed_while_fast_ones_get_everything(start, client) -> None:
    """A client that stops reading is closed 1008 past its budget; readers miss nothing."""
    # ping_timeout is also the close timeout: long enough that the close frame still reaches the
    # slow client when the test reads it, after the fast readers are done.
    gateway = await start(ws_settings(send_buffer_limit=65_536, ping_timeout=15))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    slow = await client(gateway, token("slow"), sock=sock, max_queue=1)
    fast = [await client(gateway, token(f"fast{i}")) for i in range(3)]
    for conn in (slow, *fast):
        await subscribe(conn, "feed")
    counts = [0] * len(fast)

    async def read(index: int, conn: ClientConnection) -> None:
        async for _ in conn:
            counts[index] += 1

    readers = [asyncio.create_task(read(i, conn)) for i, conn in enumerate(fast)]
    payload = "x" * 16_384
    published = 0
    while metrics.value(SLOW) == 0:
        await gateway.publish("feed", payload)
        published += 1
        assert published < 3000, "the slow client was never cut off"
        await asyncio.sleep(0)
    for _ in range(50):
        await gateway.publish("feed", payload)
        published += 1
    await eventually(lambda: counts == [published] * len(fast), what="fast readers got all")
    code, reason = await closed_with(slow, timeout=5)
    assert code == 1008
    assert "slow consumer" in reason
    assert metrics.value(SLOW) == 1
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


# ------------------------------------------------------------------------------ frames and limits
async def test_bad_frames_get_error_frames_and_keep_the_connection(start, client) -> None:
    """Malformed JSON, unknown type, missing field, binary: error frames, then a pong."""
    conn = await client(await start())
    await conn.send("{not json")
    assert (await recv_json(conn))["code"] == "invalid_json"
    await send_json(conn, {"type": "dance"})
    assert (await recv_json(conn))["code"] == "unknown_type"
    await send_json(conn, {"type": "subscribe"})
    assert (await recv_json(conn))["code"] == "invalid_frame"
    await conn.send(b"\x00binary")
    assert (await recv_json(conn))["code"] == "binary_not_supported"
    await send_json(conn, {"type": "ping"})
    assert await recv_json(conn) == {"type": "pong"}
    assert metrics.value("dotmac.websockets.messages.received") == 5


async def test_oversized_frame_closes_with_1009(start, client) -> None:
    """A frame over max_message_size closes the connection with 1009."""
    conn = await client(await start(ws_settings(max_message_size=1024)))
    await conn.send("x" * 2048)
    assert (await closed_with(conn))[0] == 1009


async def test_rate_limit_errors_then_closes_on_abuse(start, client) -> None:
    """Over the rate: rate_limited error frames, then close 1008 when the abuse goes on."""
    conn = await client(await start(ws_settings(message_rate=0.5, message_burst=2)))
    for _ in range(12):
        await send_json(conn, {"type": "ping"})
    frames = [await recv_json(conn) for _ in range(11)]
    assert frames[:2] == [{"type": "pong"}] * 2
    assert {f["code"] for f in frames[2:]} == {"rate_limited"}
    assert await closed_with(conn) == (1008, "rate limit exceeded")


async def test_on_message_handlers_and_connection_hooks(start, client) -> None:
    """Application types reach their handler; hooks see connects and disconnects."""
    gateway = await start()
    events: list[tuple[str, Any]] = []

    @gateway.on_connect
    async def connected(connection: GatewayConnection) -> None:
        events.append(("connect", connection.user_id))
        if connection.user_id == "refused":
            raise RuntimeError("hook bug")

    @gateway.on_disconnect
    async def broken(connection: GatewayConnection) -> None:
        raise RuntimeError("hook bug")

    @gateway.on_disconnect
    async def disconnected(connection: GatewayConnection) -> None:
        events.append(("disconnect", connection.close_code))

    @gateway.on_message("typing")
    async def typing(connection: GatewayConnection, frame: dict[str, Any]) -> None:
        if frame.get("fail"):
            raise ValueError("handler bug")
        await connection.send({"type": "typing.ack", "room": frame["room"]})

    with pytest.raises(ConfigurationError):
        gateway.on_message("ping")
    with pytest.raises(ConfigurationError):
        gateway.on_message("typing")
    conn = await client(gateway)
    await send_json(conn, {"type": "typing", "room": 7})
    assert await recv_json(conn) == {"type": "typing.ack", "room": 7}
    await send_json(conn, {"type": "typing", "fail": True})
    assert (await recv_json(conn))["code"] == "internal_error"
    await send_json(conn, {"type": ["typing"]})
    assert (await recv_json(conn))["code"] == "invalid_frame"
    await send_json(conn, {"type": "other"})
    assert (await recv_json(conn))["code"] == "unknown_type"
    [connection] = gateway.connections
    assert connection.open
    assert connection.tenant_id == "t1"
    assert connection.remote_address[0] == "127.0.0.1"
    assert repr(connection).startswith("<GatewayConnection id=")
    with pytest.raises(MessageSerializationError):
        await connection.send({"bad": object()})
    await connection.close(4000, "bye")
    assert (await closed_with(conn))[0] == 4000
    assert not await connection.send({"type": "late"})
    refused = await client(gateway, token("refused"))
    assert (await closed_with(refused))[0] == 1011
    await eventually(lambda: len(events) == 4, what="the second disconnect hook")
    assert events == [
        ("connect", "u1"),
        ("disconnect", 4000),
        ("connect", "refused"),
        ("disconnect", 1011),
    ]


# ------------------------------------------------------------------------------------- liveness
async def test_protocol_keepalive_drops_a_client_that_never_answers(start, client) -> None:
    """ping_interval/ping_timeout: a client that stops answering pings is dropped."""
    gateway = await start(ws_settings(ping_interval=0.2, ping_timeout=0.2))
    alive = await client(gateway, token("alive"))
    mute = await client(gateway, token("mute"), close_timeout=0.1)
    mute.transport.pause_reading()
    await eventually(lambda: not gateway.is_online("mute"), 3, what="mute client dropped")
    assert gateway.is_online("alive")
    await send_json(alive, {"type": "ping"})
    assert await recv_json(alive) == {"type": "pong"}


async def test_idle_timeout_closes_silent_clients_only(start, client) -> None:
    """A client that sends nothing for idle_timeout is closed; a chatty one stays."""
    gateway = await start(ws_settings(idle_timeout=0.3))
    silent = await client(gateway, token("silent"))
    chatty = await client(gateway, token("chatty"))
    for _ in range(6):
        await send_json(chatty, {"type": "ping"})
        assert await recv_json(chatty) == {"type": "pong"}
        await asyncio.sleep(0.1)
    assert await closed_with(silent) == (1000, "idle timeout")
    assert gateway.is_online("chatty")


async def test_connection_closed_at_token_expiry(start, client) -> None:
    """The connection is closed with 1008 when its token expires."""
    gateway = await start()
    conn = await client(gateway, token(ttl=0.5))
    await send_json(conn, {"type": "ping"})
    assert await recv_json(conn) == {"type": "pong"}
    started = time.monotonic()
    assert await closed_with(conn) == (1008, "token expired")
    assert time.monotonic() - started < 1.5


# ----------------------------------------------------------------------------- health, metrics
async def test_health_and_metrics_on_the_same_port(start, client) -> None:
    """GET /health is health+json 200; GET /metrics is Prometheus text with gateway series."""
    gateway = await start()
    await client(gateway)
    await refused_status(url(gateway))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as http:
        health = await http.get("/health")
        prometheus = await http.get("/metrics")
    assert health.status_code == 200
    assert health.headers["content-type"] == "application/health+json"
    body = health.json()
    assert body["status"] == "pass"
    assert body["checks"]["gateway:serving"][0]["observedValue"] == 1
    assert prometheus.status_code == 200
    assert prometheus.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "dotmac_websockets_connections 1" in prometheus.text
    assert 'dotmac_websockets_handshakes_refused_total{reason="unauthorized"} 1' in prometheus.text


async def test_health_warns_at_capacity_and_fails_when_stopped(start, client) -> None:
    """gateway:serving warns at max_connections and fails once stopped."""
    gateway = await start(ws_settings(max_connections=1))
    await client(gateway)
    assert (await gateway.health.check()).status == "warn"
    await gateway.stop()
    report = await gateway.health.check()
    assert (report.status, report.http_status) == ("fail", 503)


# ------------------------------------------------------------------------------------- lifecycle
async def test_stop_drains_with_1001_and_drops_stragglers(start, client) -> None:
    """stop() closes clients with 1001, drops those that do not answer within drain_timeout."""
    gateway = await start(ws_settings(drain_timeout=0.5, ping_timeout=5))
    polite = [await client(gateway, token(f"p{i}")) for i in range(3)]
    stuck = await client(gateway, token("stuck"), close_timeout=0.1)
    stuck.transport.pause_reading()
    closes = [asyncio.create_task(closed_with(conn)) for conn in polite]
    port = gateway.port
    started = time.monotonic()
    await gateway.stop()
    assert time.monotonic() - started < 0.5 + 1.0
    assert [(await task)[0] for task in closes] == [1001] * 3
    assert not gateway.connections
    with pytest.raises(ConnectionRefusedError):
        async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=1):
            pass
    await gateway.stop()  # idempotent
    with pytest.raises(WebSocketError):
        await gateway.start()


async def test_serve_context_and_port_errors() -> None:
    """serve() starts and stops; port needs a started gateway; a busy port is a WebSocketError."""
    gateway = WebSocketGateway(ws_settings())
    with pytest.raises(WebSocketError):
        _ = gateway.port
    async with gateway.serve("127.0.0.1", 0) as running:
        assert running is gateway
        busy = WebSocketGateway(ws_settings())
        with pytest.raises(WebSocketError, match="cannot listen"):
            await busy.start("127.0.0.1", gateway.port)
    report = await gateway.health.check()
    assert report.status == "fail"
