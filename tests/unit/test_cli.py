"""dotmac-comms: config show/check/env-example and health, in-process and as a real command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _support.redis_server import free_port
from dotmac.communications.cli import main


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory so no stray .env is read."""
    monkeypatch.chdir(tmp_path)


def test_config_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    """config check exits 0 and summarises the embedded defaults."""
    assert main(["config", "check"]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_config_check_bad(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """config check exits 2 and lists the bad variables on stderr."""
    monkeypatch.setenv("DOTMAC_EVENTS__MAXLEN", "-1")
    monkeypatch.setenv("DOTMAC_WEBSOCKETS__PATH", "ws")
    assert main(["config", "check"]) == 2
    err = capsys.readouterr().err
    assert "DOTMAC_EVENTS__MAXLEN" in err
    assert "DOTMAC_WEBSOCKETS__PATH" in err


def test_config_show_masks_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """config show prints JSON with secrets masked."""
    monkeypatch.setenv("DOTMAC_WEBSOCKETS__JWT_SECRET", "top-secret-value")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "top-secret-value" not in out
    assert json.loads(out)["websockets"]["jwt_secret"] == "**********"


def test_env_example_command(capsys: pytest.CaptureFixture[str]) -> None:
    """config env-example prints the generated .env.example."""
    assert main(["config", "env-example"]) == 0
    assert "DOTMAC_EVENTS__BACKEND=memory" in capsys.readouterr().out


def test_health_on_embedded_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """health passes with nothing running on the defaults."""
    assert main(["health"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pass"


@pytest.mark.redis
def test_health_with_real_redis(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """health pings the configured Redis and reports pass."""
    monkeypatch.setenv("DOTMAC_REDIS_URL", redis_url)
    assert main(["health"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "pass"
    assert report["checks"]["redis:ping"][0]["status"] == "pass"


def test_health_fails_when_redis_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """health exits 1 with status fail when the configured Redis does not answer."""
    monkeypatch.setenv("DOTMAC_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["health", "--timeout", "2"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "fail"
    assert report["checks"]["redis:ping"][0]["status"] == "fail"


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed dotmac-comms command works as a separate process."""
    exe = shutil.which("dotmac-comms", path=str(Path(sys.executable).parent))
    assert exe is not None, "dotmac-comms is not installed next to the interpreter"
    done = subprocess.run(
        [exe, "config", "check"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("dotmac-comms ")


def test_health_names_each_distinct_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sections pointing at different Redis servers get a check each (no name clash)."""
    monkeypatch.setenv("DOTMAC_NOTIFICATIONS__REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DOTMAC_WEBSOCKETS__REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["health", "--timeout", "1"]) == 1
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert set(checks) == {"redis:notifications", "redis:websockets"}


def test_config_check_reports_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """config check shows deprecation warnings and unknown DOTMAC_ names on stderr."""
    monkeypatch.setenv("DOTMAC_SMTP_HOST", "old")
    monkeypatch.setenv("DOTMAC_EVENTS_BACKEND", "redis")  # one underscore: a typo
    (tmp_path / ".env").write_text("DOTMAC_WEBSOCKET__PORT=1\n")
    assert main(["config", "check"]) == 0
    err = capsys.readouterr().err
    assert "DOTMAC_SMTP_HOST is deprecated" in err
    assert "DOTMAC_EVENTS_BACKEND is not a dotmac-communications setting" in err
    assert "DOTMAC_WEBSOCKET__PORT is not a dotmac-communications setting" in err
