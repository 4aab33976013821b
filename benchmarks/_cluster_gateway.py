"""Gateway process of ``bench_cluster.py``: serves clients and publishes when told to.

    python benchmarks/_cluster_gateway.py

Configured from ``DOTMAC_WEBSOCKETS__*`` variables like any deployment (``bench_cluster.py``
sets ``BACKEND``, ``REDIS_URL`` and ``CHANNEL_PREFIX``); clients are anonymous and may subscribe
anywhere. Every published payload is ``{"n": .., "t": time.time(), ...}`` on channel ``bench``,
as ``_ws_clients.py`` expects. Lines on stdin drive it, lines on stdout answer:

    → port PORT             listening
    ← pub START COUNT       publish messages START..START+COUNT-1 (concurrently: they pipeline)
    ← lat RATE COUNT        publish COUNT messages paced at RATE/s
    → sent COUNT            the ``lat`` run has published its last message
    → error TEXT            a publish failed
    ← profile on|off        cProfile this process (only with DOTMAC_BENCH_PROFILE set)
    ← quit                  stop (profile, if any, written to $DOTMAC_BENCH_PROFILE.PID.prof)
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import os
import resource
import sys
import time
from typing import Any

from dotmac.communications.config import CommunicationsConfig
from dotmac.communications.websockets import AnonymousAuthenticator, WebSocketGateway

CHANNEL = "bench"


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _payload(n: int) -> dict[str, Any]:
    return {"n": n, "t": time.time(), "kind": "bench", "ok": True}


async def _publish(gateway: WebSocketGateway, start: int, count: int) -> None:
    results = await asyncio.gather(
        *(gateway.publish(CHANNEL, _payload(n)) for n in range(start, start + count)),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException):
            _say(f"error {type(result).__name__}: {result}")
            return


async def _paced(gateway: WebSocketGateway, rate: float, count: int) -> None:
    began = time.perf_counter()
    for n in range(count):
        delay = began + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await gateway.publish(CHANNEL, _payload(n))
        except Exception as exc:  # reported to the benchmark, which stops
            _say(f"error {type(exc).__name__}: {exc}")
            return
    _say(f"sent {count}")


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.getLogger("dotmac.communications.websockets").setLevel(logging.ERROR)
    settings = CommunicationsConfig().websockets
    gateway = WebSocketGateway.from_config(settings, authenticator=AnonymousAuthenticator())
    profile_path = os.environ.get("DOTMAC_BENCH_PROFILE")
    profiler = cProfile.Profile() if profile_path else None
    profiled = False
    async with gateway.serve("127.0.0.1", 0):
        _say(f"port {gateway.port}")
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                break
            if line[0] == "pub":
                await _publish(gateway, int(line[1]), int(line[2]))
            elif line[0] == "lat":
                await _paced(gateway, float(line[1]), int(line[2]))
            elif line[0] == "profile" and profiler is not None:
                if line[1] == "on":
                    profiler.enable()
                    profiled = True
                else:
                    profiler.disable()
    if profiler is not None and profiled:
        profiler.disable()
        profiler.dump_stats(f"{profile_path}.{os.getpid()}.prof")


if __name__ == "__main__":
    asyncio.run(main())
