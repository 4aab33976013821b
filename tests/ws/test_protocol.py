"""The sans-I/O wire protocol: every frame type, error code, built-in rule and the rate limit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dotmac.communications.errors import (
    InvalidChannelError,
    MessageSerializationError,
    ProtocolError,
    WebSocketError,
)
from dotmac.communications.websockets._protocol import (
    BINARY_NOT_SUPPORTED,
    CLIENT_FRAME_TYPES,
    ERROR_CODES,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_CHANNEL,
    INVALID_FRAME,
    INVALID_JSON,
    NOT_SUBSCRIBED,
    RATE_LIMITED,
    SERVER_FRAME_TYPES,
    TOO_MANY_SUBSCRIPTIONS,
    UNKNOWN_TYPE,
    Action,
    Attach,
    Close,
    ConnectionProtocol,
    Detach,
    Publish,
    Send,
    StreamPosition,
    Subscribe,
    encode_error,
    encode_message,
    encode_pong,
    encode_presence,
    encode_subscribed,
    encode_unsubscribed,
    tenant_channel,
    user_channel,
    validate_channel,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _proto(**kwargs: Any) -> ConnectionProtocol:
    return ConnectionProtocol("u1", "t1", **kwargs)


def _send(p: ConnectionProtocol, frame: Any, now: float = 0.0) -> list[Action]:
    return p.receive_text(orjson.dumps(frame).decode(), now)


def _frame(action: Action) -> dict[str, Any]:
    assert isinstance(action, Send)
    decoded = orjson.loads(action.frame)
    assert isinstance(decoded, dict)
    return decoded


def _only_frame(actions: list[Action]) -> dict[str, Any]:
    assert len(actions) == 1, actions
    return _frame(actions[0])


def _error_code(actions: list[Action]) -> str:
    frame = _only_frame(actions)
    assert frame["type"] == "error"
    assert isinstance(frame["message"], str)
    assert frame["message"]
    return str(frame["code"])


def _subscribed(p: ConnectionProtocol, channel: str) -> None:
    actions = _send(p, {"type": "subscribe", "channel": channel})
    assert isinstance(actions[0], Subscribe)
    p.confirm_subscribe(channel)


# -- frame types -------------------------------------------------------------------------------


def test_ping_gets_pong() -> None:
    """An application-level ping is answered with a pong frame."""
    assert _only_frame(_send(_proto(), {"type": "ping"})) == {"type": "pong"}
    assert encode_pong() == b'{"type":"pong"}'


def test_subscribe_asks_for_a_decision_then_confirm_attaches() -> None:
    """subscribe -> Subscribe action; confirm_subscribe -> Attach + a subscribed frame."""
    p = _proto()
    actions = _send(p, {"type": "subscribe", "channel": "news"})
    assert actions == [Subscribe("news", presence=False, since=None, builtin=False)]
    assert p.pending == {"news"}
    assert "news" not in p.subscriptions

    actions = p.confirm_subscribe("news")
    assert actions[0] == Attach("news")
    assert _frame(actions[1]) == {"type": "subscribed", "channel": "news"}
    assert len(actions) == 2
    assert "news" in p.subscriptions
    assert p.pending == frozenset()


def test_confirm_with_recovered_sets_the_flag() -> None:
    """confirm_subscribe(recovered=...) adds "recovered" to the subscribed frame."""
    p = _proto()
    since = {"offset": 7, "epoch": "e1"}
    [request] = _send(p, {"type": "subscribe", "channel": "news", "since": since})
    assert isinstance(request, Subscribe)
    assert request.since == StreamPosition(7, "e1")
    attach, send = p.confirm_subscribe("news", recovered=False)
    assert attach == Attach("news", since=StreamPosition(7, "e1"))
    assert _frame(send) == {"type": "subscribed", "channel": "news", "recovered": False}


def test_refuse_sends_an_error_with_the_channel() -> None:
    """refuse_subscribe answers with an error frame naming the channel and forgets the request."""
    p = _proto()
    _send(p, {"type": "subscribe", "channel": "news"})
    frame = _only_frame(p.refuse_subscribe("news"))
    assert frame["code"] == FORBIDDEN
    assert frame["channel"] == "news"
    assert p.pending == frozenset()
    assert "news" not in p.subscriptions

    _send(p, {"type": "subscribe", "channel": "news"})
    frame = _only_frame(p.refuse_subscribe("news", INTERNAL_ERROR, "authorizer failed"))
    assert frame == {
        "type": "error",
        "code": INTERNAL_ERROR,
        "message": "authorizer failed",
        "channel": "news",
    }


def test_subscribe_twice_is_idempotent() -> None:
    """Subscribing to a channel already subscribed answers subscribed without a new decision."""
    p = _proto()
    _subscribed(p, "news")
    assert _only_frame(_send(p, {"type": "subscribe", "channel": "news"})) == {
        "type": "subscribed",
        "channel": "news",
    }


def test_subscribe_while_pending_waits_for_the_same_decision() -> None:
    """A repeated subscribe during the decision asks nothing new; the one decision answers it."""
    p = _proto()
    first = _send(p, {"type": "subscribe", "channel": "news", "presence": True})
    assert _send(p, {"type": "subscribe", "channel": "news"}) == []
    assert first == [Subscribe("news", presence=True)]
    assert p.confirm_subscribe("news")[0] == Attach("news", presence=True)


def test_unsubscribe_detaches() -> None:
    """unsubscribe -> Detach + an unsubscribed frame, and the channel is gone."""
    p = _proto()
    _subscribed(p, "news")
    detach, send = _send(p, {"type": "unsubscribe", "channel": "news"})
    assert detach == Detach("news")
    assert _frame(send) == {"type": "unsubscribed", "channel": "news"}
    assert "news" not in p.subscriptions


def test_unsubscribe_during_the_decision_withdraws_the_request() -> None:
    """Unsubscribing while pending answers unsubscribed; the later decision yields nothing."""
    p = _proto()
    _send(p, {"type": "subscribe", "channel": "a"})
    _send(p, {"type": "subscribe", "channel": "b"})
    assert _only_frame(_send(p, {"type": "unsubscribe", "channel": "a"}))["type"] == "unsubscribed"
    assert _only_frame(_send(p, {"type": "unsubscribe", "channel": "b"}))["type"] == "unsubscribed"
    # Withdrawn twice is not subscribed at all.
    assert _error_code(_send(p, {"type": "unsubscribe", "channel": "a"})) == NOT_SUBSCRIBED
    assert p.confirm_subscribe("a") == []
    assert p.refuse_subscribe("b") == []
    assert p.subscriptions == {"user:u1", "tenant:t1"}
    assert p.pending == frozenset()


def test_subscribe_again_after_withdrawing_revives_the_request() -> None:
    """subscribe, unsubscribe, subscribe during one decision: the confirmation attaches."""
    p = _proto()
    _send(p, {"type": "subscribe", "channel": "news"})
    _send(p, {"type": "unsubscribe", "channel": "news"})
    assert _send(p, {"type": "subscribe", "channel": "news"}) == []
    assert p.confirm_subscribe("news")[0] == Attach("news")


def test_publish_asks_the_gateway() -> None:
    """publish -> Publish(channel, data); any JSON data, null included."""
    p = _proto()
    assert _send(p, {"type": "publish", "channel": "chat:1", "data": {"text": "hi"}}) == [
        Publish("chat:1", {"text": "hi"})
    ]
    assert _send(p, {"type": "publish", "channel": "chat:1", "data": None}) == [
        Publish("chat:1", None)
    ]


def test_unknown_fields_are_ignored() -> None:
    """Extra fields are allowed, so newer clients work with older servers."""
    assert _send(_proto(), {"type": "ping", "channel": 5, "extra": [1]}) == [Send(encode_pong())]


# -- error codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["not json", "{", '{"type": "ping",}', "", "\ud800", "NaN"])
def test_malformed_json_is_answered_and_keeps_the_connection(text: str) -> None:
    """Text that is not JSON gets invalid_json; the connection stays open."""
    p = _proto()
    assert _error_code(p.receive_text(text, 0.0)) == INVALID_JSON
    assert not p.closed
    assert _send(p, {"type": "ping"}) == [Send(encode_pong())]


@pytest.mark.parametrize(
    "frame",
    [
        [],
        1,
        "ping",
        None,
        {},
        {"type": None},
        {"type": 1},
        {"type": ["ping"]},
        {"type": "subscribe"},
        {"type": "unsubscribe"},
        {"type": "publish", "channel": "news"},
        {"type": "subscribe", "channel": "news", "presence": "yes"},
        {"type": "subscribe", "channel": "news", "presence": 1},
        {"type": "subscribe", "channel": "news", "since": 5},
        {"type": "subscribe", "channel": "news", "since": {}},
        {"type": "subscribe", "channel": "news", "since": {"offset": -1, "epoch": "e"}},
        {"type": "subscribe", "channel": "news", "since": {"offset": True, "epoch": "e"}},
        {"type": "subscribe", "channel": "news", "since": {"offset": 1.0, "epoch": "e"}},
        {"type": "subscribe", "channel": "news", "since": {"offset": 1, "epoch": ""}},
        {"type": "subscribe", "channel": "news", "since": {"offset": 1, "epoch": 3}},
        {"type": "subscribe", "channel": "news", "since": {"offset": 1, "epoch": "e" * 201}},
    ],
)
def test_malformed_frames_get_invalid_frame(frame: Any) -> None:
    """Not an object, a missing field or a wrongly typed field: invalid_frame, connection kept."""
    p = _proto()
    assert _error_code(_send(p, frame)) == INVALID_FRAME
    assert not p.closed
    assert p.pending == frozenset()


def test_offset_beyond_64_bits_is_invalid() -> None:
    """An offset too large for 64 bits (decoded as a float) is invalid_frame."""
    text = '{"type":"subscribe","channel":"n","since":{"offset":18446744073709551616,"epoch":"e"}}'
    assert _error_code(_proto().receive_text(text, 0.0)) == INVALID_FRAME


def test_optional_fields_may_be_null() -> None:
    """presence and since set to null mean absent."""
    actions = _send(
        _proto(), {"type": "subscribe", "channel": "n", "presence": None, "since": None}
    )
    assert actions == [Subscribe("n")]


def test_largest_offset_is_accepted() -> None:
    """since.offset may be any unsigned 64-bit integer."""
    since = {"offset": 2**64 - 1, "epoch": "e"}
    [request] = _send(_proto(), {"type": "subscribe", "channel": "n", "since": since})
    assert isinstance(request, Subscribe)
    assert request.since == StreamPosition(2**64 - 1, "e")


@pytest.mark.parametrize("kind", ["Subscribe", "message", "pong", "", "x" * 10_000])
def test_unknown_type(kind: str) -> None:
    """A type the server does not know gets unknown_type, quoted briefly."""
    p = _proto()
    frame = _only_frame(_send(p, {"type": kind, "channel": "news"}))
    assert frame["code"] == UNKNOWN_TYPE
    assert len(frame["message"]) < 100


@pytest.mark.parametrize(
    "channel",
    [
        "",
        " news",
        "news ",
        "a b",
        "a\tb",
        "a\nb",
        "a\x00b",
        "a\u200bb",
        "x" * 201,
        "a::b",
        ":a",
        "a:",
    ],
)
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "publish"])
def test_invalid_channel_names(kind: str, channel: str) -> None:
    """Malformed channel names get invalid_channel, echoing the name back."""
    frame = _only_frame(_send(_proto(), {"type": kind, "channel": channel, "data": 1}))
    assert frame["code"] == INVALID_CHANNEL
    assert frame["channel"] == channel


@pytest.mark.parametrize("channel", [None, 5, ["news"], {"a": 1}, True, "x" * 1001])
def test_invalid_channel_values_are_not_echoed(channel: Any) -> None:
    """A channel that is not a string (or is huge) gets invalid_channel without an echo."""
    frame = _only_frame(_send(_proto(), {"type": "subscribe", "channel": channel}))
    assert frame["code"] == INVALID_CHANNEL
    assert "channel" not in frame


def test_binary_frames_are_not_supported() -> None:
    """A binary frame gets binary_not_supported; the connection stays open."""
    p = _proto()
    assert _error_code(p.receive_bytes(b'{"type":"ping"}', 0.0)) == BINARY_NOT_SUPPORTED
    assert not p.closed


def test_unsubscribe_from_a_channel_never_joined() -> None:
    """unsubscribe from a channel not subscribed gets not_subscribed."""
    frame = _only_frame(_send(_proto(), {"type": "unsubscribe", "channel": "news"}))
    assert frame["code"] == NOT_SUBSCRIBED
    assert frame["channel"] == "news"


def test_too_many_subscriptions_counts_pending_but_not_automatic() -> None:
    """The cap counts subscribed and pending channels; automatic ones are free."""
    p = _proto(max_subscriptions=2)
    _subscribed(p, "a")
    _send(p, {"type": "subscribe", "channel": "b"})
    frame = _only_frame(_send(p, {"type": "subscribe", "channel": "c"}))
    assert frame["code"] == TOO_MANY_SUBSCRIPTIONS
    assert frame["channel"] == "c"
    # Subscribing again to what it has is not refused.
    assert _only_frame(_send(p, {"type": "subscribe", "channel": "a"}))["type"] == "subscribed"
    assert _only_frame(_send(p, {"type": "subscribe", "channel": "user:u1"}))["type"] == (
        "subscribed"
    )
    p.refuse_subscribe("b")
    assert _send(p, {"type": "subscribe", "channel": "c"}) == [Subscribe("c")]


def test_zero_subscriptions_allows_only_the_automatic_channels() -> None:
    """max_subscriptions=0 leaves a connection with only its automatic channels."""
    p = _proto(max_subscriptions=0)
    assert _error_code(_send(p, {"type": "subscribe", "channel": "a"})) == TOO_MANY_SUBSCRIPTIONS


def test_every_error_code_is_a_constant_and_documented() -> None:
    """ERROR_CODES lists each code once with its meaning, and docs/protocol.md lists each code."""
    codes = {
        BINARY_NOT_SUPPORTED,
        FORBIDDEN,
        INTERNAL_ERROR,
        INVALID_CHANNEL,
        INVALID_FRAME,
        INVALID_JSON,
        NOT_SUBSCRIBED,
        RATE_LIMITED,
        TOO_MANY_SUBSCRIPTIONS,
        UNKNOWN_TYPE,
    }
    assert set(ERROR_CODES) == codes
    assert all(ERROR_CODES.values())
    docs = DOCS.read_text(encoding="utf-8")
    for code in codes:
        assert f"`{code}`" in docs, f"docs/protocol.md does not list error code {code}"
    for kind in CLIENT_FRAME_TYPES | SERVER_FRAME_TYPES:
        assert f'"type": "{kind}"' in docs, f"docs/protocol.md has no example of {kind}"
    for close_code in (1000, 1001, 1008, 1009, 1011, 1013):
        assert f"`{close_code}`" in docs


# -- size and rate limits ------------------------------------------------------------------------


def test_oversized_text_closes_1009() -> None:
    """A text frame over max_message_size UTF-8 bytes closes with 1009; later frames are ignored."""
    p = _proto(max_message_size=10)
    assert p.receive_text("x" * 10, 0.0) != [Close(1009, "message too big")]
    assert p.receive_text("é" * 5, 0.0) != [Close(1009, "message too big")]  # 10 bytes
    assert p.receive_text("é" * 5 + "x", 0.0) == [Close(1009, "message too big")]
    assert p.closed
    assert p.receive_text('{"type":"ping"}', 0.0) == []
    assert p.receive_bytes(b"", 0.0) == []


def test_oversized_text_is_measured_without_encoding_when_obvious() -> None:
    """Length alone decides for long ASCII and short text; surrogates are counted, not raised."""
    p = _proto(max_message_size=100)
    assert p.receive_text("x" * 101, 0.0) == [Close(1009, "message too big")]
    assert _error_code(_proto(max_message_size=100).receive_text("\ud800" * 30, 0.0)) == (
        INVALID_JSON
    )
    assert _proto(max_message_size=100).receive_text("\ud800" * 34, 0.0) == [
        Close(1009, "message too big")
    ]


def test_oversized_binary_closes_1009() -> None:
    """A binary frame over max_message_size closes with 1009."""
    p = _proto(max_message_size=4)
    assert p.receive_bytes(b"12345", 0.0) == [Close(1009, "message too big")]
    assert p.closed


def test_rate_limit_drops_frames_then_refills() -> None:
    """Past the burst, frames are dropped with rate_limited until tokens come back at `rate`."""
    p = _proto(rate=2.0, burst=3, abuse_limit=100)
    for _ in range(3):
        assert _send(p, {"type": "ping"}, now=10.0) == [Send(encode_pong())]
    assert _error_code(_send(p, {"type": "subscribe", "channel": "n"}, now=10.0)) == RATE_LIMITED
    assert p.pending == frozenset()  # the dropped frame did nothing
    assert _error_code(_send(p, {"type": "ping"}, now=10.4)) == RATE_LIMITED
    assert _send(p, {"type": "ping"}, now=10.5) == [Send(encode_pong())]
    assert _error_code(_send(p, {"type": "ping"}, now=10.5)) == RATE_LIMITED


def test_malformed_and_binary_frames_count_against_the_rate() -> None:
    """Every frame spends a token, whatever it contains."""
    p = _proto(rate=1.0, burst=2, abuse_limit=100)
    p.receive_text("junk", 0.0)
    p.receive_bytes(b"junk", 0.0)
    assert _error_code(_send(p, {"type": "ping"})) == RATE_LIMITED


def test_rate_abuse_closes_1008() -> None:
    """The abuse_limit-th dropped frame closes the connection with 1008."""
    p = _proto(rate=1.0, burst=1, abuse_limit=3)
    _send(p, {"type": "ping"})
    assert _error_code(_send(p, {"type": "ping"})) == RATE_LIMITED
    assert _error_code(p.receive_bytes(b"x", 0.0)) == RATE_LIMITED
    assert p.receive_text("x", 0.0) == [Close(1008, "rate limit exceeded")]
    assert p.closed
    assert _send(p, {"type": "ping"}, now=100.0) == []


def test_rate_strikes_are_forgiven_after_a_full_refill() -> None:
    """A client that goes quiet until its bucket is full again starts with no strikes."""
    p = _proto(rate=1.0, burst=2, abuse_limit=2)
    _send(p, {"type": "ping"})
    _send(p, {"type": "ping"})
    assert _error_code(_send(p, {"type": "ping"})) == RATE_LIMITED  # strike 1
    # 1 s later: one token, not full; the strike stands.
    assert _send(p, {"type": "ping"}, now=1.0) == [Send(encode_pong())]
    # 3 s after that: full again; spend the burst and get one more strike without closing.
    for _ in range(2):
        assert _send(p, {"type": "ping"}, now=4.0) == [Send(encode_pong())]
    assert _error_code(_send(p, {"type": "ping"}, now=4.0)) == RATE_LIMITED
    assert _send(p, {"type": "ping"}, now=4.0) == [Close(1008, "rate limit exceeded")]


def test_a_clock_going_backwards_refills_nothing() -> None:
    """A smaller `now` than before neither raises nor adds tokens."""
    p = _proto(rate=1.0, burst=1, abuse_limit=100)
    _send(p, {"type": "ping"}, now=5.0)
    assert _error_code(_send(p, {"type": "ping"}, now=1.0)) == RATE_LIMITED
    assert _error_code(_send(p, {"type": "ping"}, now=5.5)) == RATE_LIMITED
    assert _send(p, {"type": "ping"}, now=6.0) == [Send(encode_pong())]


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_non_finite_now_is_misuse(now: float) -> None:
    """`now` must be a finite clock reading."""
    with pytest.raises(ProtocolError, match="now"):
        _proto().receive_text('{"type":"ping"}', now)
    with pytest.raises(ProtocolError, match="now"):
        _proto().receive_bytes(b"", now)


# -- built-in channel rules ----------------------------------------------------------------------


def test_automatic_channels() -> None:
    """A connection starts in user:{id} and tenant:{id} and may not leave them."""
    p = _proto()
    assert p.automatic_channels == ("user:u1", "tenant:t1")
    assert p.subscriptions == {"user:u1", "tenant:t1"}
    for channel in p.automatic_channels:
        frame = _only_frame(_send(p, {"type": "unsubscribe", "channel": channel}))
        assert frame["code"] == FORBIDDEN
        assert frame["channel"] == channel
        assert _only_frame(_send(p, {"type": "subscribe", "channel": channel})) == {
            "type": "subscribed",
            "channel": channel,
        }
    assert ConnectionProtocol(None, None).automatic_channels == ()
    assert ConnectionProtocol("u1", None).automatic_channels == ("user:u1",)


@pytest.mark.parametrize(
    "channel",
    [
        "user:u2",
        "user:u10",
        "user:u",
        "user",
        "user:u2:inbox",
        "tenant:t2",
        "tenant:t2:x",
        "tenant",
    ],
)
def test_other_users_and_tenants_are_forbidden(channel: str) -> None:
    """user:X for another user and tenant:T(:…) outside the own tenant are refused by the protocol."""
    p = _proto()
    frame = _only_frame(_send(p, {"type": "subscribe", "channel": channel}))
    assert frame["code"] == FORBIDDEN
    assert frame["channel"] == channel
    assert p.pending == frozenset()


@pytest.mark.parametrize("channel", ["user:u1:inbox", "tenant:t1:alerts", "tenant:t1:a:b"])
def test_own_subchannels_are_granted_by_the_builtin_rules(channel: str) -> None:
    """Subchannels of the own user and tenant pass the built-in rules: builtin=True."""
    assert _send(_proto(), {"type": "subscribe", "channel": channel}) == [
        Subscribe(channel, builtin=True)
    ]


@pytest.mark.parametrize("channel", ["news", "users:u2", "tenants:t2", "chat:user:u2", "u:tenant"])
def test_other_channels_go_to_the_authorizer(channel: str) -> None:
    """Channels outside the user/tenant namespaces are left to the authorizer: builtin=False."""
    assert _send(_proto(), {"type": "subscribe", "channel": channel}) == [Subscribe(channel)]


@pytest.mark.parametrize("channel", ["user:u1", "user:x", "tenant:t1", "tenant:t1:x", "user"])
def test_anonymous_connections_have_no_user_or_tenant_channels(channel: str) -> None:
    """Without a user or tenant id, every user:/tenant: channel is forbidden."""
    p = ConnectionProtocol(None, None)
    assert _error_code(_send(p, {"type": "subscribe", "channel": channel})) == FORBIDDEN


@pytest.mark.parametrize("channel", ["user:u1", "user:u2", "tenant:t1", "tenant:t1:x", "user"])
def test_clients_cannot_publish_to_user_or_tenant_channels(channel: str) -> None:
    """user:* and tenant:* channels are server-only for publishing, the own ones too."""
    frame = _only_frame(_send(_proto(), {"type": "publish", "channel": channel, "data": 1}))
    assert frame["code"] == FORBIDDEN
    assert frame["channel"] == channel


# -- misuse, construction, helpers ---------------------------------------------------------------


def test_deciding_a_subscribe_never_requested_is_misuse() -> None:
    """confirm/refuse for a channel with no pending subscribe raise ProtocolError."""
    p = _proto()
    with pytest.raises(ProtocolError, match="news"):
        p.confirm_subscribe("news")
    with pytest.raises(ProtocolError, match="news"):
        p.refuse_subscribe("news")
    _send(p, {"type": "subscribe", "channel": "news"})
    p.confirm_subscribe("news")
    with pytest.raises(ProtocolError):
        p.confirm_subscribe("news")
    assert issubclass(ProtocolError, WebSocketError)


def test_decisions_after_close_are_ignored() -> None:
    """A decision arriving after the protocol closed yields nothing and does not raise."""
    p = _proto(max_message_size=50)
    _send(p, {"type": "subscribe", "channel": "a"})
    _send(p, {"type": "subscribe", "channel": "b"})
    assert p.receive_text("x" * 51, 0.0) == [Close(1009, "message too big")]
    assert p.confirm_subscribe("a") == []
    assert p.refuse_subscribe("b") == []
    assert p.confirm_subscribe("never") == []
    assert p.pending == frozenset()


@pytest.mark.parametrize(
    ("user_id", "tenant_id"), [("", None), ("a:b", None), ("a b", None), (None, "t:1"), (None, "")]
)
def test_ids_that_cannot_name_a_channel_are_misuse(
    user_id: str | None, tenant_id: str | None
) -> None:
    """An identity whose ids are empty, contain ':' or whitespace cannot build a protocol."""
    with pytest.raises(ProtocolError, match="identity"):
        ConnectionProtocol(user_id, tenant_id)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_subscriptions": -1},
        {"max_message_size": 0},
        {"burst": 0},
        {"abuse_limit": 0},
        {"rate": 0},
        {"rate": math.inf},
        {"rate": math.nan},
        {"burst": True},
        {"max_subscriptions": 1.5},
    ],
)
def test_limits_out_of_range_are_misuse(kwargs: dict[str, Any]) -> None:
    """Limits are checked at construction."""
    with pytest.raises(ProtocolError):
        _proto(**kwargs)


def test_repr_names_the_state() -> None:
    """repr shows the identity and how much state the connection holds."""
    p = _proto()
    _send(p, {"type": "subscribe", "channel": "news"})
    assert repr(p) == "<ConnectionProtocol user='u1' tenant='t1' channels=2 pending=1>"
    p.receive_bytes(b"x" * 70_000, 0.0)
    assert repr(p).endswith(" closed>")


@pytest.mark.parametrize("channel", ["a", "tenant:7:alerts", "x" * 200, "café:☕", "a-b_c.d/e*"])
def test_validate_channel_accepts(channel: str) -> None:
    """Printable names without whitespace, up to 200 characters, with ':' segments are valid."""
    assert validate_channel(channel) == channel


@pytest.mark.parametrize("channel", ["", "a b", "x" * 201, "a::b", "a\x7f", 3])
def test_validate_channel_rejects(channel: Any) -> None:
    """validate_channel raises InvalidChannelError, a ValueError."""
    with pytest.raises(InvalidChannelError, match="invalid channel"):
        validate_channel(channel)
    assert issubclass(InvalidChannelError, ValueError)


def test_user_and_tenant_channel_names() -> None:
    """user_channel/tenant_channel name the automatic channels and refuse unusable ids."""
    assert user_channel("42") == "user:42"
    assert tenant_channel("acme") == "tenant:acme"
    for bad in ("", "a:b", "a b"):
        with pytest.raises(InvalidChannelError):
            user_channel(bad)
        with pytest.raises(InvalidChannelError):
            tenant_channel(bad)


# -- encoders ------------------------------------------------------------------------------------


def test_encode_message() -> None:
    """message frames carry channel, data and id; offset and epoch only on history channels."""
    assert orjson.loads(encode_message("news", {"a": [1, 2]}, "m1")) == {
        "type": "message",
        "channel": "news",
        "data": {"a": [1, 2]},
        "id": "m1",
    }
    assert orjson.loads(encode_message("news", None, "m2", offset=0, epoch="e1")) == {
        "type": "message",
        "channel": "news",
        "data": None,
        "id": "m2",
        "offset": 0,
        "epoch": "e1",
    }


def test_encode_message_refuses_what_json_cannot_carry() -> None:
    """Data orjson cannot serialise raises MessageSerializationError (a ValueError)."""
    with pytest.raises(MessageSerializationError, match="message"):
        encode_message("news", {1: object()}, "m1")
    with pytest.raises(ValueError, match="message"):
        encode_message("news", 2**70, "m1")


def test_encode_other_frames() -> None:
    """subscribed, unsubscribed, error and presence frames have the documented shape."""
    assert orjson.loads(encode_subscribed("c")) == {"type": "subscribed", "channel": "c"}
    assert orjson.loads(encode_subscribed("c", recovered=True)) == {
        "type": "subscribed",
        "channel": "c",
        "recovered": True,
    }
    assert orjson.loads(encode_unsubscribed("c")) == {"type": "unsubscribed", "channel": "c"}
    assert orjson.loads(encode_error(FORBIDDEN, "no")) == {
        "type": "error",
        "code": FORBIDDEN,
        "message": "no",
    }
    assert orjson.loads(encode_presence("c", "join", "u1")) == {
        "type": "presence",
        "channel": "c",
        "event": "join",
        "user_id": "u1",
    }


# -- property: arbitrary input never raises and never leaks ---------------------------------------

_MAX_SUBS = 3
_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_NAMED_CHANNELS = ["news", "a", "b", "c", "d", "user", "user:u1", "user:u2", "user:u1:x"]
_NAMED_CHANNELS += ["tenant:t1", "tenant:t1:x", "tenant:t2:x", "a::b", "", "a b"]
_channels = st.sampled_from(_NAMED_CHANNELS) | st.text(max_size=20) | _json
_frame_dicts = st.fixed_dictionaries(
    {"type": st.sampled_from([*sorted(CLIENT_FRAME_TYPES), "message", "pong"]) | _json},
    optional={
        "channel": _channels,
        "data": _json,
        "presence": st.booleans() | _json,
        "since": st.fixed_dictionaries(
            {},
            optional={
                "offset": st.integers(min_value=-5, max_value=2**64 - 1) | _json,
                "epoch": st.text(max_size=5) | _json,
            },
        )
        | _json,
    },
)
_inputs = (
    _frame_dicts.map(lambda frame: orjson.dumps(frame).decode())
    | _json.map(lambda value: orjson.dumps(value).decode())
    | st.text(max_size=80)
    | st.binary(max_size=80)
)


def _check_well_formed(p: ConnectionProtocol, actions: list[Action]) -> None:
    for index, action in enumerate(actions):
        if isinstance(action, Send):
            frame = _frame(action)
            assert frame["type"] in SERVER_FRAME_TYPES
            if frame["type"] == "error":
                assert frame["code"] in ERROR_CODES
                assert isinstance(frame["message"], str)
        elif isinstance(action, Close):
            assert action.code in (1008, 1009)
            assert index == len(actions) - 1
            assert p.closed
        elif isinstance(action, Publish):
            validate_channel(action.channel)
            encode_message(action.channel, action.data, "id")  # client data always re-encodes
        else:
            assert isinstance(action, Subscribe | Attach | Detach)
            validate_channel(action.channel)


def _check_bounded(p: ConnectionProtocol) -> None:
    automatic = set(p.automatic_channels)
    assert automatic <= p.subscriptions
    assert len(p.subscriptions - automatic) + len(p.pending) <= _MAX_SUBS
    assert not p.pending & p.subscriptions


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            _inputs,
            st.floats(min_value=-1.0, max_value=3.0),
            st.sampled_from(["confirm", "refuse", "later"]),
        ),
        max_size=25,
    )
)
def test_arbitrary_frames_never_raise_and_never_leak(steps: list[tuple[Any, float, str]]) -> None:
    """Any sequence of frames and decisions yields well-formed actions and bounded state."""
    p = ConnectionProtocol(
        "u1",
        "t1",
        max_subscriptions=_MAX_SUBS,
        max_message_size=120,
        rate=2.0,
        burst=8,
        abuse_limit=4,
    )
    now = 0.0
    later: list[str] = []
    for payload, delta, decision in steps:
        now += delta
        was_closed = p.closed
        if isinstance(payload, bytes):
            actions = p.receive_bytes(payload, now)
        else:
            actions = p.receive_text(payload, now)
        if was_closed:
            assert actions == []
        _check_well_formed(p, actions)
        for action in actions:
            if not isinstance(action, Subscribe):
                continue
            if decision == "confirm":
                _check_well_formed(p, p.confirm_subscribe(action.channel))
            elif decision == "refuse":
                _check_well_formed(p, p.refuse_subscribe(action.channel))
            else:
                later.append(action.channel)
        _check_bounded(p)
    for channel in later:
        _check_well_formed(p, p.confirm_subscribe(channel))
        _check_bounded(p)
    assert p.pending == frozenset()


def test_application_types_are_dispatched_after_the_checks() -> None:
    """A registered application type yields Dispatch; built-in types stay built in."""
    from dotmac.communications.websockets._protocol import ConnectionProtocol, Dispatch

    registry: dict[str, object] = {}
    proto = ConnectionProtocol("u1", None, app_types=registry, burst=2, rate=1.0)
    frame = '{"type": "typing", "room": "r1"}'
    (unknown,) = proto.receive_text(frame, 0.0)
    assert b"unknown_type" in unknown.frame  # type: ignore[union-attr]
    registry["typing"] = object()  # registered later: the live registry counts
    registry["ping"] = object()  # a built-in type cannot be taken over
    assert proto.receive_text(frame, 10.0) == [Dispatch("typing", {"type": "typing", "room": "r1"})]
    (pong,) = proto.receive_text('{"type": "ping"}', 10.0)
    assert b"pong" in pong.frame  # type: ignore[union-attr]
    (limited,) = proto.receive_text(frame, 10.0)  # the rate limit applies to app frames too
    assert b"rate_limited" in limited.frame  # type: ignore[union-attr]
