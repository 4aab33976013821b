"""WebSocket fan-out: deliveries/s, publish→receive latency and server CPU of ``WebSocketGateway``.

Beside it, in the same run: a bare ``websockets`` server calling ``websockets.broadcast()`` over
the same number of connections (the limit, ``compression=None``) and python-socketio's room emit
(the peer, ``AsyncServer`` on aiohttp; clients are ``socketio.AsyncClient`` on the websocket
transport). Every server runs in this process; the clients (``--clients``, split over
``--procs`` OS processes, see ``_ws_clients.py``) are all subscribed to one channel / room. The
raw server sends the same frame as the gateway (same envelope, same id format, UTF-8 bytes).

All servers and their clients are up at once and the rounds are interleaved (one round of each
system in turn, the order rotating every round), so a slower stretch of a noisy machine weighs
on every system alike. Throughput: ``--messages`` publishes, in bursts of ``BURST`` with at most
two bursts not yet received by every client (backpressure), timed from the first publish to the
last delivery; server CPU is ``time.process_time()`` of this process over the same span, per
delivery. Latency: publishes paced at ``--rate`` messages/s for ``--seconds``, ``time.time()``
in the payload to the client's receive; p50/p99 over every delivery of every round. Medians
over ``--rounds``.

Memory: RSS growth of a fresh server process per idle connection (``--idle`` of them, after ten
warm-up connections), the gateway (clients subscribed to one channel) beside a bare
``websockets`` server.

    python benchmarks/bench_gateway.py            # ~5 min (10,000 idle connections)
    python benchmarks/bench_gateway.py --quick    # ~1 min smoke run
    python benchmarks/bench_gateway.py --systems raw,dotmac --idle 0   # fan-out only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import itertools
import logging
import os
import platform
import resource
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve

from dotmac.communications.config import WebSocketsSettings
from dotmac.communications.websockets import AnonymousAuthenticator, WebSocketGateway

CHANNEL = "bench"
BURST = 5  # messages per burst in the throughput runs; two bursts may be in flight
WARM = 10  # messages published (and received) before timing starts
WAIT = 120.0  # longest wait for one run's deliveries
CLIENTS = Path(__file__).with_name("_ws_clients.py")
MAX_CONNECTIONS = 20_000

Send = Callable[[int], Awaitable[object]]


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _payload(n: int) -> dict[str, Any]:
    return {"n": n, "t": time.time(), "kind": "bench", "ok": True}


# ------------------------------------------------------------------------- client processes
class Clients:
    """``--procs`` client processes holding ``n`` connections between them."""

    def __init__(self, procs: list[asyncio.subprocess.Process], sizes: list[int]) -> None:
        self.procs = procs
        self.sizes = sizes
        self.progress = [0] * len(procs)
        self.latencies: list[int] = []
        self.deflated = 0
        self._changed = asyncio.Event()
        self._lines: list[asyncio.Queue[list[str]]] = [asyncio.Queue() for _ in procs]
        self._pumps = [asyncio.create_task(self._pump(i)) for i in range(len(procs))]

    @classmethod
    async def open(cls, kind: str, url: str, n: int, nprocs: int) -> Clients:
        sizes = [n // nprocs + (i < n % nprocs) for i in range(nprocs)]
        sizes = [size for size in sizes if size]
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(CLIENTS),
                kind,
                url,
                str(size),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 26,
            )
            for size in sizes
        ]
        clients = cls(procs, sizes)
        try:
            for i in range(len(procs)):
                line = await clients._expect_line(i, "ready", WAIT)
                clients.deflated += int(line[1])
        except BaseException:
            await clients.close()
            raise
        return clients

    async def _pump(self, i: int) -> None:
        stdout = self.procs[i].stdout
        assert stdout is not None
        while line := (await stdout.readline()).decode().split(maxsplit=2):
            if line[0] in ("p", "done"):
                self.progress[i] = int(line[1])
                if len(line) > 2:
                    self.latencies.extend(orjson.loads(line[2]))
                self._changed.set()
            else:
                await self._lines[i].put(line)
        await self._lines[i].put(["exited"])
        self._changed.set()

    async def _expect_line(self, i: int, word: str, timeout: float) -> list[str]:
        line = await asyncio.wait_for(self._lines[i].get(), timeout)
        if line[0] != word:
            raise RuntimeError(f"client process {i}: expected {word!r}, got {line!r}")
        return line

    async def _write(self, i: int, text: str) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write(text.encode() + b"\n")
        await stdin.drain()

    async def expect(self, messages: int, burst: int, mode: str) -> None:
        """Reset the counters for ``messages`` publishes, reported every ``burst``."""
        self.progress = [0] * len(self.procs)
        self.latencies = []
        for i, size in enumerate(self.sizes):
            await self._write(i, f"expect {messages * size} {burst * size} {mode}")
        for i in range(len(self.procs)):
            await self._expect_line(i, "ok", 10)

    def received(self) -> int:
        """Messages every client process has received completely (at burst granularity)."""
        return min(count // size for count, size in zip(self.progress, self.sizes, strict=True))

    async def wait_until(self, messages: int, deadline: float) -> None:
        while self.received() < messages:
            self._changed.clear()
            remaining = deadline - time.perf_counter()
            try:
                await asyncio.wait_for(self._changed.wait(), max(remaining, 0.0))
            except TimeoutError:
                got = sum(self.progress)
                raise RuntimeError(f"clients received {got:,} deliveries, too few") from None
            if any(proc.returncode is not None for proc in self.procs):
                raise RuntimeError("a client process exited")

    async def close(self) -> None:
        for i in range(len(self.procs)):
            with contextlib.suppress(Exception):
                await self._write(i, "quit")
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pump in self._pumps:
            pump.cancel()


# ------------------------------------------------------------------------------ the systems
@dataclass(frozen=True)
class System:
    key: str  # for --systems
    name: str
    client_kind: str  # see _ws_clients.py
    run: Callable[[], contextlib.AbstractAsyncContextManager[tuple[str, Send]]]
    needs: str | None = None  # module that must be importable


def gateway_settings() -> WebSocketsSettings:
    return WebSocketsSettings(max_connections=MAX_CONNECTIONS)


@contextlib.asynccontextmanager
async def dotmac_gateway() -> AsyncIterator[tuple[str, Send]]:
    settings = gateway_settings()
    gateway = WebSocketGateway(settings, authenticator=AnonymousAuthenticator())
    await gateway.start("127.0.0.1", 0)
    try:
        yield (
            f"ws://127.0.0.1:{gateway.port}{settings.path}",
            lambda n: gateway.publish(CHANNEL, _payload(n)),
        )
    finally:
        await gateway.stop()


class _RawServer:
    def __init__(self) -> None:
        self.connections: set[ServerConnection] = set()
        self.ids = itertools.count(1)
        self.id_prefix = secrets.token_hex(4) + "-"  # the gateway's message id format

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.add(ws)
        try:
            await ws.wait_closed()
        finally:
            self.connections.discard(ws)

    def frame(self, n: int) -> bytes:
        message = {"type": "message", "channel": CHANNEL, "data": _payload(n)}
        message["id"] = f"{self.id_prefix}{next(self.ids):x}"
        return orjson.dumps(message)


@contextlib.asynccontextmanager
async def raw_broadcast() -> AsyncIterator[tuple[str, Send]]:
    raw = _RawServer()

    async def send(n: int) -> None:
        broadcast(raw.connections, raw.frame(n), text=True)

    async with serve(raw.handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/", send


@contextlib.asynccontextmanager
async def socketio_room() -> AsyncIterator[tuple[str, Send]]:
    import socketio
    from aiohttp import web

    sio = socketio.AsyncServer(async_mode="aiohttp")

    @sio.event
    async def connect(sid: str, _environ: dict[str, Any], _auth: Any = None) -> None:
        await sio.enter_room(sid, CHANNEL)

    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}", lambda n: sio.emit("message", _payload(n), to=CHANNEL)
    finally:
        await runner.cleanup()


RAW = "raw websockets.broadcast()"
OURS = "dotmac gateway.publish()"
PEER = "python-socketio room emit"
SYSTEMS = [
    System("raw", RAW, "raw", raw_broadcast),
    System("dotmac", OURS, "sub", dotmac_gateway),
    System("socketio", PEER, "sio", socketio_room, needs="socketio"),
]


# ---------------------------------------------------------------------------------- running
@dataclass
class Result:
    system: System
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # server CPU µs per delivery
    latencies: list[int] = field(default_factory=list)  # µs
    deflated: int = 0
    error: str | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_per_delivery(self) -> float:
        return statistics.median(self.cpu)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


async def throughput(send: Send, clients: Clients, messages: int, n: int) -> tuple[float, float]:
    await clients.expect(messages, BURST, "count")
    deadline = time.perf_counter() + WAIT
    cpu = time.process_time()
    began = time.perf_counter()
    for start in range(0, messages, BURST):
        await clients.wait_until(start - BURST, deadline)
        for i in range(start, min(start + BURST, messages)):
            await send(i)
    await clients.wait_until(messages, deadline)
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    deliveries = messages * n
    return deliveries / elapsed, cpu / deliveries * 1e6


async def latency(send: Send, clients: Clients, rate: float, seconds: float) -> list[int]:
    messages = max(1, round(rate * seconds))
    await clients.expect(messages, messages, "lat")
    began = time.perf_counter()
    for i in range(messages):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)
    await clients.wait_until(messages, time.perf_counter() + WAIT)
    return clients.latencies


async def measure(systems: list[System], args: argparse.Namespace) -> dict[str, Result]:
    """Start every system and its clients, then run their rounds interleaved."""
    results = {system.name: Result(system) for system in systems}
    live: dict[str, tuple[Send, Clients]] = {}

    async def attempt(name: str, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            results[name].error = f"{type(exc).__name__}: {exc}"
            live.pop(name, None)

    def rotated(r: int) -> list[tuple[str, Send, Clients]]:  # round r starts with system r
        names = list(live)
        names = names[r % len(names) :] + names[: r % len(names)] if names else []
        return [(name, *live[name]) for name in names]

    try:
        async with contextlib.AsyncExitStack() as stack:
            for system in systems:
                if system.needs and importlib.util.find_spec(system.needs) is None:
                    results[system.name].error = f"{system.needs} not installed"
                    continue

                async def start(system: System = system) -> None:
                    url, send = await stack.enter_async_context(system.run())
                    clients = await Clients.open(system.client_kind, url, args.clients, args.procs)
                    stack.push_async_callback(clients.close)
                    results[system.name].deflated = clients.deflated
                    await throughput(send, clients, WARM, args.clients)
                    live[system.name] = (send, clients)

                await attempt(system.name, start())

            async def one_throughput(name: str, send: Send, clients: Clients) -> None:
                rate, cpu = await throughput(send, clients, args.messages, args.clients)
                results[name].rates.append(rate)
                results[name].cpu.append(cpu)

            async def one_latency(name: str, send: Send, clients: Clients) -> None:
                results[name].latencies += await latency(send, clients, args.rate, args.seconds)

            for r in range(args.rounds):
                for name, send, clients in rotated(r):
                    await attempt(name, one_throughput(name, send, clients))
            for r in range(args.rounds):
                for name, send, clients in rotated(r):
                    await attempt(name, one_latency(name, send, clients))
    except Exception as exc:  # stopping a server or its clients failed: the figures stand
        print(f"stopping the systems failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return results


# -------------------------------------------------------------------------- idle connections
def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def idle_server(kind: str) -> None:
    """``--idle-server``: serve, print the port, answer ``rss`` with ``rss BYTES CONNECTIONS``."""
    _raise_nofile()
    logging.getLogger("dotmac.communications.websockets").setLevel(logging.ERROR)
    if kind == "sub":
        gateway = WebSocketGateway(gateway_settings(), authenticator=AnonymousAuthenticator())
        await gateway.start("127.0.0.1", 0)
        port, count = gateway.port, lambda: len(gateway.connections)
    else:
        raw = _RawServer()
        server = await serve(raw.handler, "127.0.0.1", 0, compression=None)
        port, count = server.sockets[0].getsockname()[1], lambda: len(raw.connections)
    print(f"port {port}", flush=True)
    while (await asyncio.to_thread(sys.stdin.readline)).strip() == "rss":
        await asyncio.sleep(0.5)
        gc.collect()
        print(f"rss {_rss()} {count()}", flush=True)
    os._exit(0)  # the clients are gone or going: skip the close handshakes


@dataclass
class Idle:
    per_connection: float = float("nan")  # bytes
    held: int = 0
    error: str | None = None


async def idle(kind: str, n: int, procs: int) -> Idle:
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--idle-server",
        kind,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdin is not None
    assert server.stdout is not None

    async def rss() -> tuple[int, int]:
        assert server.stdin is not None
        assert server.stdout is not None
        server.stdin.write(b"rss\n")
        await server.stdin.drain()
        _word, size, count = (await server.stdout.readline()).decode().split()
        return int(size), int(count)

    result = Idle()
    try:
        port = int((await server.stdout.readline()).split()[1])
        url = f"ws://127.0.0.1:{port}/ws"
        warm = await Clients.open(kind, url, 10, 1)
        try:
            before, _ = await rss()
            clients = await Clients.open(kind, url, n, procs)
            try:
                after, held = await rss()
            finally:
                await clients.close()
        finally:
            await warm.close()
        result.per_connection = (after - before) / n
        result.held = held - 10
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        server.stdin.write(b"quit\n")
        with contextlib.suppress(Exception):
            await server.stdin.drain()
        try:
            await asyncio.wait_for(server.wait(), 15)
        except TimeoutError:
            server.kill()
            await server.wait()
    return result


# ------------------------------------------------------------------------------------ report
def _report(results: dict[str, Result]) -> None:
    print(
        f"{'system':<28} {'deliv/s':>9} {'vs raw':>7} {'CPU µs':>7} {'vs raw':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'vs raw':>7}"
    )
    raw = results.get(RAW)
    base = raw if raw is not None and raw.error is None else None
    nan = float("nan")
    for result in results.values():
        name = result.system.name
        if result.error:
            print(f"{name:<28} n/a: {result.error}")
            continue
        p99 = result.percentile(0.99)
        print(
            f"{name:<28} {result.rate:>9,.0f} "
            f"{result.rate / base.rate if base else nan:>7.2f} "
            f"{result.cpu_per_delivery:>7.1f} "
            f"{result.cpu_per_delivery / base.cpu_per_delivery if base else nan:>7.2f} "
            f"{result.percentile(0.50):>7.1f} {p99:>7.1f} "
            f"{p99 / base.percentile(0.99) if base else nan:>7.2f}"
        )


def _idle_report(n: int, bare: Idle, ours: Idle) -> None:
    print(f"\nmemory per idle connection ({n:,} connections, server RSS growth):")
    for name, idle_result in (("bare websockets server", bare), ("dotmac gateway", ours)):
        if idle_result.error:
            print(f"  {name:<24} n/a: {idle_result.error}")
        else:
            print(
                f"  {name:<24} {idle_result.per_connection / 1024:>6.1f} KiB "
                f"({idle_result.held:,} held)"
            )


def _goals(results: dict[str, Result], n_idle: int, bare: Idle, ours: Idle) -> None:
    def good(name: str) -> Result | None:
        result = results.get(name)
        return None if result is None or result.error else result

    raw, dotmac, peer = good(RAW), good(OURS), good(PEER)
    goals: list[tuple[str, float | None, str, bool]] = []  # label, value, target, higher wins

    def ratio(value: Callable[[Result], float], a: Result | None, b: Result | None) -> float | None:
        return None if a is None or b is None else value(a) / value(b)

    goals.append(
        ("deliveries/s: dotmac / raw", ratio(lambda r: r.rate, dotmac, raw), "≥ 0.9", True)
    )
    goals.append(
        (
            "server CPU per delivery: dotmac / raw",
            ratio(lambda r: r.cpu_per_delivery, dotmac, raw),
            "≤ 1.25",
            False,
        )
    )
    goals.append(
        (
            "p99 latency: dotmac / raw",
            ratio(lambda r: r.percentile(0.99), dotmac, raw),
            "≤ 1.25",
            False,
        )
    )
    goals.append(
        ("deliveries/s: dotmac / socketio", ratio(lambda r: r.rate, dotmac, peer), "≥ 3", True)
    )
    idle_ratio = None if bare.error or ours.error else ours.per_connection / bare.per_connection
    goals.append(("memory per idle connection: dotmac / bare", idle_ratio, "≤ 1.2", False))
    print("\ngoals:")
    for label, value, target, higher in goals:
        limit = float(target.split()[1])
        if value is None:
            verdict, shown = "NOT MEASURED", "n/a"
        else:
            met = value >= limit if higher else value <= limit
            verdict, shown = ("MET" if met else "NOT MET"), f"{value:.2f}"
        print(f"  {label} = {shown}; goal: {target} → {verdict}")
    default_off = not WebSocketsSettings().compression
    negotiated = None if dotmac is None else dotmac.deflated
    verdict = (
        "NOT MEASURED"
        if negotiated is None
        else ("MET" if default_off and negotiated == 0 else "NOT MET")
    )
    print(
        f"  compression off by default: settings.compression={not default_off}, "
        f"deflate negotiated on {negotiated} connections → {verdict}"
    )
    if n_idle == 0:
        verdict = "NOT MEASURED (--idle 0)"
    elif ours.error or n_idle < 10_000:
        verdict = "NOT MEASURED (run with --idle 10000)" if not ours.error else "NOT MET"
    else:
        verdict = "MET" if ours.held >= 10_000 else "NOT MET"
    print(f"  10,000 idle connections held in one process: {ours.held:,} held → {verdict}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 min smoke run")
    parser.add_argument("--clients", type=int, help="connections (1,000; --quick 200)")
    parser.add_argument("--procs", type=int, default=2, help="client processes (2)")
    parser.add_argument("--messages", type=int, help="publishes per throughput round")
    parser.add_argument("--rounds", type=int, help="rounds (medians are over these)")
    parser.add_argument("--rate", type=float, default=20.0, help="paced publishes/s (20)")
    parser.add_argument("--seconds", type=float, help="length of a paced latency round")
    parser.add_argument(
        "--idle", type=int, help="idle connections (10,000; --quick 1,000; 0 skips)"
    )
    parser.add_argument(
        "--systems",
        default=",".join(system.key for system in SYSTEMS),
        help="comma-separated systems to run (raw,dotmac,socketio)",
    )
    parser.add_argument("--idle-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.idle_server:
        await idle_server(args.idle_server)
        return
    args.clients = args.clients or (200 if args.quick else 1_000)
    args.messages = args.messages or (300 if args.quick else 200)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    if args.idle is None:
        args.idle = 1_000 if args.quick else 10_000
    if min(args.clients, args.procs, args.messages, args.rounds) < 1 or args.idle < 0:
        parser.error("--clients, --procs, --messages and --rounds must be >= 1, --idle >= 0")
    keys = args.systems.split(",")
    systems = [system for system in SYSTEMS if system.key in keys]
    if len(systems) != len(set(keys)):
        parser.error(f"--systems: pick from {','.join(system.key for system in SYSTEMS)}")
    _raise_nofile()
    logging.getLogger("dotmac.communications.websockets").setLevel(logging.ERROR)

    began = time.perf_counter()
    results = await measure(systems, args)
    bare = ours = Idle(error="skipped (--idle 0)")
    if args.idle:
        bare = await idle("raw", args.idle, args.procs)
        ours = await idle("sub", args.idle, args.procs)
    print(
        f"python {platform.python_version()}, websockets {websockets.__version__}, "
        f"{os.cpu_count()} CPUs; {args.clients:,} clients in {args.procs} processes, servers in "
        f"this one;\nthroughput: median of {args.rounds} interleaved rounds of {args.messages} "
        f"publishes (bursts of {BURST}); latency: {args.rate:g} publishes/s for "
        f"{args.seconds:g} s x {args.rounds} rounds, p50/p99 of every delivery"
    )
    _report(results)
    if args.idle:
        _idle_report(args.idle, bare, ours)
    _goals(results, args.idle, bare, ours)
    print(f"\n({time.perf_counter() - began:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
