"""Client process of ``bench_gateway.py``: holds many connections, counts and times deliveries.

    python benchmarks/_ws_clients.py KIND URL N

KIND is ``sub`` (a dotmac gateway client: subscribes to ``bench`` first), ``raw`` (a bare
``websockets`` client) or ``sio`` (a ``socketio.AsyncClient``, websocket transport only; the
server puts it in the room). Every frame carries ``{"n": .., "t": time.time()}`` (inside the
``message`` envelope for ``sub`` and ``raw``). Lines on stdin drive it, lines on stdout answer:

    → ready DEFLATED           all N connections open (DEFLATED: how many negotiated deflate)
    ← expect TOTAL STEP MODE   reset; MODE ``count`` (count only) or ``lat`` (parse ``t`` too)
    → ok                       reset done: frames from now on are counted
    → p COUNT                  every STEP deliveries
    → done COUNT [LATENCIES]   TOTAL deliveries reached; ``lat``: JSON list of µs latencies
    ← quit
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

CHANNEL = "bench"
CONNECT_CONCURRENCY = 64


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Counter:
    def __init__(self) -> None:
        self.reset(0, 0, "count")

    def reset(self, total: int, step: int, mode: str) -> None:
        self.total = total
        self.step = step or total or 1
        self.lat = mode == "lat"
        self.count = 0
        self.latencies: list[int] = []

    def hit(self, sent: float | None) -> None:
        if sent is not None:
            self.latencies.append(round((time.time() - sent) * 1e6))
        self.count += 1
        if self.count % self.step == 0 and self.count < self.total:
            _say(f"p {self.count}")
        if self.count == self.total:
            tail = f" {orjson.dumps(self.latencies).decode()}" if self.lat else ""
            _say(f"done {self.count}{tail}")


async def _ws_clients(kind: str, url: str, n: int, counter: Counter) -> tuple[list[Any], int]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    readers: list[asyncio.Task[None]] = []

    async def read(ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for frame in ws:
                counter.hit(orjson.loads(frame)["data"]["t"] if counter.lat else None)

    async def one() -> ClientConnection:
        async with gate:
            ws = await connect(url, open_timeout=120, max_size=None)
            if kind == "sub":
                await ws.send(orjson.dumps({"type": "subscribe", "channel": CHANNEL}).decode())
                answer = orjson.loads(await ws.recv())
                if answer.get("type") != "subscribed":
                    raise RuntimeError(f"subscribe refused: {answer}")
            readers.append(asyncio.create_task(read(ws)))
            return ws

    conns = await asyncio.gather(*(one() for _ in range(n)))
    deflated = sum(
        "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        for ws in conns
        if ws.response is not None
    )
    return [*conns, *readers], deflated


async def _sio_clients(url: str, n: int, counter: Counter) -> tuple[list[Any], int]:
    import socketio

    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> Any:
        client = socketio.AsyncClient(reconnection=False)

        @client.on("message")
        async def on_message(data: dict[str, Any]) -> None:
            counter.hit(data["t"] if counter.lat else None)

        async with gate:
            await client.connect(url, transports=["websocket"], wait_timeout=120)
        return client

    return list(await asyncio.gather(*(one() for _ in range(n)))), 0


async def _close(kind: str, held: list[Any]) -> None:
    for item in held:
        with contextlib.suppress(Exception):
            if isinstance(item, asyncio.Task):
                item.cancel()
            elif kind == "sio":
                await item.disconnect()
            else:
                await asyncio.wait_for(item.close(), 2)


async def main() -> None:
    kind, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counter = Counter()
    if kind == "sio":
        held, deflated = await _sio_clients(url, n, counter)
    else:
        held, deflated = await _ws_clients(kind, url, n, counter)
    _say(f"ready {deflated}")
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            break
        if line[0] == "expect":
            counter.reset(int(line[1]), int(line[2]), line[3])
            _say("ok")
    await _close(kind, held)


if __name__ == "__main__":
    asyncio.run(main())
