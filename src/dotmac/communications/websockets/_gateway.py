"""The WebSocket gateway server: handshake, connections, channels and fan-out on one port.

:class:`WebSocketGateway` serves with ``websockets``' asyncio server. The handshake is checked in
its ``process_request`` hook (origin, credentials, connection limits) and refused with an HTTP
status before any upgrade; the same hook answers ``GET /health`` and ``GET /metrics``. Each open
connection runs the sans-I/O protocol through :class:`GatewayConnection`; the :class:`Hub` fans
messages out to local subscribers, the backend carries them to other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import http
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, KeysView, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeAlias, cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.config import WebSocketsSettings
from dotmac.communications.errors import (
    AuthenticationError,
    BackendError,
    CommunicationsError,
    ConfigurationError,
    InvalidChannelError,
    OperationTimeoutError,
    ProtocolError,
    WebSocketError,
)
from dotmac.communications.observability import (
    HEALTH_CONTENT_TYPE,
    PROMETHEUS_CONTENT_TYPE,
    CheckResult,
    HealthRegistry,
    metrics,
    tracing,
)

from ._auth import (
    AnonymousAuthenticator,
    Authenticator,
    ChainAuthenticator,
    HandshakeRequest,
    Identity,
    JWTAuthenticator,
    check_origin,
    validate_allowed_origins,
)
from ._connection import (
    AuthorizeAction,
    Authorizer,
    ConnectionHook,
    GatewayConnection,
    MessageHandler,
    _ServerConnection,
)
from ._hub import Hub, Member
from ._protocol import (
    CLIENT_FRAME_TYPES,
    ConnectionProtocol,
    encode_message,
    tenant_channel,
    user_channel,
    validate_channel,
)
from .backends.base import BROADCAST_CHANNEL, GatewayBackend, ReconnectHook, presence_channel
from .backends.memory import MemoryBackend

__all__ = [
    "AuthorizeAction",
    "Authorizer",
    "ConnectionHook",
    "MessageHandler",
    "WebSocketGateway",
]

if TYPE_CHECKING:
    from .asgi import _AsgiSocket

log = logging.getLogger("dotmac.communications.websockets")

_Refusal: TypeAlias = tuple[int, str]
"""Why a handshake is refused: the HTTP status and the reason counted in metrics."""

_DRAIN_BATCH = 500  # connections whose close starts in one event-loop turn during stop()
_STOP_GRACE = 2.0  # seconds stop() gives handlers (on_disconnect hooks) after the drain
_CONNECTIONS = "dotmac.websockets.connections"
_OPENED = "dotmac.websockets.connections.opened"
_REFUSED = "dotmac.websockets.handshakes.refused"
_RECEIVED = "dotmac.websockets.messages.received"
_SENT = "dotmac.websockets.messages.sent"
_SLOW = "dotmac.websockets.slow_consumers"
_PRESENCE_RETRY = 1.0  # seconds between attempts to write presence while the backend is down
_MAX_EXCLUDES = 10_000  # history publishes with exclude= awaiting their frame from the backend
_PRESENCE_FLUSH_WAIT = 5.0  # seconds presence() and stop() wait for pending presence writes


class WebSocketGateway:
    """A WebSocket server with handshake auth, channels, fan-out, limits, health and metrics.

    Clients connect to ``settings.path`` and speak the protocol of ``docs/protocol.md``; the same
    port answers ``GET /health`` (``application/health+json``, 200 or 503) and ``GET /metrics``
    (Prometheus text). Handshakes are refused before the upgrade: 401 for a missing or invalid
    credential, 403 for an ``Origin`` not in ``allowed_origins``, 503 over ``max_connections``
    (or ``max_connections_per_tenant``), while draining, or when the session store is down.

    Every connection of a user is subscribed to ``user:{id}`` and, with a tenant, to
    ``tenant:{id}``; those and ``tenant:{id}:…`` follow built-in rules; other channels go through
    ``authorizer`` (none: clients may subscribe anywhere and publish nowhere). Fan-out encodes a
    message (and its WebSocket frame) once and writes it synchronously to every subscriber's
    transport, as ``websockets``' ``broadcast()`` does; a connection holding
    more than ``send_buffer_limit`` unsent bytes is closed with 1008 and counted in
    ``dotmac.websockets.slow_consumers``, without slowing the others.

    Args:
        settings: The ``websockets`` section of the configuration.
        authenticator: Turns a handshake into an identity. ``None``: built from ``settings``, a
            :class:`JWTAuthenticator` from ``jwt_secret`` (with ``jwt_algorithms``,
            ``jwt_audience``, ``jwt_issuer`` and ``jwt_leeway``), falling back to anonymous
            when ``allow_anonymous`` (a bad token is still refused).
        authorizer: ``async (identity, "subscribe" | "publish", channel) -> bool`` for channels
            outside the built-in rules.
        backend: Carries messages to other processes; :class:`MemoryBackend` by default.
        health: Registry served at ``/health``; the gateway adds ``gateway:serving`` and
            ``gateway:backend`` to it. A new one by default.
        clock: Time source for token expiry and the message rate limit.

    Raises:
        ConfigurationError: ``authenticator`` is ``None`` and ``settings`` has neither
            ``jwt_secret`` nor ``allow_anonymous``; ``allowed_origins`` is malformed; the JWT
            key is unusable.
    """

    def __init__(
        self,
        settings: WebSocketsSettings,
        authenticator: Authenticator | None = None,
        authorizer: Authorizer | None = None,
        backend: GatewayBackend | None = None,
        *,
        health: HealthRegistry | None = None,
        clock: Clock = system_clock,
    ) -> None:
        validate_allowed_origins(settings.allowed_origins)
        self.settings = settings
        self.clock = clock
        self.authenticator = (
            authenticator if authenticator is not None else _authenticator(settings, clock)
        )
        self.authorizer = authorizer
        self.backend = backend if backend is not None else MemoryBackend()
        self.health = health if health is not None else HealthRegistry()
        self.health.register("gateway:serving", self._check_serving, component_type="system")
        self.health.register("gateway:backend", self.backend.check, component_type="component")
        self._hub = Hub(self.backend, settings.send_buffer_limit, self._on_slow)
        self._server: Server | None = None
        self._started = False
        self._draining = False
        self._connections: dict[GatewayConnection, None] = {}
        self._reserved = 0  # admitted handshakes and open connections: slots in use
        self._per_tenant: dict[str, int] = {}
        self._handlers: dict[str, MessageHandler] = {}
        self._connect_hooks: list[ConnectionHook] = []
        self._disconnect_hooks: list[ConnectionHook] = []
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._connection_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4) + "-"  # message ids unique across processes
        self._history_patterns = tuple(settings.history_channels)
        self._history_cache: dict[str, bool] = {}
        # This process's connections per (channel, user), and the counts not yet written.
        self._presence_counts: dict[tuple[str, str], int] = {}
        self._presence_dirty: dict[tuple[str, str], int] = {}
        self._presence_writer: asyncio.Task[None] | None = None
        self._cluster_tenants: dict[str, int] = {}  # slots taken through the backend
        self._excludes: dict[bytes, Member] = {}  # message id -> connection not to deliver to
        self._open = metrics.up_down_counter(_CONNECTIONS, unit="{connection}").bind()
        self._opened = metrics.counter(_OPENED, unit="{connection}").bind()
        self._received = metrics.counter(_RECEIVED, unit="{message}").bind()
        self._sent = metrics.counter(_SENT, unit="{message}").bind()
        self._slow = metrics.counter(_SLOW, unit="{connection}").bind()

    @classmethod
    def from_config(cls, settings: WebSocketsSettings, **kwargs: Any) -> Self:
        """Build a gateway from ``CommunicationsConfig().websockets``.

        The authenticator comes from ``jwt_secret`` / ``allow_anonymous`` as in the constructor.
        The backend follows ``settings.backend``: :class:`MemoryBackend` (one process) or
        :class:`~dotmac.communications.websockets.backends.redis.RedisBackend` on
        ``redis_url`` with ``channel_prefix`` and ``presence_ttl``.

        Args:
            settings: The ``websockets`` section.
            **kwargs: Further constructor arguments (``authorizer``, ``health``, ``clock``...).

        Raises:
            ConfigurationError: As for the constructor; ``backend`` is ``redis`` without a URL.
        """
        if "backend" not in kwargs and settings.backend == "redis":
            from .backends.redis import RedisBackend  # noqa: PLC0415 -- only when configured

            kwargs["backend"] = RedisBackend.from_config(settings)
        return cls(settings, **kwargs)

    @property
    def accepts_anonymous(self) -> bool:
        """Whether clients without a credential are admitted (an anonymous authenticator)."""
        authenticator = self.authenticator
        if isinstance(authenticator, ChainAuthenticator):
            return any(isinstance(a, AnonymousAuthenticator) for a in authenticator.authenticators)
        return isinstance(authenticator, AnonymousAuthenticator)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the gateway listens on (the one picked when started with port 0).

        Raises:
            WebSocketError: The gateway is not listening (not started, or ``listen=False``).
        """
        if self._server is None:
            raise WebSocketError("the gateway is not listening (not started, or listen=False)")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(
        self, host: str | None = None, port: int | None = None, *, listen: bool = True
    ) -> None:
        """Start the backend and listen; returns once the port is bound.

        Args:
            host: Address to listen on; ``settings.host`` by default.
            port: Port; ``settings.port`` by default; 0 picks a free one (see :attr:`port`).
            listen: ``False`` serves no port of its own: for a host that takes connections
                only through the ASGI adapter (:mod:`.asgi`) of its own web server.

        Raises:
            WebSocketError: Already started, or the address cannot be bound.
            BackendUnavailableError: The backend cannot be reached.
        """
        if self._started or self._draining:
            raise WebSocketError("the gateway was already started; create a new one")
        settings = self.settings
        host = settings.host if host is None else host
        port = settings.port if port is None else port
        await self.backend.start(self._from_backend)
        try:
            await self.backend.subscribe_channel(BROADCAST_CHANNEL)
            if listen:
                self._server = await self._listen(host, port)
        except OSError as exc:
            await self.backend.close()
            raise WebSocketError(f"the gateway cannot listen on {host}:{port}: {exc}") from exc
        except BaseException:
            await self.backend.close()
            raise
        self._started = True
        if self.accepts_anonymous:
            log.warning("gateway accepts anonymous clients: development mode, not for production")
        if listen:
            log.info("gateway listening on %s:%d%s", host, self.port, settings.path)
        else:
            log.info("gateway started without a port of its own (ASGI connections only)")

    async def _listen(self, host: str, port: int) -> Server:
        settings = self.settings
        return await serve(
            self._handler,
            host,
            port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            compression="deflate" if settings.compression else None,
            max_size=settings.max_message_size,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            # The close handshake waits for the peer as a ping does.
            close_timeout=settings.ping_timeout,
            create_connection=_ServerConnection,
        )

    async def stop(self) -> None:
        """Drain and stop: refuse new handshakes, close clients with 1001, stop the backend.

        Connections are closed in batches; those not closed within ``drain_timeout`` are
        dropped. Idempotent; a stopped gateway cannot be started again.
        """
        server = self._server
        if not self._started or self._draining:
            return
        self._draining = True
        if server is not None:
            server.close(close_connections=False)  # stop listening; handshakes get 503
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        await self._drain(deadline)
        if server is not None:
            await self._wait_handlers(server, deadline)
        for task in list(self._closing_tasks):  # slow-consumer and token-expiry closes
            task.cancel()
        if self._closing_tasks:
            await asyncio.wait(self._closing_tasks, timeout=_STOP_GRACE)
        await self._flush_presence()  # the leaves of the drained connections
        if self._presence_writer is not None:
            self._presence_writer.cancel()
        await self.backend.close()
        log.info("gateway stopped")

    async def _wait_handlers(self, server: Server, deadline: float) -> None:
        """Wait for the native connections' handlers (their cleanup), bounded."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time()) + _STOP_GRACE):
                await server.wait_closed()
        except TimeoutError:
            log.warning("gateway stop: connection handlers still running; cancelling them")
            for task in list(server.handler_tasks):
                task.cancel()
            try:  # bounded too: a host's on_disconnect hook may ignore the cancellation
                async with asyncio.timeout(_STOP_GRACE):
                    await server.wait_closed()
            except TimeoutError:
                log.warning("gateway stop: connection handlers ignored cancellation; abandoned")

    async def _drain(self, deadline: float) -> None:
        connections = list(self._connections)
        closing: dict[asyncio.Task[None], GatewayConnection] = {}
        loop = asyncio.get_running_loop()
        for start in range(0, len(connections), _DRAIN_BATCH):
            for connection in connections[start : start + _DRAIN_BATCH]:
                task = loop.create_task(connection.close(CloseCode.GOING_AWAY, "server stopping"))
                closing[task] = connection
            await asyncio.sleep(0)  # let this batch write its close frames before the next
        if not closing:
            return
        _, pending = await asyncio.wait(closing, timeout=max(0.0, deadline - loop.time()))
        for task in pending:
            closing[task]._ws.abort()
        if pending:
            log.warning("gateway stop: %d connection(s) dropped after drain_timeout", len(pending))
            await asyncio.wait(pending)

    @contextlib.asynccontextmanager
    async def serve(self, host: str | None = None, port: int | None = None) -> AsyncIterator[Self]:
        """Run the gateway for the duration of an ``async with`` block (:meth:`start`/:meth:`stop`).

        Raises:
            WebSocketError: As for :meth:`start`.
        """
        await self.start(host, port)
        try:
            yield self
        finally:
            await self.stop()

    # -- server API ------------------------------------------------------------------------

    @property
    def connections(self) -> KeysView[GatewayConnection]:
        """The open connections of this process (a live, read-only view)."""
        return self._connections.keys()

    def is_online(self, user_id: str) -> bool:
        """Whether ``user_id`` has an open connection to this process."""
        try:
            channel = user_channel(user_id)
        except InvalidChannelError:
            return False
        return self._hub.has_subscribers(channel)

    async def presence(self, channel: str) -> dict[str, int]:
        """The users subscribed to ``channel`` on every process, with their connection count.

        Anonymous connections are not listed. With the Redis backend, processes that stopped
        heartbeating for ``presence_ttl`` are left out; this process's own changes are written
        before reading (read-your-writes).

        Raises:
            InvalidChannelError: ``channel`` is malformed.
            ConfigurationError: Presence is switched off (``websockets.presence``).
            BackendUnavailableError: The backend cannot be reached.
        """
        validate_channel(channel)
        if not self.settings.presence:
            raise ConfigurationError("presence is switched off (websockets.presence=false)")
        await self._flush_presence()
        return await self.backend.presence(channel)

    def is_history_channel(self, channel: str) -> bool:
        """Whether ``channel`` keeps a history (it matches ``websockets.history_channels``)."""
        known = self._history_cache.get(channel)
        if known is None:
            known = any(fnmatch.fnmatchcase(channel, p) for p in self._history_patterns)
            if len(self._history_cache) < 10_000:
                self._history_cache[channel] = known
        return known

    def on_backend_reconnect(self, hook: ReconnectHook) -> ReconnectHook:
        """Run ``async hook(downtime_seconds)`` after each reconnect of the backend (a decorator).

        Messages published on other processes while the link was down did not reach this
        process's clients; the hook is where a host tells them to resynchronise.
        """
        self.backend.add_reconnect_hook(hook)
        return hook

    async def publish(
        self, channel: str, data: Any, *, exclude: GatewayConnection | None = None
    ) -> int:
        """Send ``data`` as a ``message`` on ``channel`` to every subscriber.

        The frame is encoded once, written to local subscribers at once (without waiting for
        any of them) and handed to the backend for other processes. On a history channel it is
        first appended to the history, which gives it its ``offset`` and ``epoch``.

        Args:
            channel: The channel; ``"broadcast"`` reaches every connection.
            data: Any JSON-serialisable value.
            exclude: A connection that must not receive it (the sender of a relayed message).

        Returns:
            How many local connections it was written to.

        Raises:
            InvalidChannelError: ``channel`` is malformed.
            MessageSerializationError: ``data`` cannot be serialised to JSON.
            BackendUnavailableError: The backend could not carry it to other processes (local
                subscribers already have it) — or, on a history channel, could not append it:
                then nobody got it, since its offset comes from the history.
        """
        validate_channel(channel)
        message_id = f"{self._id_prefix}{next(self._message_ids):x}"
        frame = encode_message(channel, data, message_id)
        if not tracing.is_active():
            return await self._fan_out(channel, frame, exclude, message_id)
        with tracing.span(
            "websocket.publish",
            {"messaging.destination.name": channel, "messaging.system": self.backend.name},
        ) as span:
            delivered = await self._fan_out(channel, frame, exclude, message_id)
            span.set_attribute("dotmac.websocket.deliveries", delivered)
            return delivered

    async def _fan_out(
        self, channel: str, frame: bytes, exclude: GatewayConnection | None, message_id: str
    ) -> int:
        if self._history_patterns and self.is_history_channel(channel):
            return await self._fan_out_history(channel, frame, exclude, message_id)
        member = None if exclude is None else exclude._ws
        delivered = self._hub.deliver(channel, frame, member)
        if delivered:
            self._sent.add(delivered)
        await self.backend.publish(channel, frame)
        return delivered

    async def _fan_out_history(
        self, channel: str, frame: bytes, exclude: GatewayConnection | None, message_id: str
    ) -> int:
        """Append to the history first: the frame gets its offset (and its place in order)."""
        settings = self.settings
        backend = self.backend
        member = None if exclude is None else exclude._ws
        if not backend.delivers_own_history:
            frame = await backend.publish_history(
                channel, frame, size=settings.history_size, ttl=settings.history_ttl
            )
            delivered = self._hub.deliver(channel, frame, member)
            if delivered:
                self._sent.add(delivered)
            return delivered
        # The backend hands it back through _from_backend, in history order with the others.
        key = message_id.encode()
        if member is not None:
            if len(self._excludes) >= _MAX_EXCLUDES:
                del self._excludes[next(iter(self._excludes))]
            self._excludes[key] = member
        try:
            await backend.publish_history(
                channel, frame, size=settings.history_size, ttl=settings.history_ttl
            )
        except BaseException:
            self._excludes.pop(key, None)
            raise
        excluded = exclude is not None and channel in exclude._attached
        return self._hub.subscriber_count(channel) - excluded

    def _from_backend(self, channel: str, frame: bytes) -> int:
        """Deliver a frame the backend brought (another process's, or a history frame)."""
        member = None
        if self._excludes:  # a history publish with exclude= comes back through here
            start = frame.rfind(b'"id":"')  # the last one: data comes before the id
            if start >= 0:
                start += 6
                member = self._excludes.pop(frame[start : frame.find(b'"', start)], None)
        delivered = self._hub.deliver(channel, frame, member)
        if delivered:
            self._sent.add(delivered)
        return delivered

    async def send_to_user(self, user_id: str, data: Any) -> int:
        """Publish ``data`` on ``user:{user_id}``: every connection of that user.

        Returns:
            Local deliveries.

        Raises:
            InvalidChannelError: ``user_id`` cannot name a channel (empty, has ``:``...).
            MessageSerializationError: ``data`` cannot be serialised to JSON.
        """
        return await self.publish(user_channel(user_id), data)

    async def send_to_tenant(self, tenant_id: str, data: Any) -> int:
        """Publish ``data`` on ``tenant:{tenant_id}``: every connection inside that tenant.

        Returns:
            Local deliveries.

        Raises:
            InvalidChannelError: ``tenant_id`` cannot name a channel.
            MessageSerializationError: ``data`` cannot be serialised to JSON.
        """
        return await self.publish(tenant_channel(tenant_id), data)

    async def broadcast(self, data: Any) -> int:
        """Send ``data`` to every connection, as a ``message`` on channel ``"broadcast"``.

        Returns:
            Local deliveries.

        Raises:
            MessageSerializationError: ``data`` cannot be serialised to JSON.
        """
        return await self.publish(BROADCAST_CHANNEL, data)

    # -- application hooks -----------------------------------------------------------------

    def on_message(self, type: str) -> Callable[[MessageHandler], MessageHandler]:
        """Register the handler of client frames of an application ``type`` (a decorator).

        The frame passes the size, rate-limit and JSON checks first; the handler gets the
        connection and the decoded frame and may answer with :meth:`GatewayConnection.send`. An
        exception in it is logged and answered with an ``internal_error`` frame.

        Raises:
            ConfigurationError: ``type`` is empty, a protocol type, or already has a handler.
        """
        if not type or type in CLIENT_FRAME_TYPES or type in self._handlers:
            raise ConfigurationError(
                f"on_message: {type!r} is empty, a protocol frame type or already handled"
            )

        def register(handler: MessageHandler) -> MessageHandler:
            self._handlers[type] = handler
            return handler

        return register

    def on_connect(self, hook: ConnectionHook) -> ConnectionHook:
        """Run ``hook`` for each connection once it is open and subscribed to its own channels.

        An exception in it is logged and closes the connection with 1011 (a decorator).
        """
        self._connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: ConnectionHook) -> ConnectionHook:
        """Run ``hook`` for each connection after it closed (a decorator); errors are logged."""
        self._disconnect_hooks.append(hook)
        return hook

    # -- handshake -------------------------------------------------------------------------

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path != self.settings.path:
            return await self._http_endpoint(ws, path)
        if self._draining:
            return self._refuse(ws, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining")
        identity = await self._authenticate(ws, request)
        if isinstance(identity, Response):
            return identity
        return self._admit(cast("_ServerConnection", ws), identity)

    async def _http_endpoint(self, ws: ServerConnection, path: str) -> Response:
        if path == "/health":
            report = await self.health.check()
            return _respond(ws, report.http_status, report.to_json(), HEALTH_CONTENT_TYPE)
        if path == "/metrics":
            return _respond(ws, 200, metrics.render_prometheus(), PROMETHEUS_CONTENT_TYPE)
        return self._refuse(ws, http.HTTPStatus.NOT_FOUND, "not_found")

    async def _authenticate(self, ws: ServerConnection, request: Request) -> Identity | Response:
        """Check the origin and the credential: the identity, or the refusal to answer with."""
        handshake = HandshakeRequest.from_path_and_headers(
            request.path, request.headers, ws.remote_address
        )
        identity = await self._identify(handshake)
        if isinstance(identity, Identity):
            return identity
        status, reason = identity
        response = self._refuse(ws, status, reason)
        if reason == "unauthorized":
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def _identify(self, handshake: HandshakeRequest) -> Identity | _Refusal:
        """Check the origin and the credential: the identity, or the status and reason to refuse.

        With ``max_connections_per_tenant`` and a networked backend, it also takes the tenant's
        cluster-wide slot (:meth:`_reserve` gives it back if it refuses).
        """
        try:
            check_origin(handshake, self.settings.allowed_origins)
            identity = await self.authenticator.authenticate(handshake)
        except AuthenticationError as exc:
            log.debug("handshake from %s refused: %s", handshake.remote_address, exc)
            if exc.status == http.HTTPStatus.FORBIDDEN:
                return exc.status, "origin"
            return exc.status, "unauthorized"
        except (BackendError, OperationTimeoutError) as exc:
            log.warning(
                "handshake from %s: authentication unavailable: %s", handshake.remote_address, exc
            )
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable"
        if not await self._reserve_cluster_tenant(identity):
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "tenant_capacity"
        return identity

    def _admit(self, ws: _ServerConnection, identity: Identity) -> Response | None:
        protocol = self._reserve(identity, ws.remote_address)
        if not isinstance(protocol, ConnectionProtocol):
            return self._refuse(ws, *protocol)
        ws.gateway_connection = GatewayConnection(
            next(self._connection_ids), identity, ws, protocol
        )
        ws.gateway = self  # releases the slot when the TCP connection is lost
        return None

    async def _reserve_cluster_tenant(self, identity: Identity) -> bool:
        """Take a tenant slot across processes (``max_connections_per_tenant``); ``False``: full.

        The local count is checked first; when the backend cannot be reached, the local limit
        alone applies (logged). :meth:`_reserve` or :meth:`_release` gives the slot back.
        """
        tenant = identity.tenant_id
        limit = self.settings.max_connections_per_tenant
        if tenant is None or limit is None or isinstance(self.backend, MemoryBackend):
            return True
        if self._per_tenant.get(tenant, 0) >= limit:
            return False
        try:
            taken = await self.backend.reserve_tenant(tenant, limit)
        except CommunicationsError as exc:
            log.warning("tenant %r: cluster connection count unavailable (%s)", tenant, exc)
            return True
        if taken:
            self._cluster_tenants[tenant] = self._cluster_tenants.get(tenant, 0) + 1
        return taken

    def _release_cluster_tenant(self, tenant: str | None) -> None:
        if tenant is None:
            return
        held = self._cluster_tenants.get(tenant, 0)
        if held:
            if held > 1:
                self._cluster_tenants[tenant] = held - 1
            else:
                del self._cluster_tenants[tenant]
            self.backend.release_tenant(tenant)

    def _reserve(self, identity: Identity, remote_address: Any) -> ConnectionProtocol | _Refusal:
        """Take a connection slot for ``identity``: its protocol, or why it is refused.

        The caller releases the slot with :meth:`_release` once the connection is gone. A
        refusal gives back the cluster tenant slot :meth:`_identify` took.
        """
        refusal = self._reserve_local(identity, remote_address)
        if not isinstance(refusal, ConnectionProtocol):
            self._release_cluster_tenant(identity.tenant_id)
        return refusal

    def _reserve_local(
        self, identity: Identity, remote_address: Any
    ) -> ConnectionProtocol | _Refusal:
        settings = self.settings
        if self._draining:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "draining"
        if self._reserved >= settings.max_connections:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "capacity"
        tenant = identity.tenant_id
        per_tenant = settings.max_connections_per_tenant
        if (
            tenant is not None
            and per_tenant is not None
            and self._per_tenant.get(tenant, 0) >= per_tenant
        ):
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "tenant_capacity"
        try:
            protocol = ConnectionProtocol(
                identity.user_id,
                identity.tenant_id,
                app_types=self._handlers,
                max_subscriptions=settings.max_subscriptions,
                max_message_size=settings.max_message_size,
                rate=settings.message_rate,
                burst=settings.message_burst,
            )
        except ProtocolError as exc:  # an id with ':' cannot name its user/tenant channel
            log.warning("handshake from %s refused: %s", remote_address, exc)
            return http.HTTPStatus.UNAUTHORIZED, "unauthorized"
        self._reserved += 1
        if tenant is not None:
            self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        return protocol

    def _release(self, tenant: str | None) -> None:
        self._release_cluster_tenant(tenant)
        self._reserved -= 1
        if tenant is not None:
            left = self._per_tenant[tenant] - 1
            if left:
                self._per_tenant[tenant] = left
            else:
                del self._per_tenant[tenant]

    def _refuse(self, ws: ServerConnection, status: int, reason: str) -> Response:
        self._count_refusal(reason)
        phrase = http.HTTPStatus(status).phrase
        return ws.respond(status, f"{phrase}\n")

    def _count_refusal(self, reason: str) -> None:
        metrics.counter(_REFUSED, unit="{handshake}").add(1, {"reason": reason})

    # -- connections -----------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        connection = cast("_ServerConnection", ws).gateway_connection
        if connection is None:  # pragma: no cover - _process_request admits every upgrade
            return
        await self._run(connection)

    async def _run(self, connection: GatewayConnection) -> None:
        """Serve an open connection, native or ASGI, until it closes; then clean up after it."""
        ws = connection._ws
        if self._draining:
            await connection.close(CloseCode.GOING_AWAY, "server stopping")
            return
        self._connections[connection] = None
        self._hub.add(ws)
        self._open.add(1)
        self._opened.add()
        try:
            await connection._serve(self)
        finally:
            self._hub.remove(ws)
            del self._connections[connection]
            self._open.add(-1)
            for channel in connection.subscriptions:
                await self._detach(connection, channel)
            for hook in self._disconnect_hooks:
                try:
                    await hook(connection)
                # Host code: its failure must not skip the other hooks or the cleanup.
                except Exception:
                    log.exception("on_disconnect hook failed for connection %s", connection.id)

    # -- subscriptions and presence --------------------------------------------------------

    async def _attach(
        self, connection: GatewayConnection, channel: str, *, presence: bool = False
    ) -> None:
        """Subscribe ``connection`` to ``channel`` (and its presence frames); count presence.

        Raises:
            BackendUnavailableError: The backend could not subscribe; nothing is subscribed.
        """
        if presence:
            await self._attach_presence(connection, channel)
        try:
            await self._hub.attach(channel, connection._ws)
        except BaseException:
            if presence:
                if connection._presence_channels is not None:
                    connection._presence_channels.discard(channel)
                await self._hub.detach(presence_channel(channel), connection._ws)
            raise
        connection._attached.add(channel)
        self._count_presence(channel, connection.identity.user_id, 1)

    async def _attach_presence(self, connection: GatewayConnection, channel: str) -> None:
        """Also deliver ``channel``'s presence frames to ``connection``.

        Raises:
            BackendUnavailableError: The backend could not subscribe.
        """
        await self._hub.attach(presence_channel(channel), connection._ws)
        if connection._presence_channels is None:
            connection._presence_channels = set()
        connection._presence_channels.add(channel)

    async def _detach(self, connection: GatewayConnection, channel: str) -> None:
        """Unsubscribe ``connection`` from ``channel`` (and its presence frames)."""
        ws = connection._ws
        watching = connection._presence_channels
        if watching is not None and channel in watching:
            watching.discard(channel)
            await self._hub.detach(presence_channel(channel), ws)
        if channel in connection._attached:
            connection._attached.discard(channel)
            await self._hub.detach(channel, ws)
            self._count_presence(channel, connection.identity.user_id, -1)

    def _count_presence(self, channel: str, user_id: str | None, change: int) -> None:
        if user_id is None or not self.settings.presence:
            return
        key = (channel, user_id)
        count = self._presence_counts.get(key, 0) + change
        if count > 0:
            self._presence_counts[key] = count
        else:
            self._presence_counts.pop(key, None)
            count = 0
        self._presence_dirty[key] = count
        if self._presence_writer is None or self._presence_writer.done():
            self._presence_writer = asyncio.get_running_loop().create_task(
                self._write_presence(), name="dotmac-ws-presence-writer"
            )

    async def _write_presence(self) -> None:
        """Write the changed counts in batches (one per event-loop turn) until none are left."""
        while self._presence_dirty:
            await asyncio.sleep(0)  # gather the changes of this turn (a reconnect storm)
            batch, self._presence_dirty = self._presence_dirty, {}
            try:
                await self.backend.set_presence(batch)
            except CommunicationsError as exc:
                log.warning("presence not written (%d change(s)), retrying: %s", len(batch), exc)
                batch.update(self._presence_dirty)  # newer counts win
                self._presence_dirty = batch
                await asyncio.sleep(_PRESENCE_RETRY)

    async def _flush_presence(self) -> None:
        writer = self._presence_writer
        if writer is None or writer.done():
            return
        try:
            async with asyncio.timeout(_PRESENCE_FLUSH_WAIT):
                await asyncio.shield(writer)
        except TimeoutError:
            log.warning("presence writes still pending after %.0f s", _PRESENCE_FLUSH_WAIT)

    def _on_slow(self, ws: Member) -> None:
        connection = cast("_ServerConnection | _AsgiSocket", ws).gateway_connection
        if connection is not None and not connection._closing:
            self._slow.add()
            log.info("connection %s closed: its send buffer is over the limit", connection.id)
            self._close_soon(
                connection, CloseCode.POLICY_VIOLATION, "slow consumer: send buffer full"
            )

    def _close_soon(self, connection: GatewayConnection, code: int, reason: str) -> None:
        """Start closing ``connection`` in a task (from synchronous code: fan-out, timers)."""
        if connection._closing:
            return
        connection._closing = True  # skipped by fan-out from now on, closed once
        task = asyncio.get_running_loop().create_task(connection.close(code, reason))
        self._closing_tasks.add(task)
        task.add_done_callback(self._closing_tasks.discard)

    async def _check_serving(self) -> CheckResult:
        if not self._started or self._draining:
            state = "draining" if self._draining else "not started"
            return CheckResult("fail", f"gateway {state}", component_type="system")
        count = len(self._connections)
        at_capacity = self._reserved >= self.settings.max_connections
        return CheckResult(
            "warn" if at_capacity else "pass",
            "at max_connections: new handshakes get 503" if at_capacity else None,
            observed_value=count,
            observed_unit="connections",
            component_type="system",
        )


def _authenticator(settings: WebSocketsSettings, clock: Clock) -> Authenticator:
    jwt_auth = None
    if settings.jwt_secret is not None:  # one reading of the settings: JWTAuthenticator's own
        jwt_auth = JWTAuthenticator.from_config(settings, clock=clock)
    if settings.allow_anonymous:
        anonymous = AnonymousAuthenticator()
        return anonymous if jwt_auth is None else ChainAuthenticator(jwt_auth, anonymous)
    if jwt_auth is None:
        raise ConfigurationError(
            "websockets: set jwt_secret (DOTMAC_WEBSOCKETS__JWT_SECRET) to authenticate clients, "
            "or allow_anonymous (DOTMAC_WEBSOCKETS__ALLOW_ANONYMOUS=true) to accept anonymous "
            "ones (development only), or pass an authenticator (session cookies: "
            "authenticator=SessionAuthenticator.from_config(settings, resolve))"
        )
    return jwt_auth


def _select_subprotocol(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Echo the subprotocol the identity requires (the ``bearer`` marker of a browser token)."""
    connection = cast("_ServerConnection", ws).gateway_connection
    wanted = None if connection is None else connection.identity.subprotocol
    if wanted is not None and wanted in offered:
        return Subprotocol(wanted)
    return None


def _respond(ws: ServerConnection, status: int, body: str, content_type: str) -> Response:
    response = ws.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response
