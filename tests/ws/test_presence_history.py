"""Presence and history on one process (memory backend), and trace context across the Redis hop."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from _support.waiting import eventually
from dotmac.communications.errors import ConfigurationError, InvalidChannelError
from dotmac.communications.observability import tracing, use_tracer_provider
from dotmac.communications.websockets import MemoryBackend, WebSocketGateway
from dotmac.communications.websockets._protocol import StreamPosition

from .test_gateway import client, recv_json, send_json, start, token, ws_settings

__all__ = ["client", "start"]  # fixtures used here


async def _allow(*_: Any) -> bool:
    return True


async def subscribe(ws: Any, channel: str, **options: Any) -> dict[str, Any]:
    await send_json(ws, {"type": "subscribe", "channel": channel, **options})
    return await recv_json(ws)


# ----------------------------------------------------------------------------------- presence
async def test_presence_lists_users_with_their_connection_count(start, client) -> None:
    gateway = await start(authorizer=_allow)
    watcher = await client(gateway, token("w"))
    assert await subscribe(watcher, "room", presence=True) == {
        "type": "subscribed", "channel": "room",
    }  # fmt: skip
    assert await recv_json(watcher) == {
        "type": "presence", "channel": "room", "event": "join", "user_id": "w",
    }  # fmt: skip
    ann = [await client(gateway, token("ann")) for _ in range(2)]
    for ws in ann:
        await subscribe(ws, "room")
    assert (await recv_json(watcher))["user_id"] == "ann"  # one join for two connections
    assert await gateway.presence("room") == {"w": 1, "ann": 2}
    assert await gateway.presence("user:ann") == {"ann": 2}  # automatic channels too

    await ann[0].close()
    await eventually(lambda: _is(gateway, "room", {"w": 1, "ann": 1}), what="one left")
    await send_json(ann[1], {"type": "unsubscribe", "channel": "room"})
    assert await recv_json(watcher) == {
        "type": "presence", "channel": "room", "event": "leave", "user_id": "ann",
    }  # fmt: skip
    assert await gateway.presence("room") == {"w": 1}


async def _is(gateway: WebSocketGateway, channel: str, expected: dict[str, int]) -> bool:
    return await gateway.presence(channel) == expected


async def test_presence_frames_only_for_subscribers_who_asked(start, client) -> None:
    gateway = await start(authorizer=_allow)
    plain = await client(gateway, token("p"))
    await subscribe(plain, "room")
    other = await client(gateway, token("o"))
    await subscribe(other, "room")
    await gateway.publish("room", "hello")
    assert (await recv_json(plain))["type"] == "message"  # no presence frame before it


async def test_presence_bad_input_and_switched_off(start) -> None:
    gateway = await start()
    with pytest.raises(InvalidChannelError):
        await gateway.presence("bad channel")
    off = await start(ws_settings(presence=False))
    with pytest.raises(ConfigurationError, match="presence"):
        await off.presence("room")


# ------------------------------------------------------------------------------------ history
async def test_memory_history_recovers_missed_messages(start, client) -> None:
    gateway = await start(ws_settings(history_channels=["hist:*"], history_size=5))
    first = await client(gateway, token("u1"))
    await subscribe(first, "hist:a")
    for n in range(3):
        await gateway.publish("hist:a", n)
    frames = [await recv_json(first) for _ in range(3)]
    assert [f["offset"] for f in frames] == [1, 2, 3]
    epoch = frames[0]["epoch"]
    assert {f["epoch"] for f in frames} == {epoch}
    await first.close()
    for n in range(3, 5):
        await gateway.publish("hist:a", n)

    again = await client(gateway, token("u1"))
    since = {"offset": 3, "epoch": epoch}
    assert await subscribe(again, "hist:a", since=since) == {
        "type": "subscribed", "channel": "hist:a", "recovered": True,
    }  # fmt: skip
    assert [(await recv_json(again))["data"] for _ in range(2)] == [3, 4]
    await gateway.publish("hist:a", 5)
    assert (await recv_json(again))["offset"] == 6
    await subscribe(again, "plain")
    await gateway.publish("plain", 1)
    assert "offset" not in await recv_json(again)  # other channels keep no history


async def test_memory_history_expires_into_a_new_epoch(clock: Any) -> None:
    backend = MemoryBackend(clock=clock)
    frame = b'{"type":"message","channel":"h","data":1,"id":"x"}'
    first = await backend.publish_history("h", frame, size=10, ttl=60)
    assert first.endswith(b',"offset":1,"epoch":"' + first[-18:-2] + b'"}')
    epoch = first[-18:-2].decode()
    replay = await backend.read_history("h", StreamPosition(0, epoch))
    assert (replay.recovered, replay.frames, replay.offset) == (True, [first], 1)
    await clock.sleep(61)
    assert not (await backend.read_history("h", StreamPosition(1, epoch))).recovered
    again = await backend.publish_history("h", frame, size=10, ttl=60)
    assert b'"offset":1' in again
    assert epoch.encode() not in again


# ------------------------------------------------------------------------- trace across Redis
@pytest.mark.redis
async def test_trace_context_crosses_the_redis_hop(redis_url: str, start, client) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_tracer_provider(provider)
    try:
        settings = ws_settings(
            backend="redis", redis_url=redis_url, channel_prefix=f"t{uuid.uuid4().hex[:8]}"
        )
        sender = await start(settings, backend=_redis(settings))
        receiver = await start(settings, backend=_redis(settings))
        ws = await client(receiver, token("u1"))
        await subscribe(ws, "room")
        with tracing.span("request") as parent:
            await sender.publish("room", "traced")
        assert (await recv_json(ws))["data"] == "traced"
        await eventually(
            lambda: any(s.name == "websocket.deliver" for s in exporter.get_finished_spans()),
            what="deliver span",
        )
        deliver = next(s for s in exporter.get_finished_spans() if s.name == "websocket.deliver")
        assert deliver.context.trace_id == parent.get_span_context().trace_id
    finally:
        use_tracer_provider(None)


def _redis(settings: Any) -> Any:
    from dotmac.communications.websockets.backends.redis import RedisBackend

    return RedisBackend.from_config(settings)


async def test_internal_presence_channels_cannot_be_subscribed_directly(start, client) -> None:
    """The hub's presence channels start with NUL, which no client channel name may contain."""
    gateway = await start(authorizer=_allow)
    ws = await client(gateway, token("u1"))
    await send_json(ws, {"type": "subscribe", "channel": "\x00presence:room"})
    reply = await recv_json(ws)
    assert (reply["type"], reply["code"]) == ("error", "invalid_channel")
    await gateway.publish("room", "x")  # subscribed to nothing: nothing arrives
    with pytest.raises(TimeoutError):
        await recv_json(ws, 0.2)


async def test_memory_history_forgets_expired_channels(clock: Any) -> None:
    backend = MemoryBackend(clock=clock)
    frame = b'{"type":"message","channel":"h","data":1,"id":"x"}'
    for n in range(1500):
        await backend.publish_history(f"h{n}", frame, size=1, ttl=10)
        await clock.sleep(0.1)
    assert len(backend._history) < 1200  # the first ones expired and were pruned
