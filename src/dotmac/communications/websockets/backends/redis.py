r"""Fan-out, presence, history and tenant counts across gateway processes, on Redis.

**Fan-out.** Each gateway channel with local subscribers is one Redis pub/sub channel,
``{prefix}:{<channel>}`` (hash-tagged, ready for sharded pub/sub), subscribed on one dedicated
listener connection; a process receives only what it has clients for. A published frame travels
in a small envelope — the sending process's node id (a process skips its own frames: it already
delivered them), the send time (the ``dotmac.websockets.backend.lag`` histogram) and the W3C
``traceparent`` — separated by ``\\x1f`` bytes, which JSON text never contains. Publishes that
overlap are sent in one pipeline; subscribes and unsubscribes made in one event-loop turn go out
as one command each, in call order.

**Reconnects.** When the listener's connection drops (or stops answering its pings), the
backend logs an error, reports ``warn`` then ``fail`` in health, reconnects with exponential
backoff and jitter, resubscribes every channel in batches, counts the reconnect in
``dotmac.websockets.backend.reconnects`` and runs the reconnect hooks with the downtime.
Frames published elsewhere while the link was down are not received (pub/sub keeps nothing);
clients of history channels recover them by resubscribing with ``since``.

**Presence.** ``{prefix}:{<channel>}:presence`` is a hash ``user -> "node=count;..."`` written by
each process for its own connections (absolute counts, so a write can be repeated). Processes
heartbeat into ``{prefix}:nodes`` (a sorted set scored by Redis time) every third of
``presence_ttl``; readers ignore processes silent for longer than ``presence_ttl``, and a live
process sweeps a dead one's entries (announcing ``leave`` for users who had no other
connection). A process that finds itself swept (it was paused too long) writes its entries back.

**History.** A history channel's messages are appended by one Lua script that takes the next
offset from ``{prefix}:{<channel>}:meta``, adds ``offset`` and ``epoch`` to the frame, appends it
to the stream ``{prefix}:{<channel>}:history`` (entry id ``<offset>-1``, exact ``MAXLEN``) and
publishes it — atomically, so the live and the stored order are the same. The stream and its
meta expire ``history_ttl`` after the last message; a new history gets a new epoch.

**Tenants.** ``{prefix}:tenant:<id>`` is a hash ``node -> connections``; a handshake takes a
slot with a Lua script that counts live processes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeAlias

import redis.asyncio as aioredis
from opentelemetry.trace import SpanKind

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications._redis import (
    bounded_redis_call,
    redact_url,
    redis_errors,
    tagged_key,
    validate_redis_url,
)
from dotmac.communications.config import WebSocketsSettings
from dotmac.communications.errors import (
    BackendUnavailableError,
    CommunicationsError,
    ConfigurationError,
    WebSocketError,
)
from dotmac.communications.observability import CheckResult, metrics, tracing
from dotmac.communications.resilience import backoff_delay
from dotmac.communications.websockets._protocol import StreamPosition

from .base import (
    Deliver,
    GatewayBackend,
    HistoryReplay,
    ReconnectHook,
    new_epoch,
    presence_channel,
)

__all__ = ["RedisBackend"]

log = logging.getLogger("dotmac.communications.websockets")

_SEP: Final = b"\x1f"
_POOL_SIZE: Final = 32  # command connections; a burst beyond waits for one
_SUBSCRIBE_BATCH: Final = 1000  # channels per SUBSCRIBE when resubscribing everything
_PING_INTERVAL: Final = 5.0  # seconds between pings on the listener connection
_STALE_AFTER: Final = 3 * _PING_INTERVAL  # silent this long: the listener link is dead
_FAIL_AFTER: Final = 5.0  # seconds disconnected before health says fail (warn before)
_RECONNECTS = "dotmac.websockets.backend.reconnects"
_LAG = "dotmac.websockets.backend.lag"
_CONNECTED = "dotmac.websockets.backend.connected"

# KEYS: nodes zset, this node's marker. ARGV: node, ttl ms. Returns {marker was missing, dead
# nodes...}: a missing marker (first beat, or swept while silent) means "write everything".
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
local fresh = redis.call('SET', KEYS[2], '1', 'NX') and 1 or 0
local out = {fresh}
local cutoff = '(' .. (now - tonumber(ARGV[2]))
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)) do
  out[#out + 1] = n
end
return out
"""
# KEYS: nodes zset, the swept node's marker, its key set, the sweep lock. ARGV: node, ttl ms.
# Ends a sweep: the node must write everything back if it lives; forgotten if still silent.
_SWEEP_DONE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[2], KEYS[3])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < now - tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('DEL', KEYS[4])
return 1
"""
# KEYS[1]: nodes zset. ARGV: ttl ms. Returns the live nodes.
_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""
# KEYS[1]: a channel's presence hash. ARGV: node, then user, count pairs. Sets this node's count
# of each user; returns user, "join"|"leave" pairs for users whose total went from/to zero.
_PRESENCE_SET = """
local node = ARGV[1]
local out = {}
for i = 2, #ARGV, 2 do
  local user, count = ARGV[i], tonumber(ARGV[i + 1])
  local value = redis.call('HGET', KEYS[1], user)
  local before, others, parts = 0, 0, {}
  if value then
    for n, c in string.gmatch(value, '([^=;]+)=(%d+)') do
      before = before + tonumber(c)
      if n ~= node then
        others = others + tonumber(c)
        parts[#parts + 1] = n .. '=' .. c
      end
    end
  end
  if count > 0 then parts[#parts + 1] = node .. '=' .. count end
  if #parts > 0 then
    redis.call('HSET', KEYS[1], user, table.concat(parts, ';'))
  else
    redis.call('HDEL', KEYS[1], user)
  end
  local after = others + count
  if before == 0 and after > 0 then
    out[#out + 1] = user; out[#out + 1] = 'join'
  elseif before > 0 and after == 0 then
    out[#out + 1] = user; out[#out + 1] = 'leave'
  end
end
return out
"""
# KEYS[1]: a channel's presence hash. ARGV: a dead node. Removes its counts; returns the users
# left with none.
_PRESENCE_DROP = """
local node = ARGV[1]
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local parts, total, mine = {}, 0, false
  for n, c in string.gmatch(all[i + 1], '([^=;]+)=(%d+)') do
    if n == node then mine = true else
      parts[#parts + 1] = n .. '=' .. c
      total = total + tonumber(c)
    end
  end
  if mine then
    if #parts > 0 then
      redis.call('HSET', KEYS[1], all[i], table.concat(parts, ';'))
    else
      redis.call('HDEL', KEYS[1], all[i])
    end
    if total == 0 then out[#out + 1] = all[i] end
  end
end
return out
"""
# KEYS: stream, meta. ARGV: frame, size, ttl ms, epoch if new, pub/sub channel, envelope head.
_HISTORY_PUBLISH = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
local frame = string.sub(ARGV[1], 1, -2) .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-1', 'f', frame)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6] .. frame)
return frame
"""
# KEYS: stream, meta. ARGV: since offset, since epoch.
# Returns {} (no history), {epoch, top} (other epoch / ahead), {epoch, top, 0} (trimmed) or
# {epoch, top, 1, frames...}.
_HISTORY_READ = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then return {} end
local top = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local since = tonumber(ARGV[1])
if epoch ~= ARGV[2] or since > top then return {epoch, top} end
local first = top + 1
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
if since < first - 1 then return {epoch, top, 0} end
local out = {epoch, top, 1}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], (since + 1) .. '-0', '+')) do
  out[#out + 1] = entry[2][2]
end
return out
"""
# KEYS[1]: a tenant's hash. ARGV: node, limit, dead nodes... Takes a slot if one is free. Nodes
# not known dead count (a process that just started is not missed).
_TENANT_RESERVE = """
local dead = {}
for i = 3, #ARGV do dead[ARGV[i]] = true end
local total = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if not dead[all[i]] then total = total + tonumber(all[i + 1]) end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""


_Outgoing: TypeAlias = tuple[Any, tuple[Any, ...], "asyncio.Future[Any]"]
"""A queued command: (script or None for PUBLISH, its arguments, the caller's future)."""


def _check_arguments(
    url: str | None, client: aioredis.Redis | None, prefix: str, **positive: float
) -> None:
    if client is None and not url:
        raise ConfigurationError("RedisBackend needs a Redis url or a client")
    if client is not None and client.connection_pool.connection_kwargs.get("decode_responses"):
        raise ConfigurationError(
            "RedisBackend needs a client without decode_responses (frames are bytes)"
        )
    if not prefix or "{" in prefix or "}" in prefix or any(c.isspace() for c in prefix):
        raise ConfigurationError(
            f"RedisBackend prefix must be non-empty, without braces or spaces: {prefix!r}"
        )
    for label, value in positive.items():
        if not value > 0:
            raise ConfigurationError(f"RedisBackend {label} must be positive, got {value!r}")


def _create_client(url: str, timeout: float) -> aioredis.Redis:
    """A client whose pool waits for a free connection instead of failing a burst."""
    validate_redis_url(url)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=_POOL_SIZE,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return aioredis.Redis.from_pool(pool)


def _log_death(task: asyncio.Task[None]) -> None:
    """A background task must run until close(): say so loudly if one ended."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("gateway Redis backend task %s died: %r", task.get_name(), exc, exc_info=exc)


def _fail(batch: list[_Outgoing], exc: BaseException) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _mapped(exc: Exception) -> Exception:
    """The library's error for a redis-py error returned inside a pipeline's replies."""
    try:
        with redis_errors("gateway publish"):
            raise exc  # noqa: TRY301 -- mapped by the context manager
    except CommunicationsError as mapped:
        return mapped
    except Exception:  # noqa: BLE001 -- not Redis's: returned as it is
        return exc


class RedisBackend(GatewayBackend):
    """Carry a gateway's messages, presence, history and tenant counts across processes.

    Args:
        url: Redis URL (``redis://`` or ``rediss://``); or pass ``client``.
        client: An asyncio redis-py client to use instead (not closed by :meth:`close`).
        prefix: Prefix of every key and pub/sub channel (no braces); gateways that should reach
            each other use the same one.
        presence_ttl: Seconds after which a silent process's users leave presence.
        operation_timeout: Deadline of each Redis operation, in seconds.
        reconnect_max_delay: Largest wait between two reconnect attempts, in seconds.
        clock: Time source for the lag metric and the health report.
        random: Randomness for the reconnect jitter (tests seed it).

    Raises:
        ConfigurationError: Neither ``url`` nor ``client`` is given, ``prefix`` has a brace or
            a number is not positive.
    """

    name: ClassVar[str] = "redis"
    delivers_own_history: ClassVar[bool] = True

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = "dotmac:ws",
        presence_ttl: float = 30.0,
        operation_timeout: float = 5.0,
        reconnect_max_delay: float = 5.0,
        clock: Clock = system_clock,
        random: _random.Random | None = None,
    ) -> None:
        _check_arguments(
            url,
            client,
            prefix,
            presence_ttl=presence_ttl,
            operation_timeout=operation_timeout,
            reconnect_max_delay=reconnect_max_delay,
        )
        self._owns_client = client is None
        self.client = client if client is not None else _create_client(url or "", operation_timeout)
        self._url = redact_url(url) if url else "client"
        self.prefix = prefix
        self.presence_ttl = presence_ttl
        self._timeout = operation_timeout
        self._reconnect_max_delay = reconnect_max_delay
        self._clock = clock
        self._random = random if random is not None else _random.Random()  # noqa: S311 -- jitter
        self.node_id = secrets.token_hex(8)
        self._node = self.node_id.encode()
        self._nodes_key = tagged_key(prefix, "nodes")
        self._node_keys = tagged_key(prefix, "node", self.node_id)
        register = self.client.register_script
        self._heartbeat = register(_HEARTBEAT)
        self._sweep_done = register(_SWEEP_DONE)
        self._alive_script = register(_ALIVE)
        self._presence_set = register(_PRESENCE_SET)
        self._presence_drop = register(_PRESENCE_DROP)
        self._history_publish = register(_HISTORY_PUBLISH)
        self._history_read = register(_HISTORY_READ)
        self._tenant_reserve = register(_TENANT_RESERVE)
        self._deliver: Deliver | None = None
        self._closed = False
        # Pub/sub channel name -> gateway channel, for every channel wanted now.
        self._wanted: dict[bytes, str] = {}
        self._acks: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._pongs: dict[bytes, asyncio.Future[None]] = {}  # barrier token -> its waiter
        self._barriers = 0
        self._ops: list[tuple[str, bytes]] = []
        self._flush_scheduled = False
        self._conn: Any = None  # the listener's connection while it is up
        self._connected = asyncio.Event()
        self._down_since: float | None = None  # monotonic time the link was lost
        self._last_seen = 0.0
        self._reconnects = 0
        self._reconnect_hooks: list[ReconnectHook] = []
        self._outbox: list[_Outgoing] = []
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._presence_counts: dict[tuple[str, str], int] = {}
        self._presence_users: dict[str, int] = {}  # channel -> users with a count here
        self._tenant_counts: dict[str, int] = {}
        self._pending_tenants: dict[str, int] = {}
        self._release_scheduled = False
        self._dead: tuple[str, ...] = ()  # processes silent past presence_ttl, at the last beat
        self._beaten = False
        self._write_back_needed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._reconnect_counter, self._lag, self._connected_gauge = (
            metrics.counter(_RECONNECTS, unit="{reconnect}").bind(),
            metrics.histogram(_LAG, unit="s").bind(),
            metrics.up_down_counter(_CONNECTED, unit="1").bind(),
        )

    @classmethod
    def from_config(cls, settings: WebSocketsSettings, **kwargs: Any) -> RedisBackend:
        """Build the backend from the ``websockets`` settings.

        Uses ``redis_url``, ``channel_prefix`` and ``presence_ttl``.

        Raises:
            ConfigurationError: ``settings.redis_url`` is not set.
        """
        if settings.redis_url is None:
            raise ConfigurationError(
                "websockets.backend is 'redis' but no Redis URL is set "
                "(DOTMAC_WEBSOCKETS__REDIS_URL or DOTMAC_REDIS_URL)"
            )
        kwargs.setdefault("prefix", settings.channel_prefix)
        kwargs.setdefault("presence_ttl", settings.presence_ttl)
        return cls(settings.redis_url, **kwargs)

    # -- names -----------------------------------------------------------------------------

    def _pubsub_name(self, channel: str) -> bytes:
        return f"{self.prefix}:{{{channel}}}".encode()

    def _key(self, channel: str, kind: str) -> str:
        return f"{self.prefix}:{{{channel}}}:{kind}"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the listener is connected (frames from other processes arrive)."""
        return self._connected.is_set()

    @property
    def reconnects(self) -> int:
        """How many times the listener's link came back after a loss."""
        return self._reconnects

    async def start(self, deliver: Deliver) -> None:
        """Register this process, connect the listener and start the background tasks.

        Raises:
            WebSocketError: Already started.
            BackendUnavailableError: Redis cannot be reached.
        """
        if self._deliver is not None or self._closed:
            raise WebSocketError("RedisBackend is already started (one gateway per backend)")
        await self._beat()  # fails fast when Redis is away
        self._deliver = deliver
        loop = asyncio.get_running_loop()
        listener = loop.create_task(self._listen(), name="dotmac-ws-redis-listener")
        self._tasks = [
            listener,
            loop.create_task(self._send_outbox(), name="dotmac-ws-redis-publisher"),
            loop.create_task(self._housekeeping(), name="dotmac-ws-redis-housekeeping"),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_death)
        try:
            async with asyncio.timeout(self._timeout):
                await self._connected.wait()
        except TimeoutError:
            await self.close()
            raise BackendUnavailableError(
                f"RedisBackend: the pub/sub listener could not connect to {self._url}"
            ) from None
        log.info("gateway Redis backend connected to %s as node %s", self._url, self.node_id)

    async def close(self) -> None:
        """Stop the tasks, withdraw this process's presence and tenant counts, disconnect."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._tasks.append(self._sweeper)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._drop_connection()
        for futures in self._acks.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
        self._acks.clear()
        _fail(self._outbox, WebSocketError("RedisBackend closed"))
        self._outbox.clear()
        self._release_pongs()
        if self._deliver is not None:
            try:  # leave at once rather than after presence_ttl
                async with bounded_redis_call("gateway backend close", self._timeout):
                    await self._sweep_node(self.node_id, announce=False)
                    await self.client.delete(self._node_keys, self._marker_key(self.node_id))
                    await self.client.zrem(self._nodes_key, self.node_id)
            except CommunicationsError as exc:
                log.warning("gateway backend close: presence not withdrawn: %s", exc)
        self._deliver = None
        if self._owns_client:
            await self.client.aclose()

    def add_reconnect_hook(self, hook: ReconnectHook) -> None:
        """Run ``hook(downtime_seconds)`` after each reconnect of the listener."""
        self._reconnect_hooks.append(hook)

    async def check(self) -> CheckResult:
        """``pass`` while connected; ``warn`` just after a loss, ``fail`` after 5 s down."""
        if self._deliver is None:
            return CheckResult("fail", "backend not started", component_type="datastore")
        if self.connected:
            return CheckResult(
                "pass",
                observed_value=self._reconnects,
                observed_unit="reconnects",
                component_type="datastore",
            )
        down = 0.0 if self._down_since is None else self._clock.monotonic() - self._down_since
        return CheckResult(
            "fail" if down >= _FAIL_AFTER else "warn",
            f"Redis pub/sub link down for {down:.1f} s (reconnecting to {self._url}): "
            "messages from other processes are not received",
            component_type="datastore",
        )

    # -- publishing ------------------------------------------------------------------------

    def _envelope_head(self, origin: bytes | None = None) -> bytes:
        traceparent = b""
        if tracing.is_active():
            traceparent = (tracing.current_traceparent() or "").encode()
        node = self._node if origin is None else origin
        return b"%s\x1f%d\x1f%s\x1f" % (node, int(self._clock.time() * 1000), traceparent)

    async def publish(self, channel: str, frame: bytes) -> None:
        """Send ``frame`` to the other processes (pipelined with overlapping publishes).

        Raises:
            BackendUnavailableError: Redis cannot be reached.
            OperationTimeoutError: Redis did not answer within ``operation_timeout``.
            WebSocketError: The backend is not started, or closed.
        """
        await self._send(None, (self._pubsub_name(channel), self._envelope_head() + frame))

    async def _send(self, script: Any, args: tuple[Any, ...]) -> Any:
        """Queue a PUBLISH (``script`` None) or a script call; wait for its reply.

        One task sends the queue in order, a pipeline per batch: history appends keep the order
        of the calls, and a burst of publishes costs one round trip.
        """
        if self._deliver is None or self._closed:
            raise WebSocketError("RedisBackend is not started (or closed)")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._outbox.append((script, args, future))
        self._outbox_ready.set()
        return await future

    async def _send_outbox(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            if not batch:
                continue
            try:
                try:
                    replies = await self._send_batch(batch)
                except BackendUnavailableError:
                    if any(script is not None for script, _, _ in batch):
                        raise  # a script may have run: not repeated
                    # Once more, at once: after Redis restarted, a pooled connection fails on
                    # its first use and is replaced by a fresh one.
                    replies = await self._send_batch(batch)
            except CommunicationsError as exc:
                _fail(batch, exc)
                continue
            except asyncio.CancelledError:
                _fail(batch, WebSocketError("RedisBackend closed"))
                raise
            for (_, _, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, Exception):  # this command's own error in the pipeline
                    future.set_exception(_mapped(reply))
                else:
                    future.set_result(reply)

    async def _send_batch(self, batch: list[_Outgoing]) -> list[Any]:
        async with bounded_redis_call("gateway publish", self._timeout):
            if len(batch) == 1 and batch[0][0] is None:
                name, payload = batch[0][1]
                return [await self.client.publish(name, payload)]
            async with self.client.pipeline(transaction=False) as pipe:
                for script, args, _ in batch:
                    if script is None:
                        pipe.publish(*args)
                    else:
                        keys, argv = args
                        await script(keys=keys, args=argv, client=pipe)
                return list(await pipe.execute(raise_on_error=False))

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe_channel(self, channel: str) -> None:
        """Subscribe ``channel`` and wait for Redis to confirm it.

        While the link is down the channel is only recorded: it is subscribed with the others
        on reconnect. A confirmation that takes longer than ``operation_timeout`` is not waited
        for (the channel stays subscribed).
        """
        name = self._pubsub_name(channel)
        self._wanted[name] = channel
        if not self.connected:
            return
        future = asyncio.get_running_loop().create_future()
        self._acks.setdefault(name, deque()).append(future)
        self._queue_op("SUBSCRIBE", name)
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(future)
        except TimeoutError:
            log.warning("Redis did not confirm the subscription of %r in time", channel)

    async def unsubscribe_channel(self, channel: str) -> None:
        """Unsubscribe ``channel`` (not waited for: frames arriving meanwhile are dropped)."""
        name = self._pubsub_name(channel)
        if self._wanted.pop(name, None) is not None and self.connected:
            self._queue_op("UNSUBSCRIBE", name)

    def _queue_op(self, command: str, name: bytes) -> None:
        self._ops.append((command, name))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_ops)

    def _flush_ops(self) -> None:
        """Send the queued (un)subscribes as one write: runs of one command become one command."""
        self._flush_scheduled = False
        ops, self._ops = self._ops, []
        conn = self._conn
        if conn is None or not ops:
            return  # down: everything wanted is subscribed on reconnect
        commands: list[list[Any]] = []
        for command, name in ops:
            if commands and commands[-1][0] == command:
                commands[-1].append(name)
            else:
                commands.append([command, name])
        self._write_soon(conn, conn.pack_commands(commands))

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _write(self, conn: Any, packed: list[bytes]) -> None:
        if conn is not self._conn:
            return  # a dropped link: writing would make redis-py reconnect it, unread
        try:
            await conn.send_packed_command(packed, check_health=False)
        except Exception as exc:  # noqa: BLE001 -- the listener notices and reconnects
            log.debug("writing to the Redis listener connection failed: %s", exc)
            if conn is self._conn:
                self._drop_connection()

    # -- the listener ----------------------------------------------------------------------

    def _new_connection(self) -> Any:
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = None  # reads block: liveness comes from pings
        # RESP2: messages are plain replies; redis-py's RESP3 push handling costs ~2.5 µs each.
        kwargs["protocol"] = 2
        return pool.connection_class(**kwargs)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if self._connected.is_set():
            self._connected.clear()
            self._connected_gauge.add(-1)
            self._down_since = self._clock.monotonic()
        if conn is not None:
            with contextlib.suppress(Exception):
                writer = getattr(conn, "_writer", None)
                if writer is not None:
                    writer.transport.abort()

    async def _listen(self) -> None:
        attempt = 0
        while not self._closed:
            conn = self._new_connection()
            went_live = False
            try:
                async with bounded_redis_call("gateway listener connect", self._timeout):
                    await conn.connect()
                self._go_live(conn)
                went_live = True
                attempt = 0
                await self._read(conn)
            except asyncio.CancelledError:
                self._drop_connection()
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                raise
            except Exception as exc:  # noqa: BLE001 -- any failure: reconnect with backoff
                self._drop_connection()
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                if went_live:
                    log.error(  # noqa: TRY400 -- loud, but a dropped link needs no traceback
                        "gateway lost its Redis pub/sub link (%s): %s; reconnecting",
                        self._url,
                        exc,
                    )
                else:
                    log.warning("gateway Redis listener cannot connect (%s): %s", self._url, exc)
            self._fail_pending_acks()
            attempt += 1
            await asyncio.sleep(
                backoff_delay(
                    attempt,
                    initial_delay=0.05,
                    max_delay=self._reconnect_max_delay,
                    random=self._random,
                )
            )

    def _fail_pending_acks(self) -> None:
        # Waiting subscribers return: their channels are resubscribed on reconnect.
        for futures in self._acks.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
        self._acks.clear()
        self._release_pongs()

    def _release_pongs(self) -> None:
        # Nothing more arrives on a lost link: a barrier has nothing left to wait for.
        for waiter in self._pongs.values():
            if not waiter.done():
                waiter.set_result(None)
        self._pongs.clear()

    async def barrier(self) -> None:
        """Return once every frame published before the call has reached ``deliver``.

        A ``PING`` with a token goes down the listener's link; Redis answers it after every
        message it pushed to this subscriber before, so its pong comes after them. Bounded by
        ``operation_timeout``; immediate while the link is down (nothing arrives then).
        """
        conn = self._conn
        if conn is None:
            return
        self._barriers += 1
        token = b"b%d" % self._barriers
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[token] = waiter
        self._write_soon(conn, conn.pack_commands([["PING", token]]))
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        except TimeoutError:
            self._pongs.pop(token, None)
            log.warning("Redis did not answer the listener's barrier ping in time")

    def _go_live(self, conn: Any) -> None:
        """Mark the link up and send every wanted channel (one write, batched SUBSCRIBEs)."""
        self._conn = conn
        self._last_seen = asyncio.get_running_loop().time()
        names = list(self._wanted)
        if names:
            commands = [
                ["SUBSCRIBE", *names[i : i + _SUBSCRIBE_BATCH]]
                for i in range(0, len(names), _SUBSCRIBE_BATCH)
            ]
            self._write_soon(conn, conn.pack_commands(commands))
        self._connected.set()
        self._connected_gauge.add(1)
        down_since, self._down_since = self._down_since, None
        if down_since is not None:
            downtime = self._clock.monotonic() - down_since
            self._reconnects += 1
            self._reconnect_counter.add()
            log.warning(
                "gateway Redis pub/sub link back after %.1f s; %d channel(s) resubscribed",
                downtime,
                len(names),
            )
            for hook in self._reconnect_hooks:
                self._write_soon_task(self._run_hook(hook, downtime))

    async def _run_hook(self, hook: ReconnectHook, downtime: float) -> None:
        try:
            await hook(downtime)
        # Host code: a failing hook is logged and does not stop the listener.
        except Exception:
            log.exception("on_backend_reconnect hook failed")

    async def _read(self, conn: Any) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        wanted = self._wanted
        node = self._node
        clock = self._clock
        loop_time = asyncio.get_running_loop().time
        while True:
            response = await conn.read_response(timeout=None, push_request=True)
            self._last_seen = loop_time()
            if isinstance(response, bytes):  # a pong as a plain reply (as redis-py parses it)
                response = [b"pong", b"" if response == b"PONG" else response]
            kind = response[0]
            if kind == b"message":
                channel = wanted.get(response[1])
                if channel is None:
                    continue  # unsubscribed meanwhile
                try:
                    origin, sent, traceparent, frame = response[2].split(_SEP, 3)
                    if origin == node:
                        continue
                    self._lag.record(max(0.0, clock.time() - int(sent) / 1000))
                    if traceparent and tracing.is_active():
                        self._deliver_traced(deliver, channel, frame, traceparent)
                    else:
                        deliver(channel, frame)
                # One bad frame (not ours: someone else published on our channel) or a bug in
                # delivery must not take the link down with it.
                except Exception:
                    log.exception("gateway dropped a frame from Redis on %r", channel)
            else:
                self._control(kind, response)

    def _control(self, kind: bytes, response: list[Any]) -> None:
        """A reply on the listener's link other than a message: a pong or a subscribe ack."""
        if kind == b"pong":
            waiter = self._pongs.pop(response[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == b"subscribe":
            futures = self._acks.get(response[1])
            if futures:
                future = futures.popleft()
                if not futures:
                    del self._acks[response[1]]
                if not future.done():
                    future.set_result(None)

    @staticmethod
    def _deliver_traced(deliver: Deliver, channel: str, frame: bytes, traceparent: bytes) -> None:
        context = tracing.extract_context({"traceparent": traceparent.decode()})
        with tracing.span(
            "websocket.deliver",
            {"messaging.destination.name": channel, "messaging.system": "redis"},
            kind=SpanKind.CONSUMER,
            context=context,
        ) as span:
            span.set_attribute("dotmac.websocket.deliveries", deliver(channel, frame))

    # -- housekeeping: pings, heartbeats, sweeping dead processes ----------------------------

    async def _housekeeping(self) -> None:
        """Ping the listener's link every 5 s; heartbeat every third of ``presence_ttl``."""
        loop = asyncio.get_running_loop()
        beat_every = self.presence_ttl / 3
        next_beat = loop.time() + beat_every
        next_ping = loop.time() + _PING_INTERVAL
        while True:
            await asyncio.sleep(max(0.0, min(next_beat, next_ping) - loop.time()))
            now = loop.time()
            if now >= next_ping:
                next_ping = now + _PING_INTERVAL
                self._ping(now)
            if now >= next_beat:
                next_beat = now + beat_every
                try:
                    await self._beat()
                except CommunicationsError as exc:
                    log.warning("gateway presence heartbeat failed: %s", exc)

    def _ping(self, now: float) -> None:
        conn = self._conn
        if conn is None:
            return
        if now - self._last_seen > _STALE_AFTER:
            log.error(
                "gateway Redis pub/sub link silent for %.0f s; reconnecting", now - self._last_seen
            )
            self._drop_connection()
        else:
            self._write_soon(conn, conn.pack_commands([["PING"]]))

    def _write_soon(self, conn: Any, packed: list[bytes]) -> None:
        self._write_soon_task(self._write(conn, packed))

    async def _beat(self) -> None:
        """Heartbeat; start sweeping dead processes; write everything back if swept."""
        ttl_ms = int(self.presence_ttl * 1000)
        async with bounded_redis_call("gateway heartbeat", self._timeout):
            reply = await self._heartbeat(
                keys=[self._nodes_key, self._marker_key(self.node_id)], args=[self.node_id, ttl_ms]
            )
        if int(reply[0]) and self._beaten:
            log.warning("gateway node %s was taken for dead; writing its state back", self.node_id)
            self._write_back_needed = True
        self._beaten = True
        self._dead = tuple(n.decode() for n in reply[1:])
        if self._write_back_needed:
            await self._write_back()
            self._write_back_needed = False
        if self._pending_tenants:
            await self._write_releases()
        if self._dead and (self._sweeper is None or self._sweeper.done()):
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep_dead(self._dead), name="dotmac-ws-redis-sweeper"
            )

    def _marker_key(self, node: str) -> str:
        return tagged_key(self.prefix, "node", node, "alive")

    async def _sweep_dead(self, dead: tuple[str, ...]) -> None:
        """Sweep each silent process once (a lock per process), then forget it."""
        lock_ms = int(self._timeout * 8 * 1000)
        for node in dead:
            lock = tagged_key(self.prefix, "node", node, "sweeping")
            try:
                async with bounded_redis_call("gateway sweep", self._timeout):
                    if not await self.client.set(lock, self.node_id, nx=True, px=lock_ms):
                        continue  # another process sweeps it
                log.info("gateway node %s stopped heartbeating; sweeping its presence", node)
                async with bounded_redis_call("gateway sweep", self._timeout * 4):
                    await self._sweep_node(node, announce=True)
                    await self._sweep_done(
                        keys=[self._nodes_key, self._marker_key(node),
                              tagged_key(self.prefix, "node", node), lock],
                        args=[node, int(self.presence_ttl * 1000)],
                    )  # fmt: skip
            except CommunicationsError as exc:  # the lock expires: swept again later
                log.warning("gateway sweep of node %s failed: %s", node, exc)

    async def _sweep_node(self, node: str, *, announce: bool) -> None:
        """Remove ``node``'s presence and tenant counts (announcing leaves if asked)."""
        keys = await self.client.smembers(tagged_key(self.prefix, "node", node))
        tenant_prefix = f"{self.prefix}:tenant:"
        for raw in keys:
            key = raw.decode() if isinstance(raw, bytes) else raw
            if key.startswith(tenant_prefix):
                await self.client.hdel(key, node)
                continue
            left = await self._presence_drop(keys=[key], args=[node])
            if announce and left:
                channel = key[len(self.prefix) + 2 : -len("}:presence")]
                for user in left:
                    await self._announce_everywhere(channel, user.decode(), "leave")

    async def _write_back(self) -> None:
        counts = dict(self._presence_counts)
        if counts:
            await self.set_presence(counts)
        async with (
            bounded_redis_call("gateway tenant write-back", self._timeout),
            self.client.pipeline(transaction=False) as pipe,
        ):
            for tenant, count in self._tenant_counts.items():
                key = self._tenant_key(tenant)
                pipe.hset(key, self.node_id, count)
                pipe.sadd(self._node_keys, key)
            await pipe.execute()
        self._pending_tenants.clear()  # the absolute counts written include those releases

    # -- presence --------------------------------------------------------------------------

    async def _announce_everywhere(self, channel: str, user_id: str, event: Any) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        frame = self._announce(deliver, channel, user_id, event)
        try:
            await self.publish(presence_channel(channel), frame)
        except CommunicationsError as exc:
            log.warning("presence %s of %r on %r not sent to other processes: %s", event,
                        user_id, channel, exc)  # fmt: skip

    async def set_presence(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Write this process's counts (one script per channel, pipelined); announce changes."""
        by_channel: dict[str, list[str]] = {}
        users = self._presence_users
        for (channel, user_id), count in counts.items():
            before = self._presence_counts.get((channel, user_id), 0)
            if count > 0:
                self._presence_counts[channel, user_id] = count
            else:
                self._presence_counts.pop((channel, user_id), None)
            if (before > 0) != (count > 0):  # this process's users per channel
                users[channel] = users.get(channel, 0) + (1 if count > 0 else -1)
                if not users[channel]:
                    del users[channel]
            by_channel.setdefault(channel, [self.node_id]).extend((user_id, str(count)))
        channels = list(by_channel)
        async with (
            bounded_redis_call("gateway presence update", self._timeout),
            self.client.pipeline(transaction=False) as pipe,
        ):
            for channel in channels:
                key = self._key(channel, "presence")
                await self._presence_set(keys=[key], args=by_channel[channel], client=pipe)
                # The sweep's list of what this process wrote: only channels it still is in.
                if channel in users:
                    pipe.sadd(self._node_keys, key)
                else:
                    pipe.srem(self._node_keys, key)
            replies = await pipe.execute()
        for channel, reply in zip(channels, replies[::2], strict=True):
            for i in range(0, len(reply), 2):
                event = "join" if reply[i + 1] == b"join" else "leave"
                await self._announce_everywhere(channel, reply[i].decode(), event)

    async def presence(self, channel: str) -> dict[str, int]:
        """Users subscribed to ``channel`` on live processes, with their connection count."""
        ttl_ms = int(self.presence_ttl * 1000)
        async with (
            bounded_redis_call("gateway presence read", self._timeout),
            self.client.pipeline(transaction=False) as pipe,
        ):
            await self._alive_script(keys=[self._nodes_key], args=[ttl_ms], client=pipe)
            pipe.hgetall(self._key(channel, "presence"))
            alive_raw, entries = await pipe.execute()
        alive = {node.decode() for node in alive_raw}
        alive.add(self.node_id)
        users: dict[str, int] = {}
        for user, value in entries.items():
            total = sum(
                int(count)
                for node, _, count in (part.partition("=") for part in value.decode().split(";"))
                if node in alive
            )
            if total:
                users[user.decode()] = total
        return users

    # -- history ---------------------------------------------------------------------------

    async def publish_history(self, channel: str, frame: bytes, *, size: int, ttl: float) -> bytes:
        """Append ``frame`` with the next offset and publish it to every process, this one too.

        Every process, this one included, delivers history frames from the pub/sub stream, in
        the order Redis appended them (:attr:`delivers_own_history`).
        """
        keys = [self._key(channel, "history"), self._key(channel, "meta")]
        args: list[bytes | str | int] = [
            frame,
            size,
            max(1, int(ttl * 1000)),
            new_epoch(),
            self._pubsub_name(channel),
            self._envelope_head(origin=b""),  # no origin: this process delivers it too
        ]
        result: bytes = await self._send(self._history_publish, (keys, args))
        return result

    async def read_history(self, channel: str, since: StreamPosition) -> HistoryReplay:
        """Read the channel's stream after ``since`` (one script: a consistent snapshot)."""
        keys = [self._key(channel, "history"), self._key(channel, "meta")]
        async with bounded_redis_call("gateway history read", self._timeout):
            reply = await self._history_read(keys=keys, args=[since.offset, since.epoch])
        if len(reply) < 3 or reply[2] != 1:
            return HistoryReplay([], False, since.offset)
        return HistoryReplay(list(reply[3:]), True, int(reply[1]))

    # -- tenants ---------------------------------------------------------------------------

    def _tenant_key(self, tenant_id: str) -> str:
        return f"{self.prefix}:tenant:{{{tenant_id}}}"

    async def reserve_tenant(self, tenant_id: str, limit: int) -> bool:
        """Take a slot of ``tenant_id`` if live processes hold fewer than ``limit``."""
        key = self._tenant_key(tenant_id)
        async with (
            bounded_redis_call("gateway tenant reserve", self._timeout),
            self.client.pipeline(transaction=False) as pipe,
        ):
            await self._tenant_reserve(
                keys=[key], args=[self.node_id, limit, *self._dead], client=pipe
            )
            pipe.sadd(self._node_keys, key)
            taken, _ = await pipe.execute()
        if taken:
            self._tenant_counts[tenant_id] = self._tenant_counts.get(tenant_id, 0) + 1
        return bool(taken)

    def release_tenant(self, tenant_id: str) -> None:
        """Give back a slot (written in the background, with other releases)."""
        left = self._tenant_counts.get(tenant_id, 0) - 1
        if left > 0:
            self._tenant_counts[tenant_id] = left
        else:
            self._tenant_counts.pop(tenant_id, None)
        self._pending_tenants[tenant_id] = self._pending_tenants.get(tenant_id, 0) + 1
        if not self._release_scheduled and self._deliver is not None:
            self._release_scheduled = True
            self._write_soon_task(self._write_releases())

    def _write_soon_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    async def _write_releases(self) -> None:
        """Write the pending releases; failed ones stay pending for the next heartbeat."""
        await asyncio.sleep(0)  # gather the releases of one event-loop turn
        self._release_scheduled = False
        pending, self._pending_tenants = self._pending_tenants, {}
        if not pending:
            return
        try:
            async with (
                bounded_redis_call("gateway tenant release", self._timeout),
                self.client.pipeline(transaction=False) as pipe,
            ):
                for tenant_id, released in pending.items():
                    key = self._tenant_key(tenant_id)
                    if tenant_id in self._tenant_counts:
                        pipe.hincrby(key, self.node_id, -released)
                    else:  # none left here
                        pipe.hdel(key, self.node_id)
                        pipe.srem(self._node_keys, key)
                await pipe.execute()
        except CommunicationsError as exc:
            log.warning("gateway tenant slots not released in Redis (%s); retrying later", exc)
            for tenant_id, released in pending.items():
                now_pending = self._pending_tenants.get(tenant_id, 0)
                self._pending_tenants[tenant_id] = now_pending + released
