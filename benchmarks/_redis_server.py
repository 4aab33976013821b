"""A throwaway ``redis-server`` for the benchmarks (or the one ``DOTMAC_BENCH_REDIS_URL`` names)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def bench_redis(
    children: list[subprocess.Popen[bytes]] | None = None,
) -> Iterator[tuple[str, int | None] | None]:
    """Yield ``(url, pid)``: DOTMAC_BENCH_REDIS_URL (pid None), else a throwaway redis-server
    on a free loopback port without persistence, stopped afterwards; ``None`` without either.

    Args:
        children: The server process is appended here too (a caller's kill-on-signal list).
    """
    given = os.environ.get("DOTMAC_BENCH_REDIS_URL")
    if given:
        yield given, None
        return
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(exe):
        yield None
        return
    port = free_port()
    workdir = tempfile.TemporaryDirectory(prefix="dotmac-bench-redis-")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", workdir.name, "--daemonize", "no"]
    proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if children is not None:
        children.append(proc)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        for _ in range(100):  # up to ~10 s
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"redis-server on port {port} did not answer within 10s")
        client.close()
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        workdir.cleanup()


def server_version(url: str) -> str:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()
