"""Emails/s and webhooks/s of ``NotificationService`` beside the raw client and apprise.

Email goes to a local SMTP sink, webhooks to a local HTTP/1.1 server, each in its own OS process
(``benchmarks/_sinks.py``, 127.0.0.1, free ports). Systems, each at the concurrencies listed:

- email, N = 1 and 10 concurrent senders: raw aiosmtplib (N persistent connections, each sending
  its share sequentially, every message an ``EmailMessage`` with From/To/Subject/Date/Message-ID
  sent by ``send_message``); dotmac (``SMTPProvider(pool_size=N)`` behind
  ``NotificationService.send``, one ``Notification`` per message, from N tasks); apprise
  (``mailto://`` to the sink, ``await Apprise.async_notify`` from N tasks).
- webhooks, 10 and 50 concurrent senders: raw ``httpx.AsyncClient`` (pool limits = concurrency,
  the same JSON body as ours, unsigned); dotmac (``WebhookProvider`` with an HMAC secret and its
  default ``max_connections=10`` per host, via ``NotificationService.send``); apprise ``json://``.

apprise's throttle: its email plugin inherits ``NotifyBase.request_rate_per_sec = 5.5`` (a 5.5 s
sleep between sends); it is switched off in code by setting ``request_rate_per_sec = 0`` on each
loaded plugin instance (``for plugin in apprise_obj: plugin.request_rate_per_sec = 0``).
``NotifyJSON`` already has 0. apprise sends synchronously (smtplib / requests, one new
connection per message) in its shared thread pool (``min(32, CPUs + 4)`` threads).

Each run builds the system afresh, sends ``2 x concurrency`` warm-up messages (pools open), then
times the rest: messages / (last done - first started). The sink's own count is checked against
what was sent, and both processes' CPU time is sampled: ``sink CPU`` near 100 % would mean the
sink, not the client, is the limit. Runs interleave the systems; the table shows medians.

Memory: a fresh child process (this script; apprise not imported) sends webhooks at concurrency
10 through a default ``NotificationService`` (its default in-memory store, or
``MemoryStore(max_results=N)`` with ``--memory-cap N`` to tell the store's retention from a leak)
and samples its RSS (``VmRSS`` after ``gc.collect()``; no tracemalloc) after 1,000 warm-up sends
and then every 10,000 sends. Flat means no sample exceeds the first by more than 10 %.

    python benchmarks/bench_notifications.py            # ~7 min (4 in the 100k-send memory run)
    python benchmarks/bench_notifications.py --quick    # < 60 s smoke run (20k-send memory run)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import orjson
from _sinks import SinkProcess, sinks

from dotmac.communications.notifications import MemoryStore, Notification, NotificationService
from dotmac.communications.notifications.channels.email import SMTPProvider
from dotmac.communications.notifications.channels.webhook import WebhookProvider

SENDER = "bench@example.com"
SUBJECT = "Your invoice is ready"
TEXT = "Hello,\n\nyour invoice INV-2041 for 49.00 EUR is ready.\n\n-- the billing team\n"
SECRET = "bench-webhook-secret"
EMAIL_CONCURRENCY = (1, 10)
WEBHOOK_CONCURRENCY = (10, 50)
APPRISE_EMAIL_SCALE = 0.05  # apprise mails at ~30/s: 5 % of --emails keeps a run ~3 s
MEMORY_STEP = 10_000
MEMORY_WARM = 1_000
FLAT = 0.10  # memory is flat when no sample exceeds the first by more than 10 %

Send = Callable[[int, int], Awaitable[None]]  # (worker, message number)
Opener = Callable[[int, int], contextlib.AbstractAsyncContextManager[Send]]  # (port, concurrency)
Sample = tuple[int, int, float]  # memory run: (sends so far, RSS bytes, perf_counter)


def _recipient(n: int) -> str:
    return f"user{n}@example.com"


# ------------------------------------------------------------------------------- email systems
def raw_email(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = _recipient(n)
    msg["Subject"] = SUBJECT
    msg["Date"] = email.utils.format_datetime(datetime.now(UTC))
    msg["Message-ID"] = email.utils.make_msgid(domain="example.com")
    msg.set_content(TEXT)
    return msg


@contextlib.asynccontextmanager
async def raw_aiosmtplib(port: int, concurrency: int) -> AsyncIterator[Send]:
    clients = [
        aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.local")
        for _ in range(concurrency)
    ]
    await asyncio.gather(*(c.connect() for c in clients))

    async def send(worker: int, n: int) -> None:
        await clients[worker].send_message(raw_email(n))

    try:
        yield send
    finally:
        await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)


@contextlib.asynccontextmanager
async def dotmac_email(port: int, concurrency: int) -> AsyncIterator[Send]:
    provider = SMTPProvider(
        host="127.0.0.1",
        port=port,
        from_address=SENDER,
        pool_size=concurrency,
        local_hostname="bench.local",
    )
    async with NotificationService([provider]) as svc:

        async def send(_worker: int, n: int) -> None:
            note = Notification(channel="email", to=_recipient(n), subject=SUBJECT, text=TEXT)
            result = await svc.send(note)
            if result.status != "sent":
                raise RuntimeError(f"dotmac email not sent: {result.deliveries[0].error}")

        yield send


def _apprise(url: str) -> Any:
    import apprise

    notifier = apprise.Apprise()
    if not notifier.add(url):
        raise RuntimeError(f"apprise refused {url}")
    for plugin in notifier:
        plugin.request_rate_per_sec = 0  # the throttle, off (email default: 5.5 s per send)
    return notifier


@contextlib.asynccontextmanager
async def apprise_email(port: int, _concurrency: int) -> AsyncIterator[Send]:
    notifier = _apprise(f"mailto://127.0.0.1:{port}?from={SENDER}&to={_recipient(0)}&mode=insecure")

    async def send(_worker: int, _n: int) -> None:
        if not await notifier.async_notify(body=TEXT, title=SUBJECT):
            raise RuntimeError("apprise mailto:// notify failed")

    yield send


# ----------------------------------------------------------------------------- webhook systems
def _hook(port: int) -> str:
    return f"http://127.0.0.1:{port}/hooks/bench"


@contextlib.asynccontextmanager
async def raw_httpx(port: int, concurrency: int) -> AsyncIterator[Send]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    url = _hook(port)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:

        async def send(_worker: int, _n: int) -> None:
            body = orjson.dumps({"subject": SUBJECT, "text": TEXT})
            response = await client.post(url, content=body, headers=headers)
            response.raise_for_status()

        yield send


@contextlib.asynccontextmanager
async def dotmac_webhook(port: int, _concurrency: int) -> AsyncIterator[Send]:
    provider = WebhookProvider(secret=SECRET, allow_private_targets=True)
    url = _hook(port)
    async with NotificationService([provider]) as svc:

        async def send(_worker: int, _n: int) -> None:
            note = Notification(channel="webhook", to=url, subject=SUBJECT, text=TEXT)
            result = await svc.send(note)
            if result.status != "sent":
                raise RuntimeError(f"dotmac webhook not sent: {result.deliveries[0].error}")

        yield send


@contextlib.asynccontextmanager
async def apprise_json(port: int, _concurrency: int) -> AsyncIterator[Send]:
    notifier = _apprise(f"json://127.0.0.1:{port}/hooks/bench")

    async def send(_worker: int, _n: int) -> None:
        if not await notifier.async_notify(body=TEXT, title=SUBJECT):
            raise RuntimeError("apprise json:// notify failed")

    yield send


# ---------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class System:
    channel: str  # "email" or "webhook"
    role: str  # "raw", "dotmac" or "apprise"
    name: str
    concurrency: int
    open: Opener
    scale: float = 1.0  # messages per run = --emails / --webhooks x scale


@dataclass
class Result:
    system: System
    rates: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)  # % of one core
    cpu_per_msg: list[float] = field(default_factory=list)  # client CPU µs per message
    sink_cpu: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates and not self.error else None


def systems() -> list[System]:
    found: list[System] = []
    for n in EMAIL_CONCURRENCY:
        conns = "1 reused conn" if n == 1 else f"{n} reused conns"
        found += [
            System("email", "raw", f"raw aiosmtplib, {conns}", n, raw_aiosmtplib),
            System("email", "dotmac", f"dotmac SMTPProvider(pool_size={n})", n, dotmac_email),
            System(
                "email",
                "apprise",
                "apprise mailto:// (throttle off)",
                n,
                apprise_email,
                APPRISE_EMAIL_SCALE,
            ),
        ]
    for n in WEBHOOK_CONCURRENCY:
        found += [
            System("webhook", "raw", "raw httpx.AsyncClient (pooled)", n, raw_httpx),
            System("webhook", "dotmac", "dotmac WebhookProvider (signed)", n, dotmac_webhook),
            System("webhook", "apprise", "apprise json://", n, apprise_json),
        ]
    return found


async def _workers(send: Send, concurrency: int, first: int, count: int) -> None:
    async def work(worker: int) -> None:
        for n in range(first + worker, first + count, concurrency):
            await send(worker, n)

    await asyncio.gather(*(work(w) for w in range(concurrency)))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


async def one_run(system: System, sink: SinkProcess, count: int, result: Result) -> None:
    c = system.concurrency
    async with system.open(sink.port, c) as send:
        warm = 2 * c
        await _workers(send, c, 0, warm)
        before, sink_before = sink.stats()
        cpu = _cpu()
        start = time.perf_counter()
        await _workers(send, c, warm, count)
        elapsed = time.perf_counter() - start
        cpu = _cpu() - cpu
        after, sink_after = sink.stats()
    if after - before != count:
        raise RuntimeError(f"sink counted {after - before} of {count} messages")
    result.rates.append(count / elapsed)
    result.client_cpu.append(100 * cpu / elapsed)
    result.cpu_per_msg.append(1e6 * cpu / count)
    result.sink_cpu.append(100 * (sink_after - sink_before) / elapsed)


async def measure(
    chosen: list[System], smtp: SinkProcess, http: SinkProcess, args: argparse.Namespace
) -> dict[System, Result]:
    results = {s: Result(s) for s in chosen}
    for _ in range(args.runs):  # runs interleave the systems, so drift hits all alike
        for system in chosen:
            result = results[system]
            if result.error:
                continue
            base = args.emails if system.channel == "email" else args.webhooks
            count = max(4 * system.concurrency, round(base * system.scale))
            sink = smtp if system.channel == "email" else http
            try:
                await one_run(system, sink, count, result)
            except ImportError as exc:
                result.error = f"not installed: {exc.name}"
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"[:70]
    return results


# ------------------------------------------------------------------------------------ memory
def _rss() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current


async def memory_child(port: int, sends: int, cap: int | None) -> None:
    """Send ``sends`` webhooks through a default service; print one JSON line per RSS sample.

    ``cap``: give the service ``MemoryStore(max_results=cap)`` instead of the default store
    (which keeps results and history of up to 10,000 notifications for ``history_ttl``).
    """
    concurrency = 10
    provider = WebhookProvider(secret=SECRET, allow_private_targets=True)
    store = None if cap is None else MemoryStore(max_results=cap)
    url = _hook(port)

    async def send(_worker: int, _n: int) -> None:
        note = Notification(channel="webhook", to=url, subject=SUBJECT, text=TEXT)
        if (await svc.send(note)).status != "sent":
            raise RuntimeError("dotmac webhook not sent")

    def sample(done: int) -> None:
        gc.collect()
        print(json.dumps({"sends": done, "rss": _rss(), "t": time.perf_counter()}), flush=True)

    async with NotificationService([provider], store=store) as svc:
        await _workers(send, concurrency, 0, MEMORY_WARM)
        sample(MEMORY_WARM)
        done = MEMORY_WARM
        while done < MEMORY_WARM + sends:
            step = min(MEMORY_STEP, MEMORY_WARM + sends - done)
            await _workers(send, concurrency, done, step)
            done += step
            sample(done)


def memory(http: SinkProcess, sends: int, cap: int | None) -> tuple[list[Sample], float]:
    """Run :func:`memory_child` in a fresh process; return its samples and the wall time."""
    start = time.perf_counter()
    command = [sys.executable, __file__, "--memory-child", str(http.port), "--memory", str(sends)]
    if cap is not None:
        command += ["--memory-cap", str(cap)]
    child = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"memory child failed: {child.stderr.strip()[-300:]}")
    rows = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    return [(r["sends"], r["rss"], r["t"]) for r in rows], time.perf_counter() - start


# ------------------------------------------------------------------------------------ report
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(results: dict[System, Result]) -> None:
    def peer(system: System, role: str) -> float | None:
        for other, res in results.items():
            if (other.channel, other.role, other.concurrency) == (
                system.channel,
                role,
                system.concurrency,
            ):
                return res.rate
        return None

    print(
        f"{'channel':<8} {'system':<36} {'conc':>4} {'msgs/s':>7} {'vs raw':>6} "
        f"{'vs apprise':>10} {'CPU µs/msg':>10} {'client CPU':>10} {'sink CPU':>8}"
    )
    for system, res in results.items():
        head = f"{system.channel:<8} {system.name:<36} {system.concurrency:>4}"
        if res.rate is None:
            print(f"{head} n/a: {res.error}")
            continue
        raw, app = peer(system, "raw"), peer(system, "apprise")
        print(
            f"{head} {res.rate:>7,.0f} {_fmt(raw and res.rate / raw, '6.2f'):>6} "
            f"{_fmt(app and res.rate / app, '10.1f'):>10} "
            f"{statistics.median(res.cpu_per_msg):>10,.0f} "
            f"{statistics.median(res.client_cpu):>9.0f}% {statistics.median(res.sink_cpu):>7.0f}%"
        )


def goals(
    results: dict[System, Result], samples: list[Sample] | None, store: str, cap: int
) -> None:
    def rate(channel: str, role: str, concurrency: int | None = None) -> float | None:
        rates = [
            r.rate
            for s, r in results.items()
            if s.channel == channel and s.role == role and concurrency in {None, s.concurrency}
        ]
        known = [x for x in rates if x is not None]
        return max(known) if known and len(known) == len(rates) else None

    def line(what: str, ours: float | None, theirs: float | None, target: float) -> None:
        if ours is None or theirs is None:
            print(f"  {what}: n/a; goal ≥ {target:g} → NOT MEASURED")
            return
        verdict = "MET" if ours / theirs >= target else "NOT MET"
        print(f"  {what}: {ours / theirs:.2f}; goal ≥ {target:g} → {verdict}")

    measured = {s.channel for s in results}
    print("\ngoals (ratios of median msgs/s):")
    for n in EMAIL_CONCURRENCY if "email" in measured else ():
        ours = rate("email", "dotmac", n)
        line(f"email N={n}: dotmac / raw aiosmtplib", ours, rate("email", "raw", n), 0.9)
        line(f"email N={n}: dotmac / apprise", ours, rate("email", "apprise", n), 20.0)
    best_raw, best_apprise = rate("webhook", "raw"), rate("webhook", "apprise")
    for n in WEBHOOK_CONCURRENCY if "webhook" in measured else ():
        ours = rate("webhook", "dotmac", n)
        line(f"webhook c={n}: dotmac / best raw httpx", ours, best_raw, 0.9)
        line(f"webhook c={n}: dotmac / best apprise", ours, best_apprise, 1.5)
    if not samples:
        print("  memory: not measured (--memory 0)")
        return
    first, peak = samples[0][1], max(rss for _, rss, _ in samples)
    sends, end = samples[-1][0] - samples[0][0], samples[-1][1]
    print(
        f"  memory over {sends:,} webhook sends ({store}): RSS start {first / 2**20:.1f} MiB, "
        f"end {end / 2**20:.1f} MiB, max {peak / 2**20:.1f} MiB (+{peak / first - 1:.1%})"
    )
    # The store keeps the last `cap` notifications' results and history by design (bounded
    # retention); "flat" is judged once it is full: from then on nothing may grow.
    full = next((s for s in samples if s[0] >= cap + MEMORY_WARM), None)
    if full is None:
        print(f"  memory: the run ended before the store was full ({cap:,}); not judged")
        return
    steady_peak = max(rss for n, rss, _ in samples if n >= full[0])
    growth = steady_peak / full[1] - 1
    verdict = "MET" if growth <= FLAT else "NOT MET"
    print(
        f"  memory once the store is full ({cap:,} notifications, {full[0]:,} sends): "
        f"{full[1] / 2**20:.1f} MiB → max {steady_peak / 2**20:.1f} MiB (+{growth:.1%}); "
        f"goal flat (≤ +{FLAT:.0%}) → {verdict}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="< 60 s smoke run")
    parser.add_argument("--runs", type=int, help="runs per system (medians are over these)")
    parser.add_argument("--emails", type=int, help="emails per run (apprise: 5 %% of it)")
    parser.add_argument("--webhooks", type=int, help="webhooks per run")
    parser.add_argument("--memory", type=int, help="webhook sends of the memory run (0: skip)")
    parser.add_argument(
        "--smtp-sink", choices=("smtp", "aiosmtpd"), default="smtp", help="SMTP sink kind"
    )
    parser.add_argument("--channel", choices=("email", "webhook"), help="measure this channel only")
    parser.add_argument(
        "--memory-cap",
        type=int,
        help="memory run with MemoryStore(max_results=N) (default: the default store)",
    )
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        await memory_child(args.memory_child, args.memory, args.memory_cap)
        return
    args.runs = args.runs or (1 if args.quick else 3)
    args.emails = args.emails or (300 if args.quick else 2_000)
    args.webhooks = args.webhooks or (400 if args.quick else 2_000)
    args.memory = args.memory if args.memory is not None else 20_000 if args.quick else 100_000
    if min(args.runs, args.emails, args.webhooks, args.memory_cap or 1) < 1 or args.memory < 0:
        parser.error("--runs, --emails, --webhooks and --memory-cap must be >= 1, --memory >= 0")

    began = time.perf_counter()
    samples: list[Sample] | None = None
    with sinks(args.smtp_sink) as (smtp, http):
        chosen = [s for s in systems() if args.channel in {None, s.channel}]
        results = await measure(chosen, smtp, http, args)
        if args.memory:
            try:
                samples, memory_seconds = memory(http, args.memory, args.memory_cap)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"memory run failed: {exc}", file=sys.stderr)
    print(
        f"python {platform.python_version()}, aiosmtplib {aiosmtplib.__version__}, httpx "
        f"{httpx.__version__}, sniffio {_version('sniffio')}, apprise {_version('apprise')}; "
        f"SMTP sink: {args.smtp_sink}; "
        f"median of {args.runs} run(s) of {args.emails:,} emails "
        f"({args.emails * APPRISE_EMAIL_SCALE:,.0f} for apprise) and {args.webhooks:,} webhooks"
    )
    report(results)
    store = (
        "default MemoryStore"
        if args.memory_cap is None
        else f"MemoryStore(max_results={args.memory_cap:,})"
    )
    goals(results, samples, store, args.memory_cap or MemoryStore().max_results)
    if samples:
        trail = ", ".join(f"{n // 1000}k: {rss / 2**20:.0f}" for n, rss, _ in samples)
        print(f"  RSS MiB by sends ({memory_seconds:.0f} s): {trail}")
        if len(samples) > 2:
            (n0, _, t0), (n1, _, t1) = samples[0], samples[1]
            (m0, _, u0), (m1, _, u1) = samples[-2], samples[-1]
            print(
                f"  sends/s in the memory run: first step {(n1 - n0) / (t1 - t0):,.0f}, "
                f"last step {(m1 - m0) / (u1 - u0):,.0f}"
            )
    print(f"\n({time.perf_counter() - began:.0f} s)", file=sys.stderr)


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except ImportError:  # not installed: say so (httpcore runs slower without sniffio)
        return "not installed"


if __name__ == "__main__":
    asyncio.run(main())
