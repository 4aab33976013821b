"""Serve the gateway's connections from an ASGI application (Starlette, FastAPI...).

:class:`GatewayEndpoint` is a plain ASGI application for ``websocket`` scopes, so any ASGI
framework can route to it::

    app = Starlette(routes=[WebSocketRoute("/ws", GatewayEndpoint(gateway))])
    fastapi_app.add_websocket_route("/ws", GatewayEndpoint(gateway))  # FastAPI

or, inside a FastAPI/Starlette ``WebSocket`` route, ``await handle_websocket(gateway, websocket)``.

An ASGI connection is a full gateway connection: the same origin and credential checks, the same
connection limits, protocol, channels, hooks, rate limit, idle timeout and token expiry, and one
:class:`~._hub.Hub` with the gateway's native clients, so ``gateway.publish`` reaches both. The
gateway must be started (``await gateway.start()``, in the application's lifespan): it starts the
backend the hub fans out from. Until then, and while it drains, handshakes are refused with 503.

Refusals happen before the upgrade. With the ASGI ``websocket.http.response`` extension (uvicorn,
hypercorn, daphne) the client sees the gateway's own status: 401 with ``WWW-Authenticate: Bearer``,
403 for an origin, 503 for limits. Without it the only refusal ASGI offers is closing before
accept, which servers answer with **HTTP 403** whatever the reason. uvicorn logs a refusal at
INFO. The exception is uvicorn terminating TLS itself with its default ``websockets-sansio``
protocol: there it also logs a spurious ERROR, "ASGI callable returned without completing
handshake" (Kludex/uvicorn#3138). Terminate TLS in a proxy, or run ``--ws wsproto``.

ASGI gives the application no transport to measure, so each connection writes through a queue
that a writer task empties with ``websocket.send``; the hub checks the queued bytes against
``send_buffer_limit`` exactly as it checks a native connection's write buffer, and closes a client
over it with 1008 ``slow consumer``. What the server buffers after ``websocket.send`` returns is the
server's (uvicorn waits for its transport to drain before a send returns). Protocol-level pings,
the frame size limit and compression are the ASGI server's settings (uvicorn's ``ws_ping_interval``,
``ws_max_size``, ``ws_per_message_deflate``); the gateway still closes frames over
``max_message_size`` with 1009 and answers app-level ``ping`` frames.

.. versionadded:: 0.2
"""

from __future__ import annotations

import asyncio
import collections
import http
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol, TypeAlias

from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, CloseCode
from websockets.protocol import State

from ._auth import HandshakeRequest, Identity
from ._connection import GatewayConnection
from ._gateway import WebSocketGateway
from ._protocol import ConnectionProtocol

__all__ = ["ASGIWebSocket", "GatewayEndpoint", "handle_websocket"]

Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]

_HTTP_RESPONSE = "websocket.http.response"
_ABNORMAL = 1006  # no close frame: the client vanished (never sent on the wire)


class ASGIWebSocket(Protocol):
    """What :func:`handle_websocket` needs of a framework's WebSocket (Starlette's fits)."""

    @property
    def scope(self) -> MutableMapping[str, Any]:
        """The ASGI connection scope."""

    async def receive(self) -> Message:
        """The next ASGI event."""

    async def send(self, message: Message) -> None:
        """Send an ASGI event."""


class GatewayEndpoint:
    """An ASGI application serving ``gateway``'s WebSocket connections.

    Mount it on a WebSocket route (Starlette's ``WebSocketRoute("/ws", GatewayEndpoint(gateway))``,
    FastAPI's ``app.add_websocket_route``);
    the route decides the path, ``settings.path`` is not checked. A plain HTTP request to it is
    answered 426 Upgrade Required.

    Args:
        gateway: A started :class:`WebSocketGateway`; its native clients and these share one hub.
    """

    __slots__ = ("gateway",)

    def __init__(self, gateway: WebSocketGateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Handle one ASGI connection (``websocket`` scope) from handshake to close."""
        if scope["type"] == "websocket":
            await _serve(self.gateway, scope, receive, send)
        elif scope["type"] == "http":
            body = b"Upgrade Required\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": http.HTTPStatus.UPGRADE_REQUIRED,
                    "headers": [(b"upgrade", b"websocket"), (b"content-type", b"text/plain")],
                }
            )
            await send({"type": "http.response.body", "body": body})


async def handle_websocket(gateway: WebSocketGateway, websocket: ASGIWebSocket) -> None:
    """Serve a framework's not yet accepted WebSocket as a gateway connection, until it closes.

    For a FastAPI/Starlette route: ``await handle_websocket(gateway, websocket)``; do not call
    ``websocket.accept()`` first, the gateway accepts or refuses it.

    Args:
        gateway: A started :class:`WebSocketGateway`.
        websocket: The route's WebSocket (``scope``, ``receive`` and ``send``).
    """
    await _serve(gateway, websocket.scope, websocket.receive, websocket.send)


async def _serve(
    gateway: WebSocketGateway, scope: Mapping[str, Any], receive: Receive, send: Send
) -> None:
    if (await receive())["type"] != "websocket.connect":
        return  # the client left before the handshake reached us
    client = scope.get("client")
    remote = tuple(client) if client is not None else None
    target = scope["path"]
    query = scope.get("query_string", b"")
    if query:
        target = f"{target}?{query.decode('latin-1')}"
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
    handshake = HandshakeRequest.from_path_and_headers(target, headers, remote)
    if not gateway._started or gateway._draining:
        reason = "draining" if gateway._draining else "not_started"
        await _refuse(gateway, scope, send, http.HTTPStatus.SERVICE_UNAVAILABLE, reason)
        return
    identity = await gateway._identify(handshake)
    if not isinstance(identity, Identity):
        await _refuse(gateway, scope, send, *identity)
        return
    protocol = gateway._reserve(identity, remote)
    if not isinstance(protocol, ConnectionProtocol):
        await _refuse(gateway, scope, send, *protocol)
        return
    settings = gateway.settings
    ws = _AsgiSocket(receive, send, remote, settings.send_buffer_limit, settings.ping_timeout)
    try:
        connection = GatewayConnection(next(gateway._connection_ids), identity, ws, protocol)
        ws.gateway_connection = connection
        wanted = identity.subprotocol
        if await ws.accept(wanted if wanted in handshake.offered_subprotocols else None):
            await gateway._run(connection)
    finally:
        await ws.finish()
        gateway._release(identity.tenant_id)


async def _refuse(
    gateway: WebSocketGateway,
    scope: Mapping[str, Any],
    send: Send,
    status: int,
    reason: str,
) -> None:
    """Refuse before the upgrade: the real status if the server can send it, else close (403)."""
    gateway._count_refusal(reason)
    try:
        if _HTTP_RESPONSE in (scope.get("extensions") or {}):
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            if reason == "unauthorized":
                headers.append((b"www-authenticate", b"Bearer"))
            await send({"type": f"{_HTTP_RESPONSE}.start", "status": status, "headers": headers})
            body = f"{http.HTTPStatus(status).phrase}\n".encode()
            await send({"type": f"{_HTTP_RESPONSE}.body", "body": body})
            # uvicorn's websockets-sansio protocol (its default when websockets is installed)
            # counts a denial response as a completed handshake only once its transport reports
            # the connection lost, which closing the transport after the body schedules for the
            # next loop turn. An app that returns first gets "ASGI callable returned without
            # completing handshake" logged at ERROR for every refusal (Kludex/uvicorn#3138), so
            # give that callback its turn. A TLS transport reports the loss only after the TLS
            # close exchange, which one turn does not cover.
            await asyncio.sleep(0)
        else:
            await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
    except OSError:  # ASGI servers raise an OSError from send once the client is gone
        return


class _AsgiSocket:
    """The ASGI side of a gateway connection, shaped like the ``websockets`` connection it replaces.

    Every outgoing frame, fan-out or direct, goes through one queue in order; a writer task
    hands them to the server. The hub reads :attr:`buffered` for the byte budget
    (:class:`~._hub.FrameQueue`).
    """

    __slots__ = (
        "_aborted",
        "_close",
        "_frames",
        "_limit",
        "_receive",
        "_send",
        "_space",
        "_wake",
        "_writer",
        "buffered",
        "close_code",
        "close_timeout",
        "gateway_connection",
        "remote_address",
        "state",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        remote_address: tuple[Any, ...] | None,
        limit: int,
        close_timeout: float | None,
    ) -> None:
        self._receive = receive
        self._send = send
        self.remote_address = remote_address
        self._limit = limit
        self.close_timeout = close_timeout
        self.gateway_connection: GatewayConnection | None = None
        self.state = State.CONNECTING
        self.close_code: int | None = None
        self.buffered = 0
        # Text frames with their UTF-8 size; None: send the close in ``_close`` and stop.
        self._frames: collections.deque[tuple[str, int] | None] = collections.deque()
        self._close: tuple[int, str] | None = None
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._aborted = asyncio.get_running_loop().create_future()
        self._writer: asyncio.Task[None] | None = None

    async def accept(self, subprotocol: str | None) -> bool:
        """Complete the handshake and start the writer; ``False``: the client is gone."""
        message: Message = {"type": "websocket.accept"}
        if subprotocol is not None:
            message["subprotocol"] = subprotocol
        try:
            await self._send(message)
        except OSError:
            self.state = State.CLOSED
            return False
        self.state = State.OPEN
        self._writer = asyncio.get_running_loop().create_task(self._write_all())
        return True

    # -- the parts of ``websockets``' connection that GatewayConnection and the hub use ----

    def enqueue(self, text: str, size: int) -> None:
        """Queue a text frame (the hub checked the budget and that the connection is open)."""
        self._frames.append((text, size))
        self.buffered += size
        self._wake.set()

    async def send(self, message: bytes, text: bool = True) -> None:
        """Queue a frame, then wait while the queue is over its budget (``text``: always)."""
        if self.state is not State.OPEN:
            raise ConnectionClosed(None, None)
        self.enqueue(message.decode(), len(message))
        while self.buffered > self._limit and self.state is State.OPEN:
            self._space.clear()
            await self._space.wait()

    async def recv(self) -> str | bytes:
        """The next client frame; :class:`ConnectionClosed` once the client or an abort ends it."""
        if self._aborted.done():
            raise ConnectionClosed(None, None)
        receiving = asyncio.ensure_future(self._receive())
        try:
            await asyncio.wait((receiving, self._aborted), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when cancelled (idle timeout): the pending receive must not leak
            if not receiving.done():
                receiving.cancel()
        if not receiving.done() or receiving.cancelled():
            raise ConnectionClosed(None, None)
        message = receiving.result()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            return text if text is not None else bytes(message.get("bytes") or b"")
        # websocket.disconnect
        self._closed()
        code = int(message.get("code", CloseCode.NO_STATUS_RCVD))
        self.close_code = code
        raise ConnectionClosed(Close(code, str(message.get("reason") or "")), None)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send the queued frames, then the close; returns once the server has the close."""
        if self.state is State.OPEN:
            self.state = State.CLOSING
            self._close = (code, reason)
            self._frames.append(None)
            self._wake.set()
        self._space.set()
        if self._writer is not None:
            await asyncio.wait((self._writer,))

    def abort(self) -> None:
        """Drop the queue and end the connection's receive loop; the server then drops it."""
        self._closed()
        if not self._aborted.done():
            self._aborted.set_result(None)

    async def finish(self) -> None:
        """Stop the writer once the connection is done (the handler's last step)."""
        self._closed()
        if self._writer is not None:
            await asyncio.wait((self._writer,))

    # -- internals -------------------------------------------------------------------------

    def _closed(self) -> None:
        self.state = State.CLOSED
        self._frames.clear()
        self.buffered = 0
        self._space.set()
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    async def _write_all(self) -> None:
        frames = self._frames
        send = self._send
        try:
            while True:
                while frames:
                    frame = frames.popleft()
                    if frame is None:
                        code, reason = self._close or (CloseCode.NORMAL_CLOSURE, "")
                        await send({"type": "websocket.close", "code": code, "reason": reason})
                        return
                    text, size = frame
                    await send({"type": "websocket.send", "text": text})
                    self.buffered -= size
                    if self.buffered <= self._limit:
                        self._space.set()
                self._wake.clear()
                await self._wake.wait()
        except OSError:  # the client is gone; the receive loop learns it from the server
            self.state = State.CLOSED
            self._frames.clear()
            self.buffered = 0
            self._space.set()
