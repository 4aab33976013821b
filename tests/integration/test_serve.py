"""``dotmac-comms serve`` as a subprocess: it listens, serves a real client and /health, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOTMAC_", "OTEL_"))}
    env["PYTHONPATH"] = SRC
    env.update(extra)
    return env


async def test_serve_runs_the_gateway_until_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dotmac.communications.cli", "serve", "--host", "127.0.0.1",
        "--port", "0", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
        cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", line)
        assert match, line
        port = int(match.group(1))
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:  # anonymous: development mode
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong"}
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 200
        assert health.json()["status"] == "pass"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "DEVELOPMENT MODE" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_refuses_anonymous_outside_development(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dotmac.communications.cli", "serve", "--port", "0"],
        env=_env(DOTMAC_ENVIRONMENT="production"), capture_output=True, text=True,
        timeout=30, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "jwt_secret" in done.stderr


def test_serve_reports_an_unreachable_redis_backend(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dotmac.communications.cli", "serve", "--port", "0"],
        env=_env(
            DOTMAC_WEBSOCKETS__BACKEND="redis",
            DOTMAC_WEBSOCKETS__REDIS_URL="redis://127.0.0.1:1/0",
            DOTMAC_WEBSOCKETS__ALLOW_ANONYMOUS="true",
        ),
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "the gateway cannot start" in done.stderr
    assert "Redis" in done.stderr
    assert "Traceback" not in done.stderr
