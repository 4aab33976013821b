"""A consumer process for the multi-process event-bus tests (run as a script, never imported).

It joins ``--group`` on ``--pattern`` and, for each event it handles, RPUSHes a JSON record
``{"phase", "id", "attempt", "pid", "label"}`` onto the ``--results`` list: ``"start"`` before a
stall (only with ``--stall``) and ``"done"`` once the handler finishes. Once the bus has started
(its group is declared) it RPUSHes its pid onto ``<results>:ready``.

It stops cleanly on SIGTERM, after ``--exit-after`` handled events, or after ``--lifetime``
seconds at most, so a forgotten worker always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import redis.asyncio as aioredis

from dotmac.communications.events import Event, EventBus, RedisStreamsBackend


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--pattern", required=True)
    parser.add_argument("--results", required=True, help="Redis list receiving the records")
    parser.add_argument("--label", default="worker")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds spent per event")
    parser.add_argument("--stall", type=float, default=0.0, help="seconds to hang per event")
    parser.add_argument("--exit-after", type=int, default=0, help="stop after N events")
    parser.add_argument("--lifetime", type=float, default=60.0, help="stop after this long")
    parser.add_argument("--claim-idle", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--record-start", type=int, default=0, help="1: also record each start")
    return parser.parse_args()


async def _main(args: argparse.Namespace) -> None:
    pid = os.getpid()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    recorder = aioredis.Redis.from_url(args.url)
    handled = 0

    async def record(phase: str, event: Event) -> None:
        record = {
            "phase": phase,
            "id": event.id,
            "attempt": event.attempt,
            "pid": pid,
            "label": args.label,
            "key": event.key,
            "data": event.data,
        }
        await recorder.rpush(args.results, json.dumps(record))

    async def handle(event: Event) -> None:
        nonlocal handled
        if args.stall or args.record_start:
            await record("start", event)
        if args.stall:
            await asyncio.sleep(args.stall)
        if args.sleep:
            await asyncio.sleep(args.sleep)
        await record("done", event)
        handled += 1
        if args.exit_after and handled >= args.exit_after:
            stop.set()

    backend = RedisStreamsBackend(
        args.url, claim_idle=args.claim_idle, discovery_interval=0.1, trim_interval=0.5
    )
    bus = EventBus(backend, poll_interval=0.1, shutdown_timeout=2.0)
    bus.subscribe(args.pattern, handle, group=args.group, concurrency=args.concurrency)
    try:
        async with bus:
            await recorder.rpush(f"{args.results}:ready", pid)
            try:
                async with asyncio.timeout(args.lifetime):
                    await stop.wait()
            except TimeoutError:
                pass  # the lifetime is a safety net; the test decides whether that is a failure
    finally:
        await recorder.aclose()


if __name__ == "__main__":
    asyncio.run(_main(_arguments()))
