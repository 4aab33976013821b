"""``dotmac-comms``: inspect configuration and health from the command line.

Exit codes: 0 success, 1 unhealthy (or, for ``serve``, the gateway cannot start), 2 invalid
configuration or usage. ``serve`` runs the WebSocket gateway until SIGINT/SIGTERM. Later
commands (``send``, ``dlq``) arrive with the parts they drive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from dotenv import dotenv_values

from . import __version__
from ._config_docs import env_example, safe_dump, unknown_variables
from .config import CommunicationsConfig
from .errors import CommunicationsError, ConfigurationError
from .observability import HealthRegistry, redis_check

__all__ = ["build_health_registry", "main"]

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dotmac-comms", description="dotmac-communications command line."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="show or check the configuration")
    config_cmd = config.add_subparsers(dest="config_command", required=True)
    config_cmd.add_parser("show", help="print the resolved configuration as JSON (secrets masked)")
    config_cmd.add_parser("check", help="validate the configuration; exit 2 when invalid")
    config_cmd.add_parser("env-example", help="print .env.example for this version")
    serve = commands.add_parser(
        "serve", help="run the WebSocket gateway (with /health and /metrics) until SIGINT/SIGTERM"
    )
    serve.add_argument("--host", help="listen address (default: websockets.host)")
    serve.add_argument("--port", type=int, help="listen port, 0 for any (default: websockets.port)")
    health = commands.add_parser("health", help="run the health checks once (health+json)")
    health.add_argument(
        "--timeout", type=float, default=None, help="per-check timeout (default: config)"
    )
    return parser


def build_health_registry(
    config: CommunicationsConfig, *, timeout: float | None = None
) -> HealthRegistry:
    """The checks the configuration implies: one ``redis:<section>`` ping per Redis in use."""
    registry = HealthRegistry(version=__version__, service_id=config.observability.service_name)
    per_check = timeout or config.observability.health_check_timeout
    # One check per distinct Redis: "redis:ping" for the shared one, "redis:<section>" for a
    # section that points elsewhere.
    urls: dict[str, str] = {}
    sections = (
        ("ping", config.redis_url),
        ("events", config.events.redis_url if config.events.backend == "redis" else None),
        ("notifications", config.notifications.redis_url),
        ("websockets", config.websockets.redis_url),
    )
    for section, url in sections:
        if url:
            urls.setdefault(url, f"redis:{section}")
    for url, name in urls.items():
        registry.register(name, redis_check(url, name=name), timeout=per_check)
    return registry


def _write(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()  # serve's banner must reach a piped reader while it runs


async def _health(config: CommunicationsConfig, per_check: float | None) -> int:
    report = await build_health_registry(config, timeout=per_check).check()
    _write(json.dumps(report.to_dict(), indent=2))
    return EXIT_OK if report.http_status == 200 else EXIT_UNHEALTHY


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "config" and args.config_command == "env-example":
        _write(env_example())
        return EXIT_OK
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = CommunicationsConfig()
    except ConfigurationError as exc:
        _write(f"dotmac-comms: {exc}", err=True)
        return EXIT_USAGE
    for item in caught:
        _write(f"dotmac-comms: warning: {item.message}", err=True)
    for name in unknown_variables(dotenv=dotenv_values(".env") if Path(".env").exists() else None):
        _write(f"dotmac-comms: warning: {name} is not a dotmac-communications setting (ignored)",
               err=True)  # fmt: skip
    if args.command == "config":
        if args.config_command == "show":
            _write(safe_dump(config))
        else:
            _write(
                f"configuration OK: environment={config.environment} "
                f"events.backend={config.events.backend} "
                f"redis={'configured' if config.redis_url else 'not configured'}"
            )
        return EXIT_OK
    if args.command == "serve":
        return asyncio.run(_serve(config, args.host, args.port))
    return asyncio.run(_health(config, args.timeout))


async def _serve(config: CommunicationsConfig, host: str | None, port: int | None) -> int:
    from .observability import configure_logging  # noqa: PLC0415
    from .websockets import WebSocketGateway  # noqa: PLC0415 -- only serve needs the gateway

    configure_logging(config.log_level, config.log_format or "json")
    settings = config.websockets
    if settings.jwt_secret is None and not settings.allow_anonymous:
        if config.environment != "development":
            _write(
                "dotmac-comms: serve needs websockets.jwt_secret (DOTMAC_WEBSOCKETS__JWT_SECRET) "
                f"outside development (environment={config.environment})",
                err=True,
            )
            return EXIT_USAGE
        settings = settings.model_copy(update={"allow_anonymous": True})
        _write(
            "dotmac-comms: DEVELOPMENT MODE: no websockets.jwt_secret is set, so the gateway "
            "accepts ANONYMOUS clients; set DOTMAC_WEBSOCKETS__JWT_SECRET before exposing it",
            err=True,
        )
    try:
        gateway = WebSocketGateway.from_config(settings)
    except ConfigurationError as exc:
        _write(f"dotmac-comms: {exc}", err=True)
        return EXIT_USAGE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gateway.start(host, port)
    except CommunicationsError as exc:  # the port is taken, or Redis cannot be reached
        _write(f"dotmac-comms: the gateway cannot start: {exc}", err=True)
        return EXIT_UNHEALTHY
    try:
        where = f"{host or settings.host}:{gateway.port}"
        _write(
            f"dotmac-comms: gateway listening on ws://{where}{settings.path} "
            f"(backend {gateway.backend.name}; health http://{where}/health, "
            f"metrics http://{where}/metrics)"
        )
        await stop.wait()
        _write("dotmac-comms: stopping (draining connections)")
    finally:
        await gateway.stop()
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
