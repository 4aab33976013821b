"""The gateway's wire protocol, sans I/O: client frames in, actions out.

:class:`ConnectionProtocol` holds one connection's state (its channels, the subscribes waiting for a
decision, its message rate budget) and turns each client frame into a list of *actions* (frozen
dataclasses) that the asyncio adapter carries out: write a frame, ask the authorizer, attach the
connection to a channel, publish, close. It reads no clock (``now`` is passed in), starts no task
and touches no socket, so its tests are plain and synchronous. Bad client input never raises: it is
answered with an ``error`` frame or a close. Only misuse by the caller raises
:class:`~dotmac.communications.errors.ProtocolError`.

The ``encode_*`` functions build server frames; fan-out encodes a message once and writes the same
bytes to every subscriber. The format is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

import orjson
from websockets.frames import CloseCode

from dotmac.communications.errors import (
    InvalidChannelError,
    MessageSerializationError,
    ProtocolError,
)

__all__ = [
    "BINARY_NOT_SUPPORTED",
    "CLIENT_FRAME_TYPES",
    "ERROR_CODES",
    "FORBIDDEN",
    "INTERNAL_ERROR",
    "INVALID_CHANNEL",
    "INVALID_FRAME",
    "INVALID_JSON",
    "MAX_CHANNEL_LENGTH",
    "NOT_SUBSCRIBED",
    "RATE_LIMITED",
    "SERVER_FRAME_TYPES",
    "TOO_MANY_SUBSCRIPTIONS",
    "UNKNOWN_TYPE",
    "Action",
    "Attach",
    "Close",
    "ConnectionProtocol",
    "Detach",
    "Dispatch",
    "Publish",
    "Send",
    "StreamPosition",
    "Subscribe",
    "encode_error",
    "encode_message",
    "encode_pong",
    "encode_presence",
    "encode_subscribed",
    "encode_unsubscribed",
    "tenant_channel",
    "user_channel",
    "validate_channel",
]

MAX_CHANNEL_LENGTH: Final = 200
_MAX_EPOCH_LENGTH = 200
_MAX_OFFSET = 2**64 - 1
_PREVIEW = 40  # characters of client input quoted back in an error message
_ECHO_LIMIT = 1000  # longest invalid channel name echoed back in its error frame

INVALID_JSON: Final = "invalid_json"
INVALID_FRAME: Final = "invalid_frame"
UNKNOWN_TYPE: Final = "unknown_type"
INVALID_CHANNEL: Final = "invalid_channel"
BINARY_NOT_SUPPORTED: Final = "binary_not_supported"
FORBIDDEN: Final = "forbidden"
NOT_SUBSCRIBED: Final = "not_subscribed"
TOO_MANY_SUBSCRIPTIONS: Final = "too_many_subscriptions"
RATE_LIMITED: Final = "rate_limited"
INTERNAL_ERROR: Final = "internal_error"

ERROR_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        INVALID_JSON: "the frame is not valid JSON (or not UTF-8)",
        INVALID_FRAME: "the frame is not an object, or a field is missing or has the wrong type",
        UNKNOWN_TYPE: "the frame's type is not one the server knows",
        INVALID_CHANNEL: "the channel name is malformed",
        BINARY_NOT_SUPPORTED: "a binary frame was sent; the protocol is JSON text frames",
        FORBIDDEN: "the built-in rules or the authorizer refused the subscribe or publish",
        NOT_SUBSCRIBED: "unsubscribe from a channel the connection is not subscribed to",
        TOO_MANY_SUBSCRIPTIONS: "the connection has reached its subscription limit",
        RATE_LIMITED: "the frame was dropped: the connection sends faster than its rate limit",
        INTERNAL_ERROR: "the server failed to handle the request; it may succeed later",
    }
)

CLIENT_FRAME_TYPES: Final = frozenset({"subscribe", "unsubscribe", "publish", "ping"})
SERVER_FRAME_TYPES: Final = frozenset(
    {"subscribed", "unsubscribed", "message", "pong", "error", "presence"}
)

# Channels in these namespaces (first segment) are governed by built-in rules and server-only for
# publishing: `user:{id}` belongs to one user, `tenant:{id}` (and `tenant:{id}:…`) to one tenant.
_USER = "user"
_TENANT = "tenant"
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a client left a history channel: ``since`` in a subscribe frame.

    Args:
        offset: Offset of the last message the client saw.
        epoch: Epoch of the channel's stream when it saw it (a new epoch means the history was
            lost and offsets restarted).
    """

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``frame``, an encoded server frame, to this connection."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    """The client asks to subscribe: decide, then call ``confirm_subscribe``/``refuse_subscribe``.

    Args:
        channel: The valid channel name asked for.
        presence: The client asked for presence (join/leave) frames.
        since: The client asked for history after this position (history channels).
        builtin: A built-in rule already allows the channel (``user:{own id}…``,
            ``tenant:{own id}…``): the authorizer is not consulted.
    """

    channel: str
    presence: bool = False
    since: StreamPosition | None = None
    builtin: bool = False


@dataclass(frozen=True, slots=True)
class Attach:
    """Start delivering ``channel``'s messages to this connection (from ``confirm_subscribe``)."""

    channel: str
    presence: bool = False
    since: StreamPosition | None = None


@dataclass(frozen=True, slots=True)
class Detach:
    """Stop delivering ``channel``'s messages to this connection (the client unsubscribed)."""

    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    """The client asks to publish ``data`` on ``channel``; authorize, then publish or refuse."""

    channel: str
    data: Any


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with this WebSocket close code and reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A frame of an application type (``app_types``): hand it to the host's handler."""

    type: str
    frame: dict[str, Any]


Action: TypeAlias = Send | Subscribe | Attach | Detach | Publish | Close | Dispatch


def _channel_problem(channel: object) -> str | None:
    """Say what is wrong with a channel name, or ``None`` when it is valid."""
    if not isinstance(channel, str):
        return f"channel must be a string, got {type(channel).__name__}"
    if not channel:
        return "channel must not be empty"
    if len(channel) > MAX_CHANNEL_LENGTH:
        return f"channel is longer than {MAX_CHANNEL_LENGTH} characters"
    if not channel.isprintable() or _WHITESPACE.search(channel):
        return "channel must be printable characters without whitespace"
    if "" in channel.split(":"):
        return "channel has an empty ':'-separated segment"
    return None


def validate_channel(channel: str) -> str:
    """Return ``channel`` if it is a valid channel name.

    A name is 1 to 200 printable characters without whitespace; ``:`` separates non-empty
    segments (``tenant:7:alerts``).

    Args:
        channel: The name to check.

    Returns:
        ``channel`` unchanged.

    Raises:
        InvalidChannelError: The name is malformed.
    """
    problem = _channel_problem(channel)
    if problem is not None:
        raise InvalidChannelError(f"invalid channel {_preview(channel)}: {problem}")
    return channel


def _namespace_channel(namespace: str, owner: str) -> str:
    if not isinstance(owner, str) or not owner or ":" in owner:
        raise InvalidChannelError(
            f"{namespace} id must be a non-empty string without ':', got {_preview(owner)}"
        )
    return validate_channel(f"{namespace}:{owner}")


def user_channel(user_id: str) -> str:
    """Name the channel every connection of ``user_id`` is subscribed to (``user:{id}``).

    Raises:
        InvalidChannelError: ``user_id`` is empty, has ``:`` or cannot be part of a channel name.
    """
    return _namespace_channel(_USER, user_id)


def tenant_channel(tenant_id: str) -> str:
    """Name the channel every connection inside ``tenant_id`` is subscribed to (``tenant:{id}``).

    Raises:
        InvalidChannelError: ``tenant_id`` is empty, has ``:`` or cannot be part of a channel name.
    """
    return _namespace_channel(_TENANT, tenant_id)


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…"


def _dumps(frame: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(frame)
    except orjson.JSONEncodeError as exc:
        raise MessageSerializationError(
            f"cannot serialise a {frame['type']!r} frame to JSON: {exc}"
        ) from exc


def encode_message(
    channel: str,
    data: Any,
    id: str,
    *,
    offset: int | None = None,
    epoch: str | None = None,
) -> bytes:
    """Encode a ``message`` frame; encode once and send the same bytes to every subscriber.

    Args:
        channel: A valid channel name (see :func:`validate_channel`).
        data: Any JSON-serialisable value (orjson types: dataclasses, datetimes, UUIDs too).
        id: The message id, unique per message.
        offset: Position in the channel's history (history channels only).
        epoch: The history stream's epoch (history channels only).

    Returns:
        The UTF-8 JSON text of the frame.

    Raises:
        MessageSerializationError: ``data`` cannot be serialised to JSON.
    """
    frame: dict[str, Any] = {"type": "message", "channel": channel, "data": data, "id": id}
    if offset is not None:
        frame["offset"] = offset
    if epoch is not None:
        frame["epoch"] = epoch
    return _dumps(frame)


def encode_subscribed(channel: str, *, recovered: bool | None = None) -> bytes:
    """Encode a ``subscribed`` frame; ``recovered`` is set only for a subscribe with ``since``."""
    frame: dict[str, Any] = {"type": "subscribed", "channel": channel}
    if recovered is not None:
        frame["recovered"] = recovered
    return _dumps(frame)


def encode_unsubscribed(channel: str) -> bytes:
    """Encode an ``unsubscribed`` frame."""
    return _dumps({"type": "unsubscribed", "channel": channel})


_PONG = orjson.dumps({"type": "pong"})


def encode_pong() -> bytes:
    """Encode a ``pong`` frame (the answer to an application-level ``ping``)."""
    return _PONG


def encode_error(code: str, message: str, *, channel: str | None = None) -> bytes:
    """Encode an ``error`` frame.

    Args:
        code: One of :data:`ERROR_CODES`.
        message: Human-readable detail; clients should act on ``code``.
        channel: The channel the failed request named, if any.
    """
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if channel is not None:
        frame["channel"] = channel
    return _dumps(frame)


def encode_presence(channel: str, event: Literal["join", "leave"], user_id: str) -> bytes:
    """Encode a ``presence`` frame: ``user_id`` joined or left ``channel``."""
    return _dumps({"type": "presence", "channel": channel, "event": event, "user_id": user_id})


class ConnectionProtocol:
    """One connection's protocol state: client frames in, actions out.

    The connection starts subscribed to its automatic channels (``user:{user_id}`` and
    ``tenant:{tenant_id}``, when known); the gateway attaches them when the connection opens. Every
    client frame spends a token of a bucket holding ``burst`` tokens and refilled at ``rate`` per
    second; a frame that finds the bucket empty is dropped with a ``rate_limited`` error, and the
    ``abuse_limit``-th such frame before the bucket is full again closes the connection (1008).

    Args:
        user_id: The authenticated user, or ``None`` for an anonymous connection.
        tenant_id: The user's tenant, or ``None``.
        max_subscriptions: Channels a client may subscribe to (and ask for) at once, not counting
            the automatic ones.
        max_message_size: Largest client frame, in UTF-8 bytes; a larger one closes with 1009.
        rate: Frames per second a client may send in the long run.
        burst: Frames a client may send at once.
        abuse_limit: Rate-limited frames tolerated before closing with 1008.

    Raises:
        ProtocolError: An id cannot be part of a channel name (empty, has ``:``...), or a limit is
            out of range.
    """

    def __init__(
        self,
        user_id: str | None,
        tenant_id: str | None,
        *,
        max_subscriptions: int = 100,
        max_message_size: int = 65_536,
        rate: float = 10.0,
        burst: int = 50,
        abuse_limit: int = 10,
        app_types: Collection[str] = (),
    ) -> None:
        limits = {
            "max_subscriptions": (max_subscriptions, 0),
            "max_message_size": (max_message_size, 1),
            "burst": (burst, 1),
            "abuse_limit": (abuse_limit, 1),
        }
        for name, (value, minimum) in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ProtocolError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
            raise ProtocolError(f"rate must be a positive finite number, got {rate!r}")
        automatic: list[str] = []
        try:
            if user_id is not None:
                automatic.append(user_channel(user_id))
            if tenant_id is not None:
                automatic.append(tenant_channel(tenant_id))
        except InvalidChannelError as exc:
            raise ProtocolError(f"identity cannot name its channels: {exc}") from exc
        self._user_id = user_id
        # Checked by membership on each frame: a live registry (types added later) works too.
        self._app_types = app_types
        self._tenant_id = tenant_id
        self._max_subscriptions = max_subscriptions
        self._max_message_size = max_message_size
        self._rate = float(rate)
        self._burst = float(burst)
        self._abuse_limit = abuse_limit
        self._automatic = tuple(automatic)
        self._subscribed: set[str] = set(automatic)
        # Subscribes waiting for the gateway's decision -> [still wanted, the request]. Not
        # wanted: the client unsubscribed meanwhile, so the decision is answered with nothing.
        self._pending: dict[str, tuple[bool, Subscribe]] = {}
        self._tokens = self._burst
        self._updated: float | None = None
        self._strikes = 0
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<ConnectionProtocol user={self._user_id!r} tenant={self._tenant_id!r} "
            f"channels={len(self._subscribed)} pending={len(self._pending)}"
            f"{' closed' if self._closed else ''}>"
        )

    @property
    def automatic_channels(self) -> tuple[str, ...]:
        """The channels the connection is subscribed to from the start and cannot leave."""
        return self._automatic

    @property
    def subscriptions(self) -> frozenset[str]:
        """Every channel the connection is subscribed to, the automatic ones included."""
        return frozenset(self._subscribed)

    @property
    def pending(self) -> frozenset[str]:
        """Channels whose subscribe waits for ``confirm_subscribe`` or ``refuse_subscribe``."""
        return frozenset(self._pending)

    @property
    def closed(self) -> bool:
        """Whether a :class:`Close` action was returned; later frames are ignored."""
        return self._closed

    # -- client frames ---------------------------------------------------------------------

    def receive_text(self, text: str, now: float) -> list[Action]:
        """Handle a text frame from the client.

        Args:
            text: The frame's payload.
            now: Current time in seconds on a monotonic clock (drives the rate limit).

        Returns:
            The actions to carry out, in order; empty once the protocol is closed.

        Raises:
            ProtocolError: ``now`` is not a finite number.
        """
        if self._closed:
            return []
        size = len(text)
        if size <= self._max_message_size < 4 * size:
            # A character is 1 to 4 UTF-8 bytes: encode only when the bound cannot decide.
            size = len(text.encode("utf-8", "surrogatepass"))
        if size > self._max_message_size:
            return self._close(CloseCode.MESSAGE_TOO_BIG, "message too big")
        refused = self._spend_token(now)
        if refused is not None:
            return refused
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return [Send(encode_error(INVALID_JSON, f"invalid JSON: {exc}"))]
        return self._dispatch(frame)

    def receive_bytes(self, data: bytes, now: float) -> list[Action]:
        """Handle a binary frame from the client: always an error, the protocol is text frames.

        Args:
            data: The frame's payload.
            now: Current time in seconds on a monotonic clock (drives the rate limit).

        Returns:
            The actions to carry out; empty once the protocol is closed.

        Raises:
            ProtocolError: ``now`` is not a finite number.
        """
        if self._closed:
            return []
        if len(data) > self._max_message_size:
            return self._close(CloseCode.MESSAGE_TOO_BIG, "message too big")
        refused = self._spend_token(now)
        if refused is not None:
            return refused
        return [Send(encode_error(BINARY_NOT_SUPPORTED, "send JSON text frames, not binary"))]

    # -- decisions on subscribes -----------------------------------------------------------

    def confirm_subscribe(self, channel: str, *, recovered: bool | None = None) -> list[Action]:
        """Accept a subscribe the protocol asked for with a :class:`Subscribe` action.

        Args:
            channel: The channel of the :class:`Subscribe` action.
            recovered: For a subscribe with ``since``: whether every missed message will be
                replayed.

        Returns:
            ``[Attach, Send(subscribed)]``; empty when the client unsubscribed meanwhile or the
            protocol closed.

        Raises:
            ProtocolError: No subscribe for ``channel`` is waiting for a decision.
        """
        if self._closed:
            return []
        wanted, request = self._take_pending(channel)
        if not wanted:
            return []
        self._subscribed.add(channel)
        return [
            Attach(channel, presence=request.presence, since=request.since),
            Send(encode_subscribed(channel, recovered=recovered)),
        ]

    def refuse_subscribe(
        self, channel: str, code: str = FORBIDDEN, message: str = "subscribe refused"
    ) -> list[Action]:
        """Refuse a subscribe the protocol asked for with a :class:`Subscribe` action.

        Args:
            channel: The channel of the :class:`Subscribe` action.
            code: The error code sent to the client (:data:`FORBIDDEN` for the authorizer,
                :data:`INTERNAL_ERROR` when it failed).
            message: Human-readable detail for the client.

        Returns:
            ``[Send(error)]``; empty when the client unsubscribed meanwhile or the protocol closed.

        Raises:
            ProtocolError: No subscribe for ``channel`` is waiting for a decision.
        """
        if self._closed:
            return []
        wanted, _ = self._take_pending(channel)
        if not wanted:
            return []
        return [Send(encode_error(code, message, channel=channel))]

    def _take_pending(self, channel: str) -> tuple[bool, Subscribe]:
        try:
            return self._pending.pop(channel)
        except KeyError:
            raise ProtocolError(
                f"no subscribe to {_preview(channel)} is waiting for a decision"
            ) from None

    # -- internals -------------------------------------------------------------------------

    def _close(self, code: int, reason: str) -> list[Action]:
        self._closed = True
        self._pending.clear()
        return [Close(code, reason)]

    def _spend_token(self, now: float) -> list[Action] | None:
        """Take a token for one frame; return the refusal when there is none."""
        if not math.isfinite(now):
            raise ProtocolError(f"now must be a finite number of seconds, got {now!r}")
        if self._updated is None or now > self._updated:
            # A clock going backwards refills nothing rather than draining the bucket.
            if self._updated is not None:
                self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
            self._updated = now
        if self._tokens >= self._burst:
            self._strikes = 0  # quiet long enough to refill: forgive earlier excesses
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        self._strikes += 1
        if self._strikes >= self._abuse_limit:
            return self._close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        return [Send(encode_error(RATE_LIMITED, "too many frames; this one was dropped"))]

    def _dispatch(self, frame: Any) -> list[Action]:
        if self._app_types and isinstance(frame, dict):
            kind = frame.get("type")
            if isinstance(kind, str) and kind in self._app_types and kind not in CLIENT_FRAME_TYPES:
                return [Dispatch(kind, frame)]
        request = _parse_request(frame)
        if isinstance(request, list):
            return request
        kind, channel = request
        if kind == "ping":
            return [Send(_PONG)]
        if kind == "subscribe":
            return self._subscribe(channel, frame)
        if kind == "unsubscribe":
            return self._unsubscribe(channel)
        return self._publish(channel, frame)

    def _builtin_rule(self, channel: str) -> bool | None:
        """Apply the namespace rules: ``None`` outside them, else whether the channel is allowed."""
        namespace, _, rest = channel.partition(":")
        if namespace == _USER:
            owner = self._user_id
        elif namespace == _TENANT:
            owner = self._tenant_id
        else:
            return None
        return owner is not None and rest.partition(":")[0] == owner

    def _subscribe(self, channel: str, frame: dict[str, Any]) -> list[Action]:
        options = _parse_subscribe_options(frame)
        if isinstance(options, str):
            return _error(INVALID_FRAME, options, channel=channel)
        presence, since = options
        if channel in self._subscribed:
            return [Send(encode_subscribed(channel))]  # idempotent
        if channel in self._pending:
            # The decision under way answers this request too; the first request's options stand.
            self._pending[channel] = (True, self._pending[channel][1])
            return []
        rule = self._builtin_rule(channel)
        if rule is False:
            return _error(FORBIDDEN, "channel belongs to another user or tenant", channel=channel)
        chosen = len(self._subscribed) - len(self._automatic) + len(self._pending)
        if chosen >= self._max_subscriptions:
            return _error(
                TOO_MANY_SUBSCRIPTIONS,
                f"at most {self._max_subscriptions} subscriptions per connection",
                channel=channel,
            )
        request = Subscribe(channel, presence=presence, since=since, builtin=rule is True)
        self._pending[channel] = (True, request)
        return [request]

    def _unsubscribe(self, channel: str) -> list[Action]:
        if channel in self._automatic:
            return _error(FORBIDDEN, "automatic channels cannot be left", channel=channel)
        if channel in self._subscribed:
            self._subscribed.discard(channel)
            return [Detach(channel), Send(encode_unsubscribed(channel))]
        pending = self._pending.get(channel)
        if pending is not None and pending[0]:
            self._pending[channel] = (False, pending[1])
            return [Send(encode_unsubscribed(channel))]
        return _error(NOT_SUBSCRIBED, "not subscribed to this channel", channel=channel)

    def _publish(self, channel: str, frame: dict[str, Any]) -> list[Action]:
        if "data" not in frame:
            return _error(INVALID_FRAME, "missing field 'data'", channel=channel)
        if channel.partition(":")[0] in (_USER, _TENANT):
            return _error(FORBIDDEN, "user and tenant channels are server-only", channel=channel)
        return [Publish(channel, frame["data"])]


def _error(code: str, message: str, *, channel: str | None = None) -> list[Action]:
    return [Send(encode_error(code, message, channel=channel))]


def _parse_request(frame: Any) -> tuple[str, str] | list[Action]:
    """Check a decoded frame's ``type`` and ``channel``; a list is the error to answer with."""
    if not isinstance(frame, dict):
        return _error(INVALID_FRAME, "a frame must be a JSON object")
    kind = frame.get("type")
    if not isinstance(kind, str):
        problem = "missing field 'type'" if kind is None else "field 'type' must be a string"
        return _error(INVALID_FRAME, problem)
    if kind not in CLIENT_FRAME_TYPES:
        return _error(UNKNOWN_TYPE, f"unknown frame type {_preview(kind)}")
    if kind == "ping":
        return kind, ""
    channel = _parse_channel(frame)
    return channel if isinstance(channel, list) else (kind, channel)


def _parse_channel(frame: dict[str, Any]) -> str | list[Action]:
    """Check a frame's ``channel``; a list is the error to answer with."""
    if "channel" not in frame:
        return _error(INVALID_FRAME, "missing field 'channel'")
    channel = frame["channel"]
    problem = _channel_problem(channel)
    if problem is None:
        return str(channel)
    # Echo the name when it is a string of sane length, so the client can match the error.
    echo = channel if isinstance(channel, str) and len(channel) <= _ECHO_LIMIT else None
    return _error(INVALID_CHANNEL, problem, channel=echo)


def _parse_subscribe_options(frame: dict[str, Any]) -> tuple[bool, StreamPosition | None] | str:
    """Parse a subscribe's ``presence`` and ``since``; a string is the problem with them."""
    presence = frame.get("presence")
    if presence is None:
        presence = False
    elif not isinstance(presence, bool):
        return "field 'presence' must be a boolean"
    value = frame.get("since")
    if value is None:
        return presence, None
    problem = 'field \'since\' must be {"offset": integer >= 0, "epoch": non-empty string}'
    if not isinstance(value, dict):
        return problem
    offset, epoch = value.get("offset"), value.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= _MAX_OFFSET:
        return problem
    if not isinstance(epoch, str) or not 0 < len(epoch) <= _MAX_EPOCH_LENGTH:
        return problem
    return presence, StreamPosition(offset, epoch)
