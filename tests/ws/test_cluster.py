"""The gateway across processes on one real redis-server: fan-out, presence, history, limits.

Gateways run in separate OS processes (``_gateway_worker.py``, configured by environment like a
deployment) beside one in this test process; clients are real ``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from _support.waiting import eventually
from dotmac.communications.config import WebSocketsSettings
from dotmac.communications.observability import metrics
from dotmac.communications.websockets import WebSocketGateway
from dotmac.communications.websockets.backends.redis import RedisBackend

from .test_gateway import SECRET, closed_with, recv_json, send_json, token

pytestmark = pytest.mark.redis

WORKER = Path(__file__).with_name("_gateway_worker.py")
SRC = str(Path(__file__).resolve().parents[2] / "src")


async def _allow(*_: Any) -> bool:
    return True


class Cluster:
    """Gateway processes and in-process gateways sharing one Redis and one key prefix."""

    def __init__(self, redis_url: str, tmp_path: Path) -> None:
        self.redis_url = redis_url
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.tmp_path = tmp_path
        self.processes: list[asyncio.subprocess.Process] = []
        self.gateways: list[WebSocketGateway] = []
        self.clients: list[ClientConnection] = []

    def settings(self, **overrides: Any) -> WebSocketsSettings:
        values: dict[str, Any] = {
            "jwt_secret": SECRET,
            "port": 0,
            "backend": "redis",
            "redis_url": self.redis_url,
            "channel_prefix": self.prefix,
            "presence_ttl": 1.5,
            "history_channels": ["hist:*"],
            "drain_timeout": 1,
            "ping_timeout": 1,
        }
        values.update(overrides)
        return WebSocketsSettings(**values)

    async def spawn(self, **overrides: str) -> int:
        """Start a gateway process; return its port."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOTMAC_", "OTEL_"))}
        env.update(
            PYTHONPATH=SRC,
            DOTMAC_WEBSOCKETS__JWT_SECRET=SECRET,
            DOTMAC_WEBSOCKETS__BACKEND="redis",
            DOTMAC_WEBSOCKETS__REDIS_URL=self.redis_url,
            DOTMAC_WEBSOCKETS__CHANNEL_PREFIX=self.prefix,
            DOTMAC_WEBSOCKETS__PRESENCE_TTL="1.5",
            DOTMAC_WEBSOCKETS__HISTORY_CHANNELS='["hist:*"]',
            DOTMAC_WEBSOCKETS__DRAIN_TIMEOUT="1",
            DOTMAC_LOG_LEVEL="WARNING",
        )
        env.update({f"DOTMAC_WEBSOCKETS__{k.upper()}": v for k, v in overrides.items()})
        with (self.tmp_path / f"gateway-{len(self.processes)}.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(WORKER), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
            )  # fmt: skip
        self.processes.append(process)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.startswith(b"PORT "), (line, self.logs())
        return int(line.split()[1])

    async def local(self, **overrides: Any) -> WebSocketGateway:
        """Start a gateway in this process (its server API is the test's publisher)."""
        gateway = WebSocketGateway.from_config(self.settings(**overrides), authorizer=_allow)
        await gateway.start("127.0.0.1", 0)
        self.gateways.append(gateway)
        return gateway

    async def client(self, port: int | WebSocketGateway, user: str = "u1", tenant: str = "t1",
                     *channels: str, **subscribe: Any) -> ClientConnection:  # fmt: skip
        """Connect as ``user``; subscribe to ``channels`` (each confirmed)."""
        if isinstance(port, WebSocketGateway):
            port = port.port
        ws = await connect(f"ws://127.0.0.1:{port}/ws?token={token(user, tenant)}", close_timeout=1)
        self.clients.append(ws)
        for channel in channels:
            await send_json(ws, {"type": "subscribe", "channel": channel, **subscribe})
            reply = await recv_json(ws, 5)
            assert reply["type"] == "subscribed", reply
        return ws

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.tmp_path.glob("*.log"))

    async def close(self) -> None:
        for ws in self.clients:
            await ws.close()
        for gateway in self.gateways:
            await gateway.stop()
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
async def cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    group = Cluster(redis_url, tmp_path)
    yield group
    await group.close()


async def messages(ws: ClientConnection, count: int, timeout: float = 5.0) -> list[Any]:
    """The data of the next ``count`` ``message`` frames (other frames are skipped)."""
    got: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            frame = json.loads(await ws.recv())
            if frame["type"] == "message":
                got.append(frame)
    return got


async def nothing_more(ws: ClientConnection, wait: float = 0.3) -> None:
    try:
        async with asyncio.timeout(wait):
            frame = await ws.recv()
    except TimeoutError:
        return
    pytest.fail(f"unexpected frame {frame!r}")


# ------------------------------------------------------------------------------------ fan-out
async def test_publish_reaches_clients_on_every_process_exactly_once(cluster: Cluster) -> None:
    port_a = await cluster.spawn()
    port_b = await cluster.spawn()
    local = await cluster.local()
    on_a = await cluster.client(port_a, "ua", "t1", "news")
    on_b = await cluster.client(port_b, "ub", "t1", "news")
    here = await cluster.client(local, "uc", "t1", "news")
    publisher = await cluster.client(port_b, "up", "t1")  # publishes through process B

    assert await local.publish("news", {"n": 1}) == 1  # local deliveries only
    await send_json(publisher, {"type": "publish", "channel": "news", "data": {"n": 2}})

    for ws in (on_a, on_b, here):
        got = await messages(ws, 2)
        assert sorted(m["data"]["n"] for m in got) == [1, 2]
        await nothing_more(ws)  # nobody gets its own process's frame back from Redis


async def test_user_tenant_and_broadcast_cross_processes(cluster: Cluster) -> None:
    port_a = await cluster.spawn()
    local = await cluster.local()
    alice_a = await cluster.client(port_a, "alice", "acme")
    alice_here = await cluster.client(local, "alice", "acme")
    bob_a = await cluster.client(port_a, "bob", "acme")
    carol_a = await cluster.client(port_a, "carol", "other")
    await asyncio.sleep(0.2)  # the automatic channels are confirmed before the first frame

    assert await local.send_to_user("alice", {"k": "user"}) == 1
    assert await local.send_to_tenant("acme", {"k": "tenant"}) == 1
    await local.broadcast({"k": "all"})

    assert [m["data"]["k"] for m in await messages(alice_a, 3)] == ["user", "tenant", "all"]
    assert [m["data"]["k"] for m in await messages(alice_here, 3)] == ["user", "tenant", "all"]
    assert [m["data"]["k"] for m in await messages(bob_a, 2)] == ["tenant", "all"]
    assert [m["data"]["k"] for m in await messages(carol_a, 1)] == ["all"]
    for ws in (alice_a, bob_a, carol_a):
        await nothing_more(ws, 0.2)


async def test_a_process_subscribes_only_channels_it_has_clients_for(
    cluster: Cluster, aredis: Any
) -> None:
    local = await cluster.local()
    await cluster.client(local, "u1", "t1", "room:1")
    channels = {c.decode() for c in await aredis.pubsub_channels(f"{cluster.prefix}:*")}
    assert channels == {
        f"{cluster.prefix}:{{{name}}}" for name in ("broadcast", "user:u1", "tenant:t1", "room:1")
    }


# ----------------------------------------------------------------------------------- presence
async def test_presence_across_processes_and_after_sigkill(cluster: Cluster) -> None:
    port_a = await cluster.spawn()
    local = await cluster.local()
    watcher = await cluster.client(local, "watcher", "t1", "room", presence=True)
    await cluster.client(port_a, "ann", "t1", "room")
    await cluster.client(port_a, "ann", "t1", "room")
    await cluster.client(local, "ben", "t1", "room")

    joins = []
    async with asyncio.timeout(5):
        while len(joins) < 3:
            frame = await recv_json(watcher, 5)
            assert frame["type"] == "presence", frame
            assert frame["event"] == "join"
            joins.append(frame["user_id"])
    # The watcher's own join included; ann joined once although she has two connections.
    assert sorted(joins) == ["ann", "ben", "watcher"]
    await nothing_more(watcher)
    assert await local.presence("room") == {"watcher": 1, "ann": 2, "ben": 1}

    cluster.processes[0].kill()  # SIGKILL: no goodbye; presence_ttl (1.5 s) bounds the rest
    await cluster.processes[0].wait()
    frame = await recv_json(watcher, 8)
    assert frame == {"type": "presence", "channel": "room", "event": "leave", "user_id": "ann"}
    assert await local.presence("room") == {"watcher": 1, "ben": 1}


async def test_presence_leave_when_a_client_goes_on_another_process(cluster: Cluster) -> None:
    port_a = await cluster.spawn()
    local = await cluster.local()
    watcher = await cluster.client(local, "w", "t1", "room", presence=True)
    assert (await recv_json(watcher, 5))["user_id"] == "w"  # its own join
    ann = await cluster.client(port_a, "ann", "t1", "room")
    assert (await recv_json(watcher, 5))["event"] == "join"
    await ann.close()
    assert await recv_json(watcher, 5) == {
        "type": "presence", "channel": "room", "event": "leave", "user_id": "ann",
    }  # fmt: skip
    await eventually(lambda: _presence_is(local, "room", {"w": 1}), what="ann gone")


async def _presence_is(gateway: WebSocketGateway, channel: str, expected: dict[str, int]) -> bool:
    return await gateway.presence(channel) == expected


# ------------------------------------------------------------------------------------ history
async def test_recovery_on_a_different_process_has_no_gap_and_no_duplicate(
    cluster: Cluster,
) -> None:
    port_a = await cluster.spawn()
    port_b = await cluster.spawn()
    local = await cluster.local()
    first = await cluster.client(port_a, "u1", "t1", "hist:orders")
    for n in range(3):
        await local.publish("hist:orders", n)
    got = await messages(first, 3)
    assert [m["data"] for m in got] == [0, 1, 2]
    assert [m["offset"] for m in got] == [1, 2, 3]
    position = {"offset": got[1]["offset"], "epoch": got[1]["epoch"]}  # it missed the last one
    await first.close()

    for n in range(3, 6):  # published while the client is away
        await local.publish("hist:orders", n)

    again = await cluster.client(port_b, "u1", "t1")
    await send_json(again, {"type": "subscribe", "channel": "hist:orders", "since": position})
    publishing = asyncio.create_task(_publish_range(local, "hist:orders", 6, 30))
    confirm = await recv_json(again, 5)
    assert confirm == {"type": "subscribed", "channel": "hist:orders", "recovered": True}
    await publishing
    got = await messages(again, 28)
    assert [m["data"] for m in got] == list(range(2, 30))  # replay, then live: in order
    assert [m["offset"] for m in got] == list(range(3, 31))
    await nothing_more(again)


async def _publish_range(gateway: WebSocketGateway, channel: str, start: int, stop: int) -> None:
    for n in range(start, stop):
        await gateway.publish(channel, n)
        if n % 4 == 0:
            await asyncio.sleep(0)


async def test_recovery_false_when_trimmed_or_other_epoch(cluster: Cluster) -> None:
    local = await cluster.local(history_size=3)
    live = await cluster.client(local, "u2", "t1", "hist:x")
    for n in range(7):
        await local.publish("hist:x", n)
    epoch = (await messages(live, 7))[-1]["epoch"]
    ws = await cluster.client(local, "u1", "t1")

    async def resubscribe(channel: str, offset: int, epoch: str) -> dict[str, Any]:
        since = {"offset": offset, "epoch": epoch}
        await send_json(ws, {"type": "subscribe", "channel": channel, "since": since})
        reply = await recv_json(ws, 5)
        assert reply["type"] == "subscribed", reply
        return reply

    async def leave(channel: str) -> None:
        await send_json(ws, {"type": "unsubscribe", "channel": channel})
        assert (await recv_json(ws, 5))["type"] == "unsubscribed"

    assert (await resubscribe("hist:x", 1, epoch))["recovered"] is False  # 2..4 trimmed away
    await leave("hist:x")
    assert (await resubscribe("hist:x", 4, epoch))["recovered"] is True  # 5..7 still there
    assert [m["data"] for m in await messages(ws, 3)] == [4, 5, 6]
    await leave("hist:x")
    assert (await resubscribe("hist:x", 5, "other"))["recovered"] is False
    assert (await resubscribe("hist:y", 5, epoch))["recovered"] is False  # no history yet
    assert (await resubscribe("plain", 5, epoch))["recovered"] is False  # not a history channel
    await nothing_more(ws)


# ------------------------------------------------------------------------------ Redis restarts
async def test_delivery_resumes_after_redis_restarts(
    cluster: Cluster, redis_server_factory: Any
) -> None:
    server = redis_server_factory()
    server.start()
    cluster.redis_url = server.url
    port_a = await cluster.spawn()
    local = await cluster.local()
    reconnected: list[float] = []

    @local.on_backend_reconnect
    async def hook(downtime: float) -> None:
        reconnected.append(downtime)

    remote = await cluster.client(port_a, "u1", "t1", "room")
    here = await cluster.client(local, "u2", "t1", "room")
    await local.publish("room", "before")
    assert [m["data"] for m in await messages(remote, 1)] == ["before"]
    assert [m["data"] for m in await messages(here, 1)] == ["before"]

    server.stop()
    await eventually(lambda: not _backend(local).connected, what="link loss noticed")
    assert await _health(local) in {"warn", "fail"}
    await asyncio.sleep(0.3)
    server.start()
    await eventually(lambda: _backend(local).connected, 15, what="listener reconnected")
    assert await _health(local) == "pass"

    async def remote_gets_it() -> bool:  # the other process may reconnect a little later
        await local.publish("room", "after")
        try:
            async with asyncio.timeout(0.3):
                while True:
                    frame = json.loads(await remote.recv())
                    if frame["type"] == "message" and frame["data"] == "after":
                        return True
        except TimeoutError:
            return False

    await eventually(remote_gets_it, 15, what="delivery across processes resumed")

    async def here_gets_it() -> bool:  # and this process's listener resubscribed too
        await send_json(remote, {"type": "publish", "channel": "room", "data": "back"})
        try:
            async with asyncio.timeout(0.3):
                while True:
                    frame = json.loads(await here.recv())
                    if frame["type"] == "message" and frame["data"] == "back":
                        return True
        except TimeoutError:
            return False

    await eventually(here_gets_it, 15, what="remote publishes reach this process again")
    assert reconnected
    assert reconnected[0] > 0
    assert _backend(local).reconnects == 1
    assert metrics.snapshot()["dotmac.websockets.backend.reconnects"][0][1] == 1


def _backend(gateway: WebSocketGateway) -> RedisBackend:
    backend = gateway.backend
    assert isinstance(backend, RedisBackend)
    return backend


async def _health(gateway: WebSocketGateway) -> str:
    report = await gateway.health.check()
    return str(report.checks["gateway:backend"].status)


# ------------------------------------------------------------------------------------- limits
async def test_tenant_connection_limit_counts_every_process(cluster: Cluster) -> None:
    port_a = await cluster.spawn(max_connections_per_tenant="3")
    local = await cluster.local(max_connections_per_tenant=3)
    await cluster.client(port_a, "u1", "acme")
    await cluster.client(port_a, "u2", "acme")
    last = await cluster.client(local, "u3", "acme")
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{local.port}/ws?token={token('u4', 'acme')}")
    assert refused.value.response.status_code == 503
    with pytest.raises(InvalidStatus):
        await connect(f"ws://127.0.0.1:{port_a}/ws?token={token('u4', 'acme')}")
    await cluster.client(local, "x", "other")  # other tenants are not affected
    await last.close()

    async def admitted() -> bool:
        try:
            ws = await connect(f"ws://127.0.0.1:{port_a}/ws?token={token('u4', 'acme')}")
        except InvalidStatus:
            return False
        cluster.clients.append(ws)
        return True

    await eventually(admitted, 5, what="the freed slot is usable on the other process")


# ------------------------------------------------------------------------------- slow clients
async def test_a_slow_client_on_one_process_does_not_slow_the_others(cluster: Cluster) -> None:
    # ping_timeout is also the close timeout: the close frame must still reach the slow client
    # once it reads again, after the fast readers are done.
    port_a = await cluster.spawn(send_buffer_limit="65536", ping_timeout="15")
    local = await cluster.local()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port_a))
    slow = await connect(
        f"ws://127.0.0.1:{port_a}/ws?token={token('slow', 't1')}", sock=sock, max_queue=1,
        close_timeout=1,
    )  # fmt: skip
    cluster.clients.append(slow)
    await send_json(slow, {"type": "subscribe", "channel": "feed"})
    assert (await recv_json(slow))["type"] == "subscribed"
    fast_a = await cluster.client(port_a, "fa", "t1", "feed")
    fast_here = await cluster.client(local, "fh", "t1", "feed")

    payload = "x" * 16_384
    count = 400  # 6.4 MB: far past the slow client's budget and the kernel's buffers
    readers = [asyncio.create_task(messages(ws, count, 30)) for ws in (fast_a, fast_here)]
    for n in range(count):
        await local.publish("feed", {"n": n, "pad": payload})
        await asyncio.sleep(0)
    for reader in readers:
        got = await reader
        assert [m["data"]["n"] for m in got] == list(range(count))
    code, reason = await closed_with(slow, timeout=10)
    assert code == 1008
    assert "slow consumer" in reason


async def test_a_foreign_frame_on_a_channel_does_not_break_the_link(
    cluster: Cluster, aredis: Any
) -> None:
    sender = await cluster.local()
    receiver = await cluster.local()
    ws = await cluster.client(receiver, "u1", "t1", "room")
    await aredis.publish(f"{cluster.prefix}:{{room}}", b"not an envelope")
    await sender.publish("room", "fine")
    assert [m["data"] for m in await messages(ws, 1)] == ["fine"]
    assert _backend(receiver).reconnects == 0
    assert _backend(receiver).connected


async def test_recovery_under_concurrent_publishes_from_two_processes(cluster: Cluster) -> None:
    """Resubscribing with since (and presence) while both processes publish: no gap, no repeat."""
    port_a = await cluster.spawn(message_rate="100000", message_burst="100000")
    local = await cluster.local()
    remote_publisher = await cluster.client(port_a, "pub", "t1")
    first = await cluster.client(local, "u1", "t1", "hist:load")
    await local.publish("hist:load", "start")
    position = (await messages(first, 1))[0]
    stop = asyncio.Event()

    async def publish_here() -> None:
        n = 0
        while not stop.is_set():
            await local.publish("hist:load", f"l{n}")
            n += 1
            await asyncio.sleep(0.001)

    async def publish_there() -> None:
        n = 0
        while not stop.is_set():
            frame = {"type": "publish", "channel": "hist:load", "data": f"r{n}"}
            await send_json(remote_publisher, frame)
            n += 1
            await asyncio.sleep(0.001)

    publishers = [asyncio.create_task(publish_here()), asyncio.create_task(publish_there())]
    try:
        for round_ in range(4):  # each time on the other process
            port = port_a if round_ % 2 == 0 else local.port
            ws = await cluster.client(port, f"r{round_}", "t1")
            since = {"offset": position["offset"], "epoch": position["epoch"]}
            await send_json(
                ws, {"type": "subscribe", "channel": "hist:load", "since": since, "presence": True}
            )
            offsets: list[int] = []
            async with asyncio.timeout(10):
                while len(offsets) < 150:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "subscribed":
                        assert frame["recovered"] is True
                    elif frame["type"] == "message":
                        offsets.append(frame["offset"])
            first_offset = position["offset"] + 1
            assert offsets == list(range(first_offset, first_offset + 150))  # no gap, no repeat
            position = {"offset": offsets[-1], "epoch": position["epoch"]}
            await ws.close()
    finally:
        stop.set()
        await asyncio.gather(*publishers)


async def test_history_frames_reach_local_clients_in_offset_order(cluster: Cluster) -> None:
    local = await cluster.local()
    ws = await cluster.client(local, "u1", "t1", "hist:order")
    await asyncio.gather(*(local.publish("hist:order", n) for n in range(150)))
    got = await messages(ws, 150)
    assert [m["offset"] for m in got] == list(range(1, 151))


async def test_exclude_on_a_history_channel(cluster: Cluster) -> None:
    local = await cluster.local()
    sender = await cluster.client(local, "s", "t1", "hist:ex")
    other = await cluster.client(local, "o", "t1", "hist:ex")
    connection = next(c for c in local.connections if c.user_id == "s")
    assert await local.publish("hist:ex", "x", exclude=connection) == 1
    assert [m["data"] for m in await messages(other, 1)] == ["x"]
    await nothing_more(sender)


async def test_tenant_slots_of_a_killed_process_are_freed(cluster: Cluster) -> None:
    port_a = await cluster.spawn(max_connections_per_tenant="2")
    local = await cluster.local(max_connections_per_tenant=2)
    await cluster.client(port_a, "u1", "acme")
    await cluster.client(port_a, "u2", "acme")
    with pytest.raises(InvalidStatus):
        await connect(f"ws://127.0.0.1:{local.port}/ws?token={token('u3', 'acme')}")
    cluster.processes[0].kill()
    await cluster.processes[0].wait()

    async def admitted() -> bool:
        try:
            ws = await connect(f"ws://127.0.0.1:{local.port}/ws?token={token('u3', 'acme')}")
        except InvalidStatus:
            return False
        cluster.clients.append(ws)
        return True

    await eventually(admitted, 10, every=0.2, what="the dead process's slots are released")


async def test_a_process_taken_for_dead_writes_its_presence_back(
    cluster: Cluster, aredis: Any
) -> None:
    local = await cluster.local()
    other = await cluster.local()
    await cluster.client(local, "ann", "t1", "room")
    assert await local.presence("room") == {"ann": 1}
    node = _backend(local).node_id
    # What a sweep does to a process that was silent too long: its entries and marker go.
    await aredis.delete(
        f"{cluster.prefix}:{{room}}:presence", f"{{{cluster.prefix}}}:node:{node}:alive"
    )
    assert await other.presence("room") == {}
    await eventually(
        lambda: _presence_is(other, "room", {"ann": 1}), 5, every=0.1, what="written back"
    )


async def test_publish_after_close_is_refused_and_close_fails_waiting_publishes(
    redis_url: str,
) -> None:
    backend = RedisBackend(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    await backend.start(lambda channel, frame: 0)
    waiting = [asyncio.create_task(backend.publish("c", b"{}")) for _ in range(50)]
    await asyncio.sleep(0)
    await backend.close()
    _, pending = await asyncio.wait(waiting, timeout=5)
    assert not pending  # nothing hangs
    from dotmac.communications.errors import WebSocketError

    with pytest.raises(WebSocketError):
        await backend.publish("c", b"{}")
