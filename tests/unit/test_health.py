"""HealthRegistry aggregation, per-check timeouts and the application/health+json shape."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable

import pytest

from dotmac.communications.errors import ConfigurationError
from dotmac.communications.observability import (
    HEALTH_CONTENT_TYPE,
    CheckResult,
    HealthRegistry,
    HealthReport,
    redis_check,
)
from dotmac.communications.testing import FakeClock


async def passing() -> bool:
    return True


async def silent() -> None:
    return None


async def failing() -> bool:
    return False


async def warning() -> CheckResult:
    return CheckResult("warn", "lag is high", observed_value=1200, observed_unit="messages")


@pytest.fixture
def registry(clock: FakeClock) -> HealthRegistry:
    return HealthRegistry(clock=clock, version="1.2.3", service_id="comms-1")


async def test_all_passing_is_pass_200(registry: HealthRegistry) -> None:
    """Passing checks (True or None) make a pass report served with 200."""
    registry.register("app:ready", passing)
    registry.register("queue:depth", silent)
    report = await registry.check()
    assert report.status == "pass"
    assert report.http_status == 200
    assert {name: o.status for name, o in report.checks.items()} == {
        "app:ready": "pass",
        "queue:depth": "pass",
    }


async def test_health_json_shape(registry: HealthRegistry, clock: FakeClock) -> None:
    """to_dict() follows draft-inadarei-api-health-check: status, version, checks as lists."""
    registry.register("redis:ping", passing, component_type="datastore")
    registry.register("events:lag", warning)
    body = (await registry.check()).to_dict()
    assert body == {
        "status": "warn",
        "version": "1.2.3",
        "serviceId": "comms-1",
        "output": "events:lag: warn",
        "checks": {
            "redis:ping": [
                {"componentType": "datastore", "status": "pass", "time": "2023-11-14T22:13:20.000Z"}
            ],
            "events:lag": [
                {
                    "observedValue": 1200,
                    "observedUnit": "messages",
                    "status": "warn",
                    "time": "2023-11-14T22:13:20.000Z",
                    "output": "lag is high",
                }
            ],
        },
    }
    assert clock.time() == 1_700_000_000.0


async def test_output_is_left_out_of_passing_checks(registry: HealthRegistry) -> None:
    """A passing check's output is omitted, as the draft asks."""

    async def chatty() -> CheckResult:
        return CheckResult("pass", "all good", component_id="node-1")

    registry.register("app:chatty", chatty)
    [entry] = (await registry.check()).to_dict()["checks"]["app:chatty"]
    assert "output" not in entry
    assert entry["componentId"] == "node-1"


async def test_warn_is_200(registry: HealthRegistry) -> None:
    """A warning check makes the report warn, still served with 200."""
    registry.register("app:ready", passing)
    registry.register("events:lag", warning)
    report = await registry.check()
    assert report.status == "warn"
    assert report.http_status == 200


async def test_critical_failure_is_fail_503(registry: HealthRegistry) -> None:
    """A critical check returning False fails the report with 503."""
    registry.register("app:ready", passing)
    registry.register("smtp:connect", failing)
    report = await registry.check()
    assert report.status == "fail"
    assert report.http_status == 503
    assert report.checks["smtp:connect"].output == "check returned False"
    assert report.to_dict()["output"] == "smtp:connect: fail"


async def test_non_critical_failure_only_warns(registry: HealthRegistry) -> None:
    """A failing non-critical check turns the report to warn, its own entry still says fail."""
    registry.register("app:ready", passing)
    registry.register("push:provider", failing, critical=False)
    report = await registry.check()
    assert report.status == "warn"
    assert report.http_status == 200
    assert report.checks["push:provider"].status == "fail"


async def test_empty_registry_passes(registry: HealthRegistry) -> None:
    """With no checks the service reports pass and an empty checks object."""
    report = await registry.check()
    assert report.status == "pass"
    assert report.to_dict()["checks"] == {}


async def test_hanging_check_fails_within_its_timeout(registry: HealthRegistry) -> None:
    """A check that never returns reports "timed out after 0.05s" without holding the report."""

    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True  # pragma: no cover - never reached

    registry.register("slow:thing", hangs, timeout=0.05)
    registry.register("app:ready", passing)
    started = time.monotonic()
    report = await registry.check()
    assert time.monotonic() - started < 1.0
    assert report.status == "fail"
    assert report.checks["slow:thing"].output == "timed out after 0.05s"
    assert report.checks["app:ready"].status == "pass"


async def test_check_ignoring_cancellation_is_not_waited_for(registry: HealthRegistry) -> None:
    """A check that swallows its cancellation still reports fail at its timeout."""
    finished = asyncio.Event()

    async def stubborn() -> bool:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # refuses to stop promptly
        finished.set()
        return True

    registry.register("stubborn:check", stubborn, timeout=0.05)
    started = time.monotonic()
    report = await registry.check()
    assert time.monotonic() - started < 0.25
    assert report.checks["stubborn:check"].status == "fail"
    await asyncio.wait_for(finished.wait(), 2)


async def test_raising_check_fails_with_type_and_message(registry: HealthRegistry) -> None:
    """An exception from a check becomes that check's failure; check() itself never raises."""

    async def broken() -> bool:
        raise RuntimeError("disk on fire")

    async def wrong_type() -> int:
        return 42

    registry.register("disk:space", broken)
    registry.register("odd:check", wrong_type)  # type: ignore[arg-type]
    report = await registry.check()
    assert report.status == "fail"
    assert report.checks["disk:space"].output == "RuntimeError: disk on fire"
    assert report.checks["odd:check"].output is not None
    assert report.checks["odd:check"].output.startswith("TypeError: a health check must return")


async def test_checks_run_concurrently(registry: HealthRegistry) -> None:
    """Checks run at the same time: one can wait for another to start."""
    first_started = asyncio.Event()

    async def first() -> bool:
        first_started.set()
        return True

    async def second() -> bool:
        await first_started.wait()
        return True

    registry.register("b:second", second, timeout=1.0)
    registry.register("a:first", first, timeout=1.0)
    assert (await registry.check()).status == "pass"


async def test_time_and_duration_come_from_the_clock(clock: FakeClock) -> None:
    """Timestamps and durations are read from the injected clock."""

    async def takes_a_while() -> bool:
        clock.advance(1.5)
        return True

    registry = HealthRegistry(clock=clock)
    registry.register("app:slow", takes_a_while)
    outcome = (await registry.check()).checks["app:slow"]
    assert outcome.duration == 1.5
    assert outcome.time == 1_700_000_001.5


@pytest.mark.parametrize("name", ["", "redis", "redis:", ":ping", "a:b:c", "redis :ping"])
def test_bad_names_are_rejected(registry: HealthRegistry, name: str) -> None:
    """Check names must be component:measurement; the error names the bad one."""
    with pytest.raises(ValueError, match=f"got {name!r}"):
        registry.register(name, passing)


def test_bad_timeout_and_duplicates_are_rejected(registry: HealthRegistry) -> None:
    """A non-positive timeout or a second check under one name raises ValueError."""
    with pytest.raises(ValueError, match="timeout must be > 0"):
        registry.register("app:ready", passing, timeout=0)
    registry.register("app:ready", passing)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("app:ready", passing)


async def test_unregister(registry: HealthRegistry) -> None:
    """Unregistering removes a check; an unknown name raises KeyError."""
    registry.register("smtp:connect", failing)
    registry.register("app:ready", passing)
    registry.unregister("smtp:connect")
    assert registry.names == ["app:ready"]
    assert (await registry.check()).status == "pass"
    with pytest.raises(KeyError, match="smtp:connect"):
        registry.unregister("smtp:connect")


def test_check_result_rejects_unknown_status() -> None:
    """CheckResult accepts only pass, warn and fail."""
    with pytest.raises(ValueError, match="status must be"):
        CheckResult("ok")  # type: ignore[arg-type]


def test_report_json_and_content_type() -> None:
    """A report serialises to compact JSON and is served as application/health+json."""
    report = HealthReport(status="fail", description="comms")
    assert json.loads(report.to_json()) == {"status": "fail", "description": "comms", "checks": {}}
    assert report.http_status == 503
    assert HEALTH_CONTENT_TYPE == HealthReport.CONTENT_TYPE == "application/health+json"


def test_redis_check_rejects_bad_urls() -> None:
    """A non-Redis URL is a configuration error at registration time, not a failing check."""
    with pytest.raises(ConfigurationError, match="unsupported Redis URL scheme"):
        redis_check("http://localhost:6379")


async def test_cancelling_check_cancels_running_checks(registry: HealthRegistry) -> None:
    """Cancelling check() (a request that went away) cancels the checks still running."""
    cancelled = asyncio.Event()

    async def slow() -> bool:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True  # pragma: no cover - never reached

    registry.register("slow:check", slow, timeout=5)
    running = asyncio.ensure_future(registry.check())
    await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_sync_check_results_fail_instead_of_crashing(registry: HealthRegistry) -> None:
    """A plain function returning a value, or raising, fails its check; the report still comes."""

    def explodes() -> bool:
        raise RuntimeError("no config")

    registry.register("sync:value", lambda: True)  # type: ignore[arg-type,return-value]
    registry.register("sync:raises", explodes)  # type: ignore[arg-type]
    registry.register("app:ready", passing)
    report = await registry.check()
    assert report.status == "fail"
    value = report.checks["sync:value"]
    assert value.status == "fail"
    assert value.output == (
        "TypeError: health check 'sync:value' returned True, not an awaitable "
        "(register an async function)"
    )
    assert report.checks["sync:raises"].output == "RuntimeError: no config"
    assert report.checks["app:ready"].status == "pass"


async def test_callables_returning_awaitables_are_checks(registry: HealthRegistry) -> None:
    """A plain function returning a coroutine and an object with an async __call__ are checks."""

    def ping() -> Awaitable[bool]:
        return passing()

    class Probe:
        async def __call__(self) -> CheckResult:
            return CheckResult("warn", "degraded")

    registry.register("plain:ping", ping)
    registry.register("object:probe", Probe())
    report = await registry.check()
    assert report.checks["plain:ping"].status == "pass"
    assert report.checks["object:probe"].output == "degraded"


def test_non_callable_check_is_rejected(registry: HealthRegistry) -> None:
    """Registering something that cannot be called raises TypeError naming the check."""
    with pytest.raises(TypeError, match="health check 'app:ready': check must be callable"):
        registry.register("app:ready", True)  # type: ignore[arg-type]
    assert registry.names == []


async def test_check_raising_cancelled_error_fails_only_itself(registry: HealthRegistry) -> None:
    """A check raising CancelledError (awaited or when called) fails; check() is not cancelled."""

    async def gives_up() -> bool:
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    def refuses() -> bool:
        raise asyncio.CancelledError

    registry.register("async:cancelled", gives_up)
    registry.register("sync:cancelled", refuses)  # type: ignore[arg-type]
    registry.register("app:ready", passing)
    report = await registry.check()
    assert report.status == "fail"
    assert report.checks["async:cancelled"].status == "fail"
    assert report.checks["async:cancelled"].output == "CancelledError: the check was cancelled"
    assert report.checks["sync:cancelled"].status == "fail"
    assert report.checks["sync:cancelled"].output is not None
    assert report.checks["sync:cancelled"].output.startswith("CancelledError")
    assert report.checks["app:ready"].status == "pass"
