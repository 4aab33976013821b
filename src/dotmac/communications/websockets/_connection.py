"""One gateway connection: the asyncio adapter over the sans-I/O :class:`ConnectionProtocol`.

:class:`GatewayConnection` is what applications see (hooks, ``on_message`` handlers,
``gateway.connections``). Its receive loop feeds each client frame to the protocol and carries out
the actions it returns, one frame at a time: authorizer calls, backend subscribes and application
handlers are awaited in order, so a connection holds no queue of its own and a client that sends
faster than the server handles is slowed down by TCP (and cut off by the rate limit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from dotmac.communications.errors import CommunicationsError, MessageSerializationError

from ._auth import Identity, token_expiry_delay
from ._protocol import (
    FORBIDDEN,
    INTERNAL_ERROR,
    Action,
    Attach,
    Close,
    ConnectionProtocol,
    Detach,
    Dispatch,
    Publish,
    Send,
    StreamPosition,
    Subscribe,
    encode_error,
)
from .backends.base import BROADCAST_CHANNEL, HistoryReplay

if TYPE_CHECKING:
    from ._gateway import WebSocketGateway
    from .asgi import _AsgiSocket

__all__ = [
    "AuthorizeAction",
    "Authorizer",
    "ConnectionHook",
    "GatewayConnection",
    "MessageHandler",
]

log = logging.getLogger("dotmac.communications.websockets")

AuthorizeAction: TypeAlias = Literal["subscribe", "publish"]
Authorizer: TypeAlias = Callable[[Identity, AuthorizeAction, str], Awaitable[bool]]
"""``async (identity, action, channel) -> bool``: may this identity subscribe/publish there?"""
ConnectionHook: TypeAlias = Callable[["GatewayConnection"], Awaitable[None]]
"""``async (connection) -> None``, run when a connection opens or after it closed."""
MessageHandler: TypeAlias = Callable[["GatewayConnection", dict[str, Any]], Awaitable[None]]
"""``async (connection, frame) -> None`` for a client frame of an application type."""


class _ServerConnection(ServerConnection):
    """``websockets``' server connection, holding the gateway's connection.

    ``gateway`` is set when the handshake is admitted; its connection slot is released once,
    when the TCP connection is lost, whether or not the handshake completed.
    """

    __slots__ = ("gateway", "gateway_connection")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway: WebSocketGateway | None = None
        self.gateway_connection: GatewayConnection | None = None

    def abort(self) -> None:
        """Drop the TCP connection and whatever it still buffers."""
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        gateway, self.gateway = self.gateway, None
        if gateway is not None and self.gateway_connection is not None:
            gateway._release(self.gateway_connection.identity.tenant_id)


class GatewayConnection:
    """A client connected to the gateway.

    Handed to ``on_connect``/``on_disconnect`` hooks and ``on_message`` handlers, listed in
    :attr:`WebSocketGateway.connections`, and accepted as ``exclude=`` by
    :meth:`WebSocketGateway.publish`. Created by the gateway only.

    Attributes:
        id: Unique per gateway (a counter), for logs.
        identity: Who authenticated at the handshake.
    """

    __slots__ = (
        "_attached",
        "_closing",
        "_presence_channels",
        "_protocol",
        "_ws",
        "id",
        "identity",
    )

    def __init__(
        self,
        id: int,
        identity: Identity,
        ws: _ServerConnection | _AsgiSocket,
        protocol: ConnectionProtocol,
    ) -> None:
        self.id = id
        self.identity = identity
        self._ws = ws
        self._protocol = protocol
        self._closing = False
        self._attached: set[str] = set()  # channels the hub delivers to this connection
        # ...and those it gets presence frames of (made on first use: most connections have none).
        self._presence_channels: set[str] | None = None

    def __repr__(self) -> str:
        return (
            f"<GatewayConnection id={self.id} user={self.identity.user_id!r} "
            f"tenant={self.identity.tenant_id!r} {self._ws.state.name}>"
        )

    @property
    def user_id(self) -> str | None:
        """The authenticated user; ``None`` for an anonymous connection."""
        return self.identity.user_id

    @property
    def tenant_id(self) -> str | None:
        """The user's tenant, if any."""
        return self.identity.tenant_id

    @property
    def remote_address(self) -> Any:
        """The peer's address as the socket reports it (``(host, port)`` for IPv4)."""
        return self._ws.remote_address

    @property
    def subscriptions(self) -> frozenset[str]:
        """The channels this connection receives, the automatic ones included."""
        return self._protocol.subscriptions

    @property
    def open(self) -> bool:
        """Whether the connection is open and not being closed."""
        return not self._closing and self._ws.state is State.OPEN

    @property
    def close_code(self) -> int | None:
        """The close code once the connection is closed; ``None`` before."""
        return self._ws.close_code

    async def send(self, frame: Mapping[str, Any]) -> bool:
        """Send ``frame`` to this client alone, as a JSON text frame.

        For replies of ``on_message`` handlers; use :meth:`WebSocketGateway.publish` to reach
        channels. Waits while the client's write buffer is full.

        Args:
            frame: A JSON object, with a ``"type"`` the client understands.

        Returns:
            ``True`` when written, ``False`` when the connection is closed or closing.

        Raises:
            MessageSerializationError: ``frame`` cannot be serialised to JSON.
        """
        try:
            data = orjson.dumps(frame)
        except orjson.JSONEncodeError as exc:
            raise MessageSerializationError(f"cannot serialise the frame to JSON: {exc}") from exc
        return await self._write(data)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close the connection and wait for it to close (at most the close timeout).

        Args:
            code: WebSocket close code.
            reason: Close reason (at most 123 UTF-8 bytes).
        """
        self._closing = True
        ws = self._ws
        try:
            async with asyncio.timeout(ws.close_timeout):
                await ws.close(code, reason)
        except TimeoutError:
            # The client neither reads nor answers the close frame: drop it, and its buffer.
            ws.abort()

    # -- the gateway's side ----------------------------------------------------------------

    async def _write(self, frame: bytes) -> bool:
        if self._closing:
            return False
        try:
            await self._ws.send(frame, text=True)
        except ConnectionClosed:
            return False
        return True

    async def _open(self, gateway: WebSocketGateway) -> bool:
        """Join the automatic channels and run the on_connect hooks; ``False``: closed instead."""
        try:
            for channel in self._protocol.automatic_channels:
                await gateway._attach(self, channel)
        except CommunicationsError as exc:
            log.warning("connection %s: automatic channels unavailable: %s", self.id, exc)
            await self.close(CloseCode.TRY_AGAIN_LATER, "backend unavailable")
            return False
        try:
            for hook in gateway._connect_hooks:
                await hook(self)
        # Host code: a failing hook closes its connection, never the server.
        except Exception:
            log.exception("on_connect hook failed for connection %s", self.id)
            await self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return False
        return True

    async def _serve(self, gateway: WebSocketGateway) -> None:
        """Open, then receive frames until the connection closes, idles or its token expires.

        One coroutine frame and one timer (the token's) per connection, none per frame: this
        loop is an idle connection's resting state, so it stays close to a bare server's size.
        """
        if not await self._open(gateway):
            return
        delay = token_expiry_delay(self.identity, gateway.clock.time())
        expiry = None
        if delay is not None:
            expiry = asyncio.get_running_loop().call_later(
                delay, gateway._close_soon, self, CloseCode.POLICY_VIOLATION, "token expired"
            )
        recv = self._ws.recv
        idle = gateway.settings.idle_timeout
        try:
            while True:
                try:
                    if idle is None:
                        message = await recv()
                    else:
                        async with asyncio.timeout(idle):
                            message = await recv()
                except ConnectionClosed:
                    return
                except TimeoutError:
                    await self.close(CloseCode.NORMAL_CLOSURE, "idle timeout")
                    return
                if not await self._handle(gateway, message):
                    return
        finally:
            if expiry is not None:
                expiry.cancel()

    async def _handle(self, gateway: WebSocketGateway, message: str | bytes) -> bool:
        """Handle one client frame; ``False`` once the connection closes."""
        gateway._received.add()
        protocol = self._protocol
        now = gateway.clock.monotonic()
        if isinstance(message, str):
            actions = protocol.receive_text(message, now)
        else:
            actions = protocol.receive_bytes(message, now)
        return await self._carry_out(gateway, actions)

    async def _carry_out(self, gateway: WebSocketGateway, actions: list[Action]) -> bool:
        """Carry out the protocol's actions in order; ``False`` once the connection closes."""
        for action in actions:
            if isinstance(action, Dispatch):
                await self._handle_app_frame(gateway, action.frame)
            elif isinstance(action, Send):
                if not await self._write(action.frame):
                    return False
            elif isinstance(action, Subscribe):
                if not await self._subscribe(gateway, action):
                    return False
            elif isinstance(action, Attach):
                try:
                    await gateway._attach(self, action.channel, presence=action.presence)
                except CommunicationsError as exc:
                    log.warning("connection %s: subscribing %r failed: %s", self.id, action, exc)
                    await self.close(CloseCode.TRY_AGAIN_LATER, "backend unavailable")
                    return False
            elif isinstance(action, Detach):
                await gateway._detach(self, action.channel)
            elif isinstance(action, Publish):
                reply = await self._client_publish(gateway, action)
                if reply is not None and not await self._write(reply):
                    return False
            elif isinstance(action, Close):
                await self.close(action.code, action.reason)
                return False
        return True

    async def _authorize(
        self, gateway: WebSocketGateway, action: AuthorizeAction, channel: str
    ) -> bool | None:
        """Ask the gateway's authorizer; ``None`` when it failed."""
        if gateway.authorizer is None:
            return action == "subscribe"
        try:
            return bool(await gateway.authorizer(self.identity, action, channel))
        # Host code: a failing authorizer refuses the request with internal_error.
        except Exception:
            log.exception("authorizer failed on %s of %r", action, channel)
            return None

    async def _subscribe(self, gateway: WebSocketGateway, request: Subscribe) -> bool:
        """Decide a subscribe and carry it out; ``False`` once the connection closes."""
        protocol = self._protocol
        channel = request.channel
        refusal = await self._refusal(gateway, request)
        if refusal is not None:
            return await self._carry_out(gateway, protocol.refuse_subscribe(channel, *refusal))
        if request.since is not None and gateway.is_history_channel(channel):
            return await self._recover(gateway, request, request.since)
        # With ``since`` on a channel without history nothing can be recovered.
        recovered = None if request.since is None else False
        return await self._carry_out(
            gateway, protocol.confirm_subscribe(channel, recovered=recovered)
        )

    async def _refusal(
        self, gateway: WebSocketGateway, request: Subscribe
    ) -> tuple[str, str] | None:
        """Why a subscribe is refused (error code and message), or ``None`` when allowed."""
        channel = request.channel
        if channel == BROADCAST_CHANNEL:
            return FORBIDDEN, "every connection receives broadcasts without subscribing"
        allowed = True if request.builtin else await self._authorize(gateway, "subscribe", channel)
        if allowed is None:
            return INTERNAL_ERROR, "authorization failed"
        if not allowed:
            return FORBIDDEN, "subscribe refused"
        return None

    async def _recover(
        self, gateway: WebSocketGateway, request: Subscribe, since: StreamPosition
    ) -> bool:
        """Subscribe to a history channel from ``since``: replay, then live, no gap, no repeat.

        Live frames are captured from before the history is read, so every message is either in
        the replay or captured. After the replay, the backend's barrier makes sure every live
        frame the history already had has arrived; captured frames up to the last replayed
        offset are dropped, the rest written. Then the connection takes the collector's place
        in the hub in the same event-loop step, so nothing falls between.

        Returns:
            ``False`` once the connection closes.
        """
        channel = request.channel
        hub = gateway._hub
        collector = _Collector(self)
        try:
            await hub.attach(channel, collector)
            if request.presence:  # before the swap, which must not wait for the backend
                await gateway._attach_presence(self, channel)
            try:
                replay = await gateway.backend.read_history(channel, since)
            except CommunicationsError as exc:
                log.warning("connection %s: history of %r unavailable: %s", self.id, channel, exc)
                replay = HistoryReplay([], False, since.offset)
            actions = self._protocol.confirm_subscribe(channel, recovered=replay.recovered)
            if not actions:  # unsubscribed meanwhile, or closing
                return not self._protocol.closed
            if not await self._write_recovered(gateway, actions[-1], replay, collector):
                return False
            # No await may suspend from here to the collector's removal: the hub already has
            # the channel, so attach and detach complete without waiting.
            await gateway._attach(self, channel)
        except CommunicationsError as exc:
            log.warning("connection %s: subscribing %r failed: %s", self.id, channel, exc)
            await self.close(CloseCode.TRY_AGAIN_LATER, "backend unavailable")
            return False
        finally:
            await hub.detach(channel, collector)
        return True

    async def _write_recovered(
        self,
        gateway: WebSocketGateway,
        confirmation: Action,
        replay: HistoryReplay,
        collector: _Collector,
    ) -> bool:
        """Write ``subscribed``, the replay, then the captured live frames not replayed."""
        if not isinstance(confirmation, Send) or not await self._write(confirmation.frame):
            return False
        for frame in replay.frames:
            if not await self._write(frame):
                return False
        await gateway.backend.barrier()  # the live frames up to the replay's end have arrived
        last = replay.offset if replay.recovered else -1  # another epoch restarts offsets
        while collector.frames:
            for text in collector.take():
                offset = _offset_of(text)
                if offset is not None and offset <= last:
                    continue  # already replayed
                if not await self._write(text.encode()):
                    return False
        return True

    async def _client_publish(self, gateway: WebSocketGateway, request: Publish) -> bytes | None:
        """Publish a client's message if allowed; return the error frame to answer with, if any."""
        channel = request.channel
        allowed = channel != BROADCAST_CHANNEL and await self._authorize(
            gateway, "publish", channel
        )
        if allowed is None:
            return encode_error(INTERNAL_ERROR, "authorization failed", channel=channel)
        if not allowed:
            return encode_error(FORBIDDEN, "publish refused", channel=channel)
        try:
            await gateway.publish(channel, request.data)
        except CommunicationsError as exc:
            log.warning("connection %s: publish on %r failed: %s", self.id, channel, exc)
            return encode_error(INTERNAL_ERROR, "publish failed", channel=channel)
        return None

    async def _handle_app_frame(self, gateway: WebSocketGateway, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        handler = gateway._handlers[kind]  # registered: the protocol checked; never removed
        try:
            await handler(self, frame)
        # Host code: a failing handler answers internal_error and keeps the connection.
        except Exception:
            log.exception("on_message handler for %r failed", kind)
            await self._write(encode_error(INTERNAL_ERROR, f"handling {kind!r} failed"))


class _Collector:
    """Stands in the hub for a connection being recovered: keeps the live frames it gets.

    A :class:`~._hub.FrameQueue` member: the hub checks its bytes against the send budget (over
    it, the connection is closed as a slow consumer) and appends each frame.
    """

    __slots__ = ("buffered", "frames", "gateway_connection")

    def __init__(self, connection: GatewayConnection) -> None:
        self.gateway_connection = connection
        self.frames: list[str] = []
        self.buffered = 0

    @property
    def state(self) -> State:
        """The recovered connection's state."""
        return self.gateway_connection._ws.state

    def enqueue(self, text: str, size: int) -> None:
        """Keep one live frame."""
        self.frames.append(text)
        self.buffered += size

    def take(self) -> list[str]:
        """The frames kept so far; empties the collector."""
        frames, self.frames = self.frames, []
        self.buffered = 0
        return frames


def _offset_of(text: str) -> int | None:
    try:
        offset = orjson.loads(text).get("offset")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return offset if isinstance(offset, int) else None
