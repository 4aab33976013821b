"""Cluster fan-out over Redis: two gateway processes beside one, and beside Redis pub/sub itself.

Three setups hold the same ``--clients`` WebSocket clients (in two ``_ws_clients.py``
processes), all subscribed to one channel, and receive the same publishes:

* ``1 process, in-process publish``: one gateway process (``MemoryBackend``) with every client;
  it publishes itself (``gateway.publish()``). The baseline: what a single process does.
* ``1 process, publisher via Redis``: the same, but on ``RedisBackend`` and fed by a third
  process (a gateway without clients, on the same prefix). It splits the cluster's cost in two:
  the Redis hop, and spreading the clients over two processes.
* ``2 processes, publisher via Redis``: two gateway processes on ``RedisBackend`` with half the
  clients each, fed by a third process. The cluster path of the issue.

Each gateway is a ``_cluster_gateway.py`` process configured from ``DOTMAC_WEBSOCKETS__*``
(``BACKEND``, ``REDIS_URL``, ``CHANNEL_PREFIX`` unique per run and setup; presence on), so the
publishing process, whichever it is, is told over a pipe what to publish: the command path is the
same for every setup. The baseline publishes in-process because that is the single-process path
a user has: publishing into one memory gateway from another process would need a client frame and
a hop of its own that no deployment uses.

Beside them, in the same run: Redis pub/sub's own rate on the same ``redis-server`` (redis-py
pipelining ``PUBLISH`` of a frame of the cluster's size, 100 at a time with at most two batches
in flight, to one ``PubSub`` connection, both in this process), messages/s.

Everything is started and connected before timing (setup is not measured) and the rounds are
interleaved, the order rotating every round, so a slow stretch of a noisy machine weighs on every
setup alike. Throughput: ``--messages`` publishes in bursts of ``BURST`` with at most two bursts
not yet received by every client, timed from the first publish command to the last delivery;
server CPU (``/proc/PID/stat`` of the gateway processes; then also the publisher and the throwaway
``redis-server``) over the same span, per delivery. Latency: publishes paced at ``--rate``/s for
``--seconds``, ``time.time()`` in the payload (set by the publishing process) to the client's
receive; p50/p99 of each round's deliveries. Every figure is the median over ``--rounds``.

Redis: a throwaway ``redis-server`` on a free loopback port (no persistence) unless
``DOTMAC_BENCH_REDIS_URL`` names one (its CPU is then not counted). ``--profile PATH`` runs the
Redis gateway processes under cProfile during the throughput rounds and writes ``PATH.PID.prof``
(their figures in that run are the profiler's, not the gateway's).

    python benchmarks/bench_cluster.py            # ~3-4 min
    python benchmarks/bench_cluster.py --quick    # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import redis.asyncio as aioredis
import websockets
from _redis_server import bench_redis, server_version

CHANNEL = "bench"
BURST = 5  # publishes per burst in the throughput runs; two bursts may be in flight
WARM = 10  # messages published (and received) before timing starts
WAIT = 120.0  # longest wait for one run's deliveries
RAW_BATCH = 100  # PUBLISH commands per pipeline in the raw Redis run
RAW_LAT_RATE = 1_000.0  # paced raw Redis publishes/s in its latency run
GATEWAY = Path(__file__).with_name("_cluster_gateway.py")
CLIENTS = Path(__file__).with_name("_ws_clients.py")
TICK = os.sysconf("SC_CLK_TCK")

# Every process started: those still running on the way out (an error, Ctrl-C) are killed.
_children: list[asyncio.subprocess.Process | subprocess.Popen[bytes]] = []


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


# -------------------------------------------------------------------------------- processes
class Proc:
    """A child process speaking lines: stdout lines queue up; progress lines call ``on_line``."""

    def __init__(self, proc: asyncio.subprocess.Process, changed: asyncio.Event) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.lines: asyncio.Queue[list[str]] = asyncio.Queue()
        self.error: str | None = None
        self.progress = 0
        self.latencies: list[int] = []
        self._changed = changed
        self._pump_task = asyncio.create_task(self._pump())

    @classmethod
    async def start(
        cls, argv: list[str], changed: asyncio.Event, env: dict[str, str] | None = None
    ) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=1 << 26,
        )
        _children.append(proc)
        return cls(proc, changed)

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    async def _pump(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            raise RuntimeError("child process without stdout")
        while line := (await stdout.readline()).decode().split(maxsplit=2):
            if line[0] in ("p", "done"):  # _ws_clients.py progress
                self.progress = int(line[1])
                if len(line) > 2:
                    self.latencies.extend(orjson.loads(line[2]))
            elif line[0] == "error":
                self.error = " ".join(line[1:])
            else:
                await self.lines.put(line)
            self._changed.set()
        await self.lines.put(["exited"])
        self._changed.set()

    async def expect(self, word: str, timeout: float) -> list[str]:
        line = await asyncio.wait_for(self.lines.get(), timeout)
        if line[0] != word:
            raise RuntimeError(f"process {self.pid}: expected {word!r}, got {line!r}")
        return line

    async def write(self, text: str) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            raise RuntimeError("child process without stdin")
        stdin.write(text.encode() + b"\n")
        await stdin.drain()

    async def close(self, timeout: float = 20.0) -> None:
        with contextlib.suppress(Exception):
            await self.write("quit")
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._pump_task.cancel()


# ------------------------------------------------------------------------------- the setups
@dataclass
class Setup:
    """Gateway processes, the publishing process and the client processes of one setup."""

    key: str
    name: str
    gateways: list[Proc] = field(default_factory=list)
    redis: bool = False  # on RedisBackend
    publisher: Proc | None = None  # one of ``gateways`` or a third process
    clients: list[tuple[Proc, int]] = field(default_factory=list)  # process, connections
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def n(self) -> int:
        return sum(size for _, size in self.clients)

    def server_pids(self) -> list[int]:
        """Processes outside the gateways that serve this setup (a third publisher)."""
        if self.publisher is None or self.publisher in self.gateways:
            return []
        return [self.publisher.pid]

    def received(self) -> int:
        """Messages every client process has received completely (at burst granularity)."""
        return min(proc.progress // size for proc, size in self.clients)

    async def publish(self, command: str) -> None:
        if self.publisher is None:
            raise RuntimeError("setup without a publisher")
        await self.publisher.write(command)

    async def expect(self, messages: int, step: int, mode: str) -> None:
        """Reset the client counters for ``messages`` publishes, reported every ``step``."""
        for proc, size in self.clients:
            proc.progress = 0
            proc.latencies = []
            await proc.write(f"expect {messages * size} {step * size} {mode}")
        for proc, _ in self.clients:
            await proc.expect("ok", 10)

    async def wait_until(self, messages: int, deadline: float) -> None:
        everyone = [*self.gateways, *[proc for proc, _ in self.clients]]
        if self.publisher is not None:
            everyone.append(self.publisher)
        while self.received() < messages:
            self.changed.clear()
            for proc in everyone:
                if proc.error:
                    raise RuntimeError(f"process {proc.pid}: {proc.error}")
                if proc.exited:
                    raise RuntimeError(f"process {proc.pid} exited")
            remaining = deadline - time.perf_counter()
            try:
                await asyncio.wait_for(self.changed.wait(), max(remaining, 0.0))
            except TimeoutError:
                got = sum(proc.progress for proc, _ in self.clients)
                raise RuntimeError(f"clients received {got:,} deliveries, too few") from None


def _gateway_env(backend: str, url: str | None, prefix: str, profile: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOTMAC_")}
    env["DOTMAC_WEBSOCKETS__BACKEND"] = backend
    env["DOTMAC_WEBSOCKETS__CHANNEL_PREFIX"] = prefix
    env["DOTMAC_WEBSOCKETS__MAX_CONNECTIONS"] = "20000"
    if url:
        env["DOTMAC_WEBSOCKETS__REDIS_URL"] = url
    if profile:
        env["DOTMAC_BENCH_PROFILE"] = profile
    return env


async def open_setup(
    stack: contextlib.AsyncExitStack,
    key: str,
    name: str,
    *,
    gateways: int,
    redis_url: str | None,
    clients: int,
    profile: str | None,
) -> Setup:
    """Start the gateways, the publisher and the clients (one client process per half)."""
    setup = Setup(key, name, redis=redis_url is not None)
    prefix = f"bench-{secrets.token_hex(4)}-{key}"
    env = _gateway_env("redis" if redis_url else "memory", redis_url, prefix, profile)

    async def gateway() -> tuple[Proc, int]:
        proc = await Proc.start([str(GATEWAY)], setup.changed, env)
        stack.push_async_callback(proc.close)
        return proc, int((await proc.expect("port", 60))[1])

    ports = []
    for _ in range(gateways):
        proc, port = await gateway()
        setup.gateways.append(proc)
        ports.append(port)
    if redis_url:
        setup.publisher, _ = await gateway()
    else:
        setup.publisher = setup.gateways[0]
    halves = [clients // 2 + clients % 2, clients // 2]
    for i, size in enumerate(halves):
        if not size:
            continue
        url = f"ws://127.0.0.1:{ports[i % len(ports)]}/ws"
        proc = await Proc.start([str(CLIENTS), "sub", url, str(size)], setup.changed)
        # Clients close before their gateways (the exit stack runs last in, first out).
        stack.push_async_callback(proc.close)
        setup.clients.append((proc, size))
    for proc, _ in setup.clients:
        await proc.expect("ready", WAIT)
    await throughput(setup, WARM, redis_pid=None)
    return setup


# ---------------------------------------------------------------------------------- running
@dataclass
class Result:
    name: str
    rates: list[float] = field(default_factory=list)  # deliveries/s (raw Redis: messages/s)
    cpu: list[float] = field(default_factory=list)  # gateway CPU µs per delivery
    cpu_all: list[float] = field(default_factory=list)  # + publisher + redis-server
    latencies: list[list[int]] = field(default_factory=list)  # µs, one list per round
    error: str | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_per_delivery(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")

    @property
    def cpu_all_per_delivery(self) -> float:
        return statistics.median(self.cpu_all) if self.cpu_all else float("nan")

    def percentile(self, q: float) -> float:
        """Median over the rounds of each round's ``q`` quantile, in ms."""
        values = []
        for round_latencies in self.latencies:
            ordered = sorted(round_latencies)
            if ordered:
                values.append(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000)
        return statistics.median(values) if values else float("nan")


async def throughput(
    setup: Setup, messages: int, redis_pid: int | None
) -> tuple[float, float, float]:
    """Deliveries/s, gateway CPU µs per delivery and all server CPU µs per delivery."""
    await setup.expect(messages, BURST, "count")
    gateways = [proc.pid for proc in setup.gateways]
    others = setup.server_pids() + ([redis_pid] if redis_pid and setup.redis else [])
    deadline = time.perf_counter() + WAIT
    cpu_gw = sum(map(_cpu, gateways))
    cpu_others = sum(map(_cpu, others))
    began = time.perf_counter()
    for start in range(0, messages, BURST):
        await setup.wait_until(start - BURST, deadline)
        await setup.publish(f"pub {start} {min(BURST, messages - start)}")
    await setup.wait_until(messages, deadline)
    elapsed = time.perf_counter() - began
    cpu_gw = sum(map(_cpu, gateways)) - cpu_gw
    cpu_others = sum(map(_cpu, others)) - cpu_others
    deliveries = messages * setup.n
    return (
        deliveries / elapsed,
        cpu_gw / deliveries * 1e6,
        (cpu_gw + cpu_others) / deliveries * 1e6,
    )


async def latency(setup: Setup, rate: float, seconds: float) -> list[int]:
    messages = max(1, round(rate * seconds))
    await setup.expect(messages, messages, "lat")
    await setup.publish(f"lat {rate:g} {messages}")
    await setup.wait_until(messages, time.perf_counter() + seconds + WAIT)
    if setup.publisher is not None:
        await setup.publisher.expect("sent", 10)
    return [lat for proc, _ in setup.clients for lat in proc.latencies]


class RawRedis:
    """redis-py ``PUBLISH`` to one ``PubSub`` subscriber on the benchmark's redis-server."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self.channel = f"bench-raw-{secrets.token_hex(4)}"
        self.filler = b"x" * max(0, size - 30)
        self.tick = asyncio.Event()  # set every RAW_BATCH messages received

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[RawRedis]:
        self.client = aioredis.Redis.from_url(self.url)
        self.pubsub = self.client.pubsub()
        await self.pubsub.subscribe(self.channel)
        while await self.pubsub.get_message(timeout=1.0) is None:  # the subscribe confirmation
            pass
        try:
            yield self
        finally:
            await self.pubsub.aclose()
            await self.client.aclose()

    def _message(self, n: int) -> bytes:
        return b"%d\x1f%r\x1f%s" % (n, time.time(), self.filler)

    async def _receive(self, count: int, latencies: list[int] | None, progress: list[int]) -> None:
        got = 0
        while got < count:
            message = await self.pubsub.get_message(timeout=WAIT)
            if message is None:
                raise RuntimeError(f"raw Redis subscriber got {got:,} of {count:,} messages")
            if message["type"] != "message":
                continue
            got += 1
            progress[0] = got
            if got % RAW_BATCH == 0:
                self.tick.set()
            if latencies is not None:
                sent = float(message["data"].split(b"\x1f", 2)[1])
                latencies.append(round((time.time() - sent) * 1e6))

    async def throughput(self, messages: int) -> float:
        progress = [0]
        began = time.perf_counter()
        receiver = asyncio.create_task(self._receive(messages, None, progress))
        try:
            for start in range(0, messages, RAW_BATCH):
                while progress[0] < start - RAW_BATCH and not receiver.done():
                    self.tick.clear()
                    tick = asyncio.ensure_future(self.tick.wait())
                    await asyncio.wait([receiver, tick], return_when=asyncio.FIRST_COMPLETED)
                    tick.cancel()
                if receiver.done():
                    await receiver  # raises what the receiver ran into
                async with self.client.pipeline(transaction=False) as pipe:
                    for n in range(start, min(start + RAW_BATCH, messages)):
                        pipe.publish(self.channel, self._message(n))
                    await pipe.execute()
            await receiver
        finally:
            receiver.cancel()
        return messages / (time.perf_counter() - began)

    async def latency(self, seconds: float) -> list[int]:
        messages = max(1, round(RAW_LAT_RATE * seconds))
        latencies: list[int] = []
        receiver = asyncio.create_task(self._receive(messages, latencies, [0]))
        try:
            began = time.perf_counter()
            for n in range(messages):
                delay = began + n / RAW_LAT_RATE - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.client.publish(self.channel, self._message(n))
            await receiver
        finally:
            receiver.cancel()
        return latencies


SINGLE = "1 process, in-process publish"
SINGLE_REDIS = "1 process, publisher via Redis"
CLUSTER = "2 processes, publisher via Redis"
RAW = "raw redis-py PUBLISH → 1 subscriber"


async def measure(args: argparse.Namespace, url: str, redis_pid: int | None) -> dict[str, Result]:
    """Start every setup, then run their rounds interleaved."""
    results = {name: Result(name) for name in (SINGLE, SINGLE_REDIS, CLUSTER, RAW)}
    live: dict[str, Setup | RawRedis] = {}

    async def attempt(name: str, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:  # reported in the table; the others go on
            results[name].error = f"{type(exc).__name__}: {exc}"[:100]
            live.pop(name, None)

    def rotated(r: int) -> list[str]:
        names = list(live)
        return names[r % len(names) :] + names[: r % len(names)] if names else []

    async with contextlib.AsyncExitStack() as stack:
        plan = [
            (SINGLE, "single", 1, None),
            (SINGLE_REDIS, "single-redis", 1, url),
            (CLUSTER, "cluster", 2, url),
        ]
        for name, key, gateways, backend_url in plan:

            async def start(name: str = name, key: str = key, g: int = gateways,
                            u: str | None = backend_url) -> None:  # fmt: skip
                live[name] = await open_setup(
                    stack, key, name, gateways=g, redis_url=u, clients=args.clients,
                    profile=args.profile if u else None,
                )  # fmt: skip

            await attempt(name, start())
        frame_size = 145  # envelope (~32 bytes) + the gateway's message frame (~113 bytes)
        raw = RawRedis(url, frame_size)

        async def start_raw() -> None:
            live[RAW] = await stack.enter_async_context(raw.open())
            await raw.throughput(RAW_BATCH * 2)

        await attempt(RAW, start_raw())

        async def one_throughput(name: str) -> None:
            system = live[name]
            result = results[name]
            if isinstance(system, RawRedis):
                result.rates.append(await system.throughput(args.raw_messages))
                return
            rate, cpu, cpu_all = await throughput(system, args.messages, redis_pid)
            result.rates.append(rate)
            result.cpu.append(cpu)
            result.cpu_all.append(cpu_all)

        async def one_latency(name: str) -> None:
            system = live[name]
            if isinstance(system, RawRedis):
                results[name].latencies.append(await system.latency(args.seconds))
            else:
                results[name].latencies.append(await latency(system, args.rate, args.seconds))

        if args.profile:
            await _profile(live, "on")
        for r in range(args.rounds):
            for name in rotated(r):
                await attempt(name, one_throughput(name))
        if args.profile:
            await _profile(live, "off")
        for r in range(args.rounds):
            for name in rotated(r):
                await attempt(name, one_latency(name))
    return results


async def _profile(live: dict[str, Setup | RawRedis], switch: str) -> None:
    for system in live.values():
        if isinstance(system, Setup):
            for proc in system.gateways:
                await proc.write(f"profile {switch}")


# ------------------------------------------------------------------------------------ redis
# ------------------------------------------------------------------------------------ report
def _report(results: dict[str, Result], n: int) -> None:
    print(
        f"{'setup':<36} {'deliv/s':>9} {'vs 1p':>6} {'gw µs':>6} {'vs 1p':>6} "
        f"{'all µs':>7} {'p50 ms':>7} {'p99 ms':>7} {'vs 1p':>6}"
    )
    base = results[SINGLE] if results[SINGLE].error is None else None
    nan = float("nan")
    for result in results.values():
        if result.error or not result.rates:
            print(f"{result.name:<36} n/a: {result.error or 'no rounds'}")
            continue
        p99 = result.percentile(0.99)
        if result.name == RAW:
            print(
                f"{result.name:<36} {result.rate:>9,.0f} {'msg/s':>6} {'':>6} {'':>6} {'':>7} "
                f"{result.percentile(0.50):>7.2f} {p99:>7.2f}"
            )
            continue
        print(
            f"{result.name:<36} {result.rate:>9,.0f} "
            f"{result.rate / base.rate if base else nan:>6.2f} "
            f"{result.cpu_per_delivery:>6.1f} "
            f"{result.cpu_per_delivery / base.cpu_per_delivery if base else nan:>6.2f} "
            f"{result.cpu_all_per_delivery:>7.1f} "
            f"{result.percentile(0.50):>7.1f} {p99:>7.1f} "
            f"{p99 / base.percentile(0.99) if base else nan:>6.2f}"
        )
    cluster, raw = results[CLUSTER], results[RAW]
    if cluster.rates and raw.rates and not cluster.error and not raw.error:
        publishes = cluster.rate / n
        print(
            f"Redis carried {publishes:,.0f} PUBLISH/s in the cluster's throughput rounds "
            f"({publishes / raw.rate:.1%} of its raw rate)"
        )


def _goals(results: dict[str, Result]) -> None:
    single, cluster = results[SINGLE], results[CLUSTER]
    ok = not single.error and not cluster.error and single.rates and cluster.rates
    print("\ngoal (issue #6): the cluster path costs ≤ 30% over the single-process path")
    checks: list[tuple[str, float | None]] = [
        ("time per delivery (1 / deliveries/s): 2 processes / 1", None),
        ("p99 latency: 2 processes / 1", None),
    ]
    if ok:
        checks = [
            (checks[0][0], single.rate / cluster.rate),
            (checks[1][0], cluster.percentile(0.99) / single.percentile(0.99)),
        ]
    verdicts = []
    for label, value in checks:
        met = value is not None and value <= 1.3
        verdicts.append(met)
        shown = "n/a" if value is None else f"{value:.2f}"
        verdict = "NOT MEASURED" if value is None else ("MET" if met else "NOT MET")
        print(f"  {label} = {shown}; goal: ≤ 1.30 → {verdict}")
    if ok:
        ratio = cluster.cpu_per_delivery / single.cpu_per_delivery
        print(f"  (for the record) gateway CPU per delivery: 2 processes / 1 = {ratio:.2f}")
    overall = "NOT MEASURED" if not ok else ("MET" if all(verdicts) else "NOT MET")
    print(f"  → goal {overall}")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument("--clients", type=int, help="connections per setup (1,000; --quick 200)")
    parser.add_argument("--messages", type=int, help="publishes per throughput round")
    parser.add_argument("--raw-messages", type=int, help="raw Redis PUBLISHes per round")
    parser.add_argument("--rounds", type=int, help="rounds (medians are over these)")
    parser.add_argument("--rate", type=float, default=10.0, help="paced publishes/s (10)")
    parser.add_argument("--seconds", type=float, help="length of a paced latency round")
    parser.add_argument("--profile", help="cProfile the Redis gateways to PATH.PID.prof")
    args = parser.parse_args()
    args.clients = args.clients or (200 if args.quick else 1_000)
    args.messages = args.messages or (300 if args.quick else 200)
    args.raw_messages = args.raw_messages or (20_000 if args.quick else 50_000)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.seconds = args.seconds or (2.0 if args.quick else 4.0)
    if min(args.clients, args.messages, args.raw_messages, args.rounds) < 2:
        parser.error("--clients, --messages, --raw-messages and --rounds must be >= 2")
    if args.profile:
        args.profile = os.path.abspath(args.profile)
    return args


async def main(args: argparse.Namespace) -> None:
    _raise_nofile()
    began = time.perf_counter()
    with bench_redis(_children) as found:
        if found is None:
            raise SystemExit("no redis-server found and DOTMAC_BENCH_REDIS_URL unset")
        url, redis_pid = found
        version = server_version(url)
        results = await measure(args, url, redis_pid)
    print(
        f"python {platform.python_version()}, websockets {websockets.__version__}, redis-server "
        f"{version}, {os.cpu_count()} CPUs; {args.clients:,} clients per setup in 2 processes;\n"
        f"throughput: median of {args.rounds} interleaved rounds of {args.messages} publishes "
        f"(bursts of {BURST}), raw Redis {args.raw_messages:,} PUBLISHes (pipelines of "
        f"{RAW_BATCH});\nlatency: {args.rate:g} publishes/s for {args.seconds:g} s x "
        f"{args.rounds} rounds (raw Redis {RAW_LAT_RATE:,.0f}/s), median of each round's p50/p99;\n"
        "gw µs: CPU of the gateway processes per delivery; all µs: + publisher + redis-server"
    )
    _report(results, args.clients)
    _goals(results)
    print(f"\n({time.perf_counter() - began:.0f} s)", file=sys.stderr)


def _kill_children() -> None:
    for proc in _children:
        if proc.returncode is None:  # not reaped: the pid is still this child's
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    try:
        asyncio.run(main(_args()))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        _kill_children()
