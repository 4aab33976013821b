"""The shared notification store: state in Redis, the same for every process, kept over restarts.

Keys (``P`` is ``prefix``, default ``dotmac:notify``; keys used together in one script or
transaction share one hash tag, so the store runs unchanged on Redis Cluster):

- ``{P:idem:<key>}`` — an idempotency claim: ``"<expires ms>|<notification id>"``;
- ``{P:result:<id>}`` — a saved result: ``"<expires ms>|<JSON>"``;
- ``{P:hist:<id>}`` — a LIST of ``"<expires ms>|<JSON>"`` status entries, capped;
- ``{P:sched}:queue`` (ZSET id → ``send_at`` µs), ``{P:sched}:leased`` (ZSET id → lease end µs),
  ``{P:sched}:items`` (HASH id → notification JSON);
- ``{P:dlq}:order`` (ZSET id → sequence), ``{P:dlq}:items`` (HASH id → JSON), ``{P:dlq}:seq``;
- ``{P:suppress:<channel>}`` — a HASH recipient → reason.

Braces and ``%`` inside a key, id or channel are percent-encoded, so user input never breaks the
hash tag. **Time.** "Now" always comes from the store's clock (the injected one, else the local
clock) and is passed to scripts as an argument; expiry is judged against the time written in the
value, so a fake clock drives expiry in tests exactly as it does on :class:`MemoryStore`. Each TTL
key also gets a real ``PX``/``PEXPIRE`` of the same length, so Redis frees it without a reader.
Processes sharing a store should keep their clocks in sync (NTP); skew shifts expiry by as much.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications._redis import bounded_redis_call, create_redis_client, tagged_key
from dotmac.communications.errors import ConfigurationError, NotificationError

from ._models import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    NotificationResult,
    NotificationStatus,
)
from ._store import NotificationDeadLetter, NotificationStore, StatusEntry
from ._store_memory import decode_notification, encode_notification

__all__ = ["RedisStore"]

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DLQ_PAGE = 500

# KEYS[1]: claim. ARGV: id, now ms, expires ms, ttl ms. Returns the live holder, or nil once taken.
CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, '|', 1, true)
  if sep and tonumber(string.sub(v, 1, sep - 1)) > tonumber(ARGV[2]) then
    return string.sub(v, sep + 1)
  end
end
redis.call('SET', KEYS[1], ARGV[3] .. '|' .. ARGV[1], 'PX', ARGV[4])
return false
"""
# KEYS[1]: claim. ARGV: id. Deletes it only when ARGV[1] holds it.
RELEASE = """
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, '|', 1, true)
  if sep and string.sub(v, sep + 1) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
end
return 0
"""
# KEYS[1]: history list. ARGV: now ms, ttl ms, cap, entries... A history whose last entry
# expired is dropped first, so it never comes back to life under a later entry.
RECORD = """
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
  local sep = string.find(last, '|', 1, true)
  if not sep or tonumber(string.sub(last, 1, sep - 1)) <= tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[1])
  end
end
for i = 4, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: queue, leased, items. ARGV: now µs, lease end µs, limit. Lapsed leases first, then due
# items; each is (re)leased and its JSON returned.
TAKE_DUE = """
local limit = tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, limit)
if #ids < limit then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit - #ids)
  for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[1], id)
    table.insert(ids, id)
  end
end
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[3], id)
  if raw then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    table.insert(out, raw)
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""
# KEYS: queue, leased, items. ARGV: id, now µs. Removes a waiting item or one whose lease lapsed.
CANCEL = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 1
end
local lease = redis.call('ZSCORE', KEYS[2], ARGV[1])
if lease and tonumber(lease) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 1
end
return 0
"""
# KEYS: order, items, seq. ARGV: id, JSON, cap. The oldest letters go past the cap.
ADD_DEAD = """
local seq = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #old, 2 do redis.call('HDEL', KEYS[2], old[i]) end
end
return 1
"""
# KEYS: order, items. ARGV: ids. Returns how many were there.
REMOVE_DEAD = """
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return n
"""
SCRIPTS = {
    "claim": CLAIM,
    "release": RELEASE,
    "record": RECORD,
    "take_due": TAKE_DUE,
    "cancel": CANCEL,
    "add_dead": ADD_DEAD,
    "remove_dead": REMOVE_DEAD,
}
"""Every Lua script the store runs (the tests check they touch only ``KEYS``)."""


# ---------------------------------------------------------------------------------- codecs
def _escape(part: str) -> str:
    """Make ``part`` safe inside a hash tag (reversible, so distinct inputs stay distinct)."""
    return part.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _us(moment: datetime) -> int:
    if moment.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {moment!r}")
    return (moment - _EPOCH) // _MICROSECOND


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def result_to_dict(result: NotificationResult) -> dict[str, Any]:
    """A JSON-ready dict of ``result`` (statuses as their values)."""
    return {
        "id": result.id,
        "status": result.status.value,
        "deliveries": [
            {
                "recipient": d.recipient,
                "status": d.status.value,
                "provider": d.provider,
                "attempts": d.attempts,
                "error": d.error,
                "provider_message_id": d.provider_message_id,
                "channel": d.channel,
            }
            for d in result.deliveries
        ],
    }


def result_from_dict(data: dict[str, Any]) -> NotificationResult:
    """Rebuild what :func:`result_to_dict` wrote."""
    deliveries = tuple(
        DeliveryResult(
            recipient=d["recipient"],
            status=DeliveryStatus(d["status"]),
            provider=d["provider"],
            attempts=d["attempts"],
            error=d["error"],
            provider_message_id=d["provider_message_id"],
            channel=d["channel"],
        )
        for d in data["deliveries"]
    )
    return NotificationResult(data["id"], NotificationStatus(data["status"]), deliveries)


def entry_to_dict(entry: StatusEntry) -> dict[str, Any]:
    """A JSON-ready dict of ``entry`` (time as ISO 8601)."""
    return {
        "time": entry.time.isoformat(),
        "event": entry.event,
        "recipient": entry.recipient,
        "provider": entry.provider,
        "attempt": entry.attempt,
        "error": entry.error,
        "provider_message_id": entry.provider_message_id,
    }


def entry_from_dict(data: dict[str, Any]) -> StatusEntry:
    """Rebuild what :func:`entry_to_dict` wrote."""
    return StatusEntry(**{**data, "time": datetime.fromisoformat(data["time"])})


def letter_to_dict(letter: NotificationDeadLetter) -> dict[str, Any]:
    """A JSON-ready dict of ``letter`` (the notification as its own JSON string)."""
    return {
        "id": letter.id,
        "channel": letter.notification.channel.value,
        "notification": encode_notification(letter.notification).decode(),
        "recipient": letter.recipient,
        "error": letter.error,
        "attempts": letter.attempts,
        "time": letter.time.isoformat(),
        "provider": letter.provider,
    }


def letter_from_dict(data: dict[str, Any]) -> NotificationDeadLetter:
    """Rebuild what :func:`letter_to_dict` wrote."""
    return NotificationDeadLetter(
        id=data["id"],
        notification=decode_notification(data["notification"]),
        recipient=data["recipient"],
        error=data["error"],
        attempts=data["attempts"],
        time=datetime.fromisoformat(data["time"]),
        provider=data["provider"],
    )


def _loads(raw: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise NotificationError(f"stored {what} is not valid JSON: {exc}") from exc


def _split_expiring(raw: bytes | str) -> tuple[int, bytes]:
    """Split ``b"<expires ms>|<payload>"`` (``str`` from a client made with decode_responses)."""
    if isinstance(raw, str):
        raw = raw.encode()
    expires, sep, payload = raw.partition(b"|")
    if not sep or not expires.isdigit():
        raise NotificationError(f"stored value has no expiry prefix: {raw[:40]!r}")
    return int(expires), payload


def _expiring(expires_ms: int, payload: bytes) -> bytes:
    return b"%d|%b" % (expires_ms, payload)


# ----------------------------------------------------------------------------------- store
class RedisStore(NotificationStore):
    """Notification state in Redis, shared by every process (see the module docstring).

    Args:
        url: Redis URL; or pass ``client``.
        client: A ready asyncio client; the caller keeps ownership (:meth:`close` leaves it).
        prefix: Start of every key (non-empty, no braces).
        max_dead_letters: Dead letters kept; the oldest go first past it.
        max_history: Status entries kept per notification; the oldest go first past it.
        timeout: Deadline in seconds of each store operation.
        clock: Time source for "now" (tests pass a ``FakeClock``); the local clock otherwise.

    Raises:
        ConfigurationError: Neither or both of ``url`` and ``client``; a bad prefix, cap or
            timeout; an invalid URL.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = "dotmac:notify",
        max_dead_letters: int = 10_000,
        max_history: int = 1_000,
        timeout: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisStore: pass exactly one of url or client")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"RedisStore: prefix must be non-empty and brace-free, got {prefix!r}"
            )
        for name, value in (("max_dead_letters", max_dead_letters), ("max_history", max_history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"RedisStore: {name} must be an int >= 1, got {value!r}")
        if not timeout > 0:
            raise ConfigurationError(f"RedisStore: timeout must be > 0, got {timeout!r}")
        self._owned = client is None
        # One deadline per operation (bounded_redis_call) instead of a timer per socket read.
        self.client: aioredis.Redis = (
            client if client is not None else create_redis_client(url or "", socket_timeout=None)
        )
        self.prefix = prefix
        self.max_dead_letters = max_dead_letters
        self.max_history = max_history
        self.timeout = timeout
        self._clock = clock or system_clock
        self._scripts = {name: self.client.register_script(src) for name, src in SCRIPTS.items()}
        sched = f"{prefix}:sched"
        self._sched_keys = [
            tagged_key(sched, "queue"),
            tagged_key(sched, "leased"),
            tagged_key(sched, "items"),
        ]
        dlq = f"{prefix}:dlq"
        self._dlq_keys = [
            tagged_key(dlq, "order"),
            tagged_key(dlq, "items"),
            tagged_key(dlq, "seq"),
        ]

    # ------------------------------------------------------------------------------ plumbing
    def _key(self, kind: str, name: str) -> str:
        return tagged_key(f"{self.prefix}:{kind}:{_escape(name)}")

    def _now_ms(self) -> int:
        return int(self._clock.time() * 1000)

    async def _run(self, operation: str, script: str, keys: list[str], args: list[Any]) -> Any:
        async with bounded_redis_call(f"notification store {operation}", self.timeout):
            return await self._scripts[script](keys=keys, args=args)

    async def start(self) -> None:
        """Load the Lua scripts (which also checks that Redis answers).

        Raises:
            BackendUnavailableError: Redis cannot be reached.
        """
        async with bounded_redis_call("notification store start", self.timeout):
            for source in SCRIPTS.values():
                await self.client.script_load(source)

    async def ping(self) -> None:
        """Raise a library error when Redis does not answer."""
        async with bounded_redis_call("notification store ping", self.timeout):
            await self.client.ping()

    async def close(self) -> None:
        """Close the client if this store created it."""
        if self._owned:
            await self.client.aclose()

    # --------------------------------------------------------------------------- idempotency
    async def claim(self, key: str, notification_id: str, ttl: float) -> str | None:
        """See :meth:`NotificationStore.claim`."""
        ttl_ms = _ttl_ms("claim ttl", ttl)
        now = self._now_ms()
        args = [notification_id, now, now + ttl_ms, ttl_ms]
        holder = await self._run("claim", "claim", [self._key("idem", key)], args)
        return None if holder is None else _text(holder)

    async def release(self, key: str, notification_id: str) -> None:
        """See :meth:`NotificationStore.release`."""
        await self._run("release", "release", [self._key("idem", key)], [notification_id])

    async def save_result(self, result: NotificationResult, ttl: float) -> None:
        """See :meth:`NotificationStore.save_result`."""
        ttl_ms = _ttl_ms("result ttl", ttl)
        value = _expiring(self._now_ms() + ttl_ms, orjson.dumps(result_to_dict(result)))
        async with bounded_redis_call("notification store save result", self.timeout):
            await self.client.set(self._key("result", result.id), value, px=ttl_ms)

    async def get_result(self, notification_id: str) -> NotificationResult | None:
        """See :meth:`NotificationStore.get_result`."""
        async with bounded_redis_call("notification store get result", self.timeout):
            raw = await self.client.get(self._key("result", notification_id))
        if raw is None:
            return None
        expires, payload = _split_expiring(raw)
        if expires <= self._now_ms():
            return None
        return _decoded(result_from_dict, _loads(payload, "result"), "result")

    # ------------------------------------------------------------------------------- history
    async def record(
        self, notification_id: str, entries: Sequence[StatusEntry], ttl: float
    ) -> None:
        """See :meth:`NotificationStore.record`."""
        ttl_ms = _ttl_ms("history ttl", ttl)
        if not entries:
            return
        now = self._now_ms()
        values = [_expiring(now + ttl_ms, orjson.dumps(entry_to_dict(e))) for e in entries]
        key = self._key("hist", notification_id)
        await self._run("record", "record", [key], [now, ttl_ms, self.max_history, *values])

    async def history(self, notification_id: str) -> list[StatusEntry]:
        """See :meth:`NotificationStore.history`."""
        async with bounded_redis_call("notification store history", self.timeout):
            raws: list[bytes | str] = await self.client.lrange(
                self._key("hist", notification_id), 0, -1
            )
        if not raws or _split_expiring(raws[-1])[0] <= self._now_ms():
            return []
        return [
            _decoded(entry_from_dict, _loads(_split_expiring(raw)[1], "status entry"), "entry")
            for raw in raws
        ]

    # ---------------------------------------------------------------------------- scheduling
    async def schedule(self, notification: Notification) -> None:
        """See :meth:`NotificationStore.schedule`; scheduling an id again replaces it.

        Raises:
            NotificationError: ``send_at`` is unset or a value is not JSON-serialisable.
        """
        if notification.send_at is None:
            raise NotificationError(f"notification {notification.id!r} has no send_at to wait for")
        raw = encode_notification(notification)
        queue, leased, items = self._sched_keys
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(items, notification.id, raw)
        pipe.zrem(leased, notification.id)
        pipe.zadd(queue, {notification.id: _us(notification.send_at)})
        async with bounded_redis_call("notification store schedule", self.timeout):
            await pipe.execute()

    async def take_due(self, now: datetime, limit: int, lease: float) -> list[Notification]:
        """See :meth:`NotificationStore.take_due` (atomic across processes: one Lua script)."""
        if not lease > 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        if limit < 1:
            return []
        start = _us(now)
        until = _us(now + timedelta(seconds=lease))
        raws = await self._run("take due", "take_due", self._sched_keys, [start, until, limit])
        return [decode_notification(raw) for raw in raws]

    async def finish_scheduled(self, notification_id: str) -> None:
        """See :meth:`NotificationStore.finish_scheduled`."""
        queue, leased, items = self._sched_keys
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(queue, notification_id)
        pipe.zrem(leased, notification_id)
        pipe.hdel(items, notification_id)
        async with bounded_redis_call("notification store finish scheduled", self.timeout):
            await pipe.execute()

    async def cancel_scheduled(self, notification_id: str) -> bool:
        """See :meth:`NotificationStore.cancel_scheduled`.

        A taken notification whose lease lapsed (its sender died) counts as waiting again.
        """
        now = _us(datetime.fromtimestamp(self._clock.time(), UTC))
        found = await self._run("cancel", "cancel", self._sched_keys, [notification_id, now])
        return bool(found)

    async def scheduled_count(self) -> int:
        """See :meth:`NotificationStore.scheduled_count`."""
        async with bounded_redis_call("notification store scheduled count", self.timeout):
            return int(await self.client.hlen(self._sched_keys[2]))

    # -------------------------------------------------------------------------- dead letters
    async def add_dead(self, letter: NotificationDeadLetter) -> None:
        """See :meth:`NotificationStore.add_dead`; adding an id again makes it the newest."""
        raw = orjson.dumps(letter_to_dict(letter))
        await self._run(
            "add dead letter", "add_dead", self._dlq_keys, [letter.id, raw, self.max_dead_letters]
        )

    async def dead_letters(
        self, *, channel: str | None = None, limit: int = 100
    ) -> list[NotificationDeadLetter]:
        """See :meth:`NotificationStore.dead_letters` (pages through the newest first)."""
        order, items, _ = self._dlq_keys
        found: list[NotificationDeadLetter] = []
        start = 0
        while len(found) < limit:
            page = limit if channel is None else _DLQ_PAGE
            async with bounded_redis_call("notification store dead letters", self.timeout):
                ids: list[Any] = await self.client.zrevrange(order, start, start + page - 1)
                raws: list[Any] = await self.client.hmget(items, ids) if ids else []
            for raw in raws:
                if raw is None or len(found) >= limit:
                    continue  # removed between the two reads
                data = _loads(raw, "dead letter")
                if channel is None or data.get("channel") == str(channel):
                    found.append(_decoded(letter_from_dict, data, "dead letter"))
            if len(ids) < page:
                break
            start += page
        return found

    async def remove_dead(self, letter_ids: Sequence[str]) -> int:
        """See :meth:`NotificationStore.remove_dead`."""
        if not letter_ids:
            return 0
        keys = self._dlq_keys[:2]
        return int(await self._run("remove dead letters", "remove_dead", keys, list(letter_ids)))

    # --------------------------------------------------------------------------- suppression
    async def suppress(self, channel: str, recipient: str, reason: str) -> None:
        """See :meth:`NotificationStore.suppress`."""
        async with bounded_redis_call("notification store suppress", self.timeout):
            await self.client.hset(self._key("suppress", str(channel)), recipient, reason)

    async def unsuppress(self, channel: str, recipient: str) -> bool:
        """See :meth:`NotificationStore.unsuppress`."""
        async with bounded_redis_call("notification store unsuppress", self.timeout):
            removed = await self.client.hdel(self._key("suppress", str(channel)), recipient)
        return bool(removed)

    async def suppressed(self, channel: str, recipient: str) -> str | None:
        """See :meth:`NotificationStore.suppressed`."""
        async with bounded_redis_call("notification store suppressed", self.timeout):
            reason = await self.client.hget(self._key("suppress", str(channel)), recipient)
        return None if reason is None else _text(reason)


def _ttl_ms(what: str, ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"{what} must be > 0 seconds, got {ttl!r}")
    return max(1, round(ttl * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decoded(build: Callable[[Any], T], data: Any, what: str) -> T:
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise NotificationError(f"stored {what} is corrupt: {exc!r}") from exc
