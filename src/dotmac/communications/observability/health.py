"""Health checks: a registry of named async checks and a report in ``application/health+json``.

Each check is keyed ``component:measurement`` (``redis:ping``, ``smtp:connection``) as in
draft-inadarei-api-health-check, runs with its own timeout, and reports ``pass``, ``warn`` or
``fail``. The report's status is the worst of the critical checks; a failing non-critical check
makes it ``warn``. ``pass`` and ``warn`` are served with HTTP 200, ``fail`` with 503::

    registry = HealthRegistry(version="1.2.0")
    registry.register("redis:ping", redis_check("redis://localhost:6379/0"), timeout=1.0)
    report = await registry.check()
    return JSONResponse(report.to_dict(), report.http_status, media_type=HEALTH_CONTENT_TYPE)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import redis.asyncio as aioredis

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications._redis import create_redis_client, redis_errors, validate_redis_url
from dotmac.communications.errors import CommunicationsError

__all__ = [
    "CONTENT_TYPE",
    "CheckOutcome",
    "CheckResult",
    "HealthRegistry",
    "HealthReport",
    "HealthStatus",
    "redis_check",
]

CONTENT_TYPE = "application/health+json"
"""Media type of :meth:`HealthReport.to_dict` served as JSON."""

HealthStatus = Literal["pass", "warn", "fail"]
_STATUSES: tuple[HealthStatus, ...] = ("pass", "warn", "fail")
_RANK: dict[str, int] = {status: rank for rank, status in enumerate(_STATUSES)}
_NAME = re.compile(r"^[^:\s]+:[^:\s]+$")


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What a check returns when a bare ``True``/``False`` says too little.

    Attributes:
        status: ``"pass"``, ``"warn"`` or ``"fail"``.
        output: Why it is not passing (shown for warn and fail only, as the draft says).
        observed_value: A measurement (latency, lag, queue depth).
        observed_unit: Unit of ``observed_value`` (``"ms"``, ``"messages"``).
        component_type: ``"datastore"``, ``"system"``, ``"component"``, ...
        component_id: Identifies the instance checked (a host, a stream name).
    """

    status: HealthStatus
    output: str | None = None
    observed_value: float | int | str | None = None
    observed_unit: str | None = None
    component_type: str | None = None
    component_id: str | None = None

    def __post_init__(self) -> None:
        if self.status not in _RANK:
            raise ValueError(f"status must be 'pass', 'warn' or 'fail', got {self.status!r}")


CheckFunction = Callable[[], Awaitable["CheckResult | bool | None"]]
"""An async check: returns a :class:`CheckResult`, ``True``/``None`` (pass) or ``False`` (fail).

Any callable returning an awaitable will do: an ``async def`` function, an object with an async
``__call__``, or a plain function such as ``lambda: client.ping()``. A check that returns a plain
value instead reports ``fail``: it ran synchronously, where its timeout could not bound it.
"""


@dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    check: CheckFunction
    timeout: float
    critical: bool
    component_type: str | None


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """The result of one check in a :class:`HealthReport`."""

    name: str
    status: HealthStatus
    time: float
    """Wall-clock time the check finished (seconds since the epoch)."""
    duration: float
    """Seconds the check took."""
    critical: bool = True
    output: str | None = None
    observed_value: float | int | str | None = None
    observed_unit: str | None = None
    component_type: str | None = None
    component_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the check's entry in ``application/health+json`` form (None fields left out)."""
        entry: dict[str, Any] = {
            "componentId": self.component_id,
            "componentType": self.component_type,
            "observedValue": self.observed_value,
            "observedUnit": self.observed_unit,
            "status": self.status,
            "time": _iso(self.time),
            # The draft asks to leave output out of passing checks.
            "output": self.output if self.status != "pass" else None,
        }
        return {k: v for k, v in entry.items() if v is not None}


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The outcome of :meth:`HealthRegistry.check`."""

    CONTENT_TYPE: ClassVar[str] = CONTENT_TYPE

    status: HealthStatus
    checks: Mapping[str, CheckOutcome] = field(default_factory=dict)
    version: str | None = None
    service_id: str | None = None
    description: str | None = None

    @property
    def http_status(self) -> int:
        """HTTP status to serve the report with: 200 for pass and warn, 503 for fail."""
        return 503 if self.status == "fail" else 200

    def to_dict(self) -> dict[str, Any]:
        """Return the report in ``application/health+json`` shape (draft-inadarei-api-health-check).

        Returns:
            ``{"status", "version"?, "serviceId"?, "description"?, "output"?, "checks": {name:
            [entry]}}``; ``output`` names the checks that are not passing.
        """
        optional = {
            "version": self.version,
            "serviceId": self.service_id,
            "description": self.description,
        }
        body: dict[str, Any] = {"status": self.status}
        body.update({k: v for k, v in optional.items() if v is not None})
        failing = [f"{name}: {o.status}" for name, o in self.checks.items() if o.status != "pass"]
        if failing:
            body["output"] = "; ".join(failing)
        body["checks"] = {name: [o.to_dict()] for name, o in self.checks.items()}
        return body

    def to_json(self) -> str:
        """Return :meth:`to_dict` as compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


class HealthRegistry:
    """Named async health checks, run concurrently each within its own timeout.

    Args:
        clock: Source of timestamps and durations (a fake clock in tests).
        version: Service version reported as ``version``.
        service_id: Reported as ``serviceId``.
        description: Reported as ``description``.
    """

    def __init__(
        self,
        *,
        clock: Clock = system_clock,
        version: str | None = None,
        service_id: str | None = None,
        description: str | None = None,
    ) -> None:
        self._clock = clock
        self._version = version
        self._service_id = service_id
        self._description = description
        self._checks: dict[str, _Registered] = {}

    @property
    def names(self) -> list[str]:
        """Names of the registered checks, in registration order."""
        return list(self._checks)

    def register(
        self,
        name: str,
        check: CheckFunction,
        *,
        timeout: float = 2.0,
        critical: bool = True,
        component_type: str | None = None,
    ) -> None:
        """Register ``check`` under ``name``.

        Args:
            name: ``component:measurement``, for example ``"redis:ping"``.
            check: ``async () -> CheckResult | bool | None``, such as :func:`redis_check`'s;
                any callable returning an awaitable (see :data:`CheckFunction`).
            timeout: Seconds the check may take before it reports ``fail``.
            critical: Whether a failure fails the whole report (otherwise it only warns).
            component_type: Reported as ``componentType`` unless the result gives its own.

        Raises:
            TypeError: ``check`` is not callable.
            ValueError: ``name`` is not ``component:measurement`` (one colon, no spaces) or is
                already registered, or ``timeout`` is not positive.
        """
        if not callable(check):
            raise TypeError(f"health check {name!r}: check must be callable, got {check!r}")
        if not _NAME.match(name):
            raise ValueError(
                f"health check name must be 'component:measurement' (one colon, no spaces), "
                f"got {name!r}"
            )
        if not timeout > 0:
            raise ValueError(f"health check {name!r}: timeout must be > 0, got {timeout}")
        if name in self._checks:
            raise ValueError(f"health check {name!r} is already registered")
        self._checks[name] = _Registered(name, check, timeout, critical, component_type)

    def unregister(self, name: str) -> None:
        """Remove the check called ``name``.

        Raises:
            KeyError: No check has that name.
        """
        if name not in self._checks:
            raise KeyError(f"no health check named {name!r}")
        del self._checks[name]

    async def check(self) -> HealthReport:
        """Run every check concurrently and aggregate the results.

        Never raises because of a check: a check that raises (when called or when awaited,
        ``CancelledError`` included), returns ``False``, returns something other than an
        awaitable or outlives its timeout reports ``fail``. Cancelling ``check()`` itself
        cancels the checks still running and propagates.

        Returns:
            The report; its status is the worst of the critical checks, or ``warn`` when only
            non-critical checks fail.
        """
        checks = list(self._checks.values())
        outcomes = await asyncio.gather(*(self._run(c) for c in checks))
        worst = 0
        for outcome in outcomes:
            rank = _RANK[outcome.status]
            worst = max(worst, rank if outcome.critical else min(rank, _RANK["warn"]))
        return HealthReport(
            status=_STATUSES[worst],
            checks={o.name: o for o in outcomes},
            version=self._version,
            service_id=self._service_id,
            description=self._description,
        )

    async def _run(self, spec: _Registered) -> CheckOutcome:
        started = self._clock.monotonic()
        result = await _outcome_of(spec)
        return CheckOutcome(
            name=spec.name,
            status=result.status,
            time=self._clock.time(),
            duration=self._clock.monotonic() - started,
            critical=spec.critical,
            output=result.output,
            observed_value=result.observed_value,
            observed_unit=result.observed_unit,
            component_type=result.component_type or spec.component_type,
            component_id=result.component_id,
        )


async def _outcome_of(spec: _Registered) -> CheckResult:
    # A health check must report, not crash the report: whatever a check raises (a vendor error,
    # a bug in host code), when called or when awaited, becomes that check's failure.
    try:
        # Typed as object: a check registered against its annotation may return anything.
        awaitable: object = spec.check()
    # Broad on purpose (see above). No await has run yet, so a CancelledError here was raised
    # by the check, not by check() being cancelled.
    except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001
        return _failure(exc)
    if not inspect.isawaitable(awaitable):
        return CheckResult(
            "fail",
            f"TypeError: health check {spec.name!r} returned {awaitable!r}, not an awaitable "
            f"(register an async function)",
        )
    task = asyncio.ensure_future(awaitable)
    # asyncio.wait rather than a timeout around the await: a check that swallows
    # cancellation must not hold the whole report past its own timeout.
    try:
        done, _ = await asyncio.wait({task}, timeout=spec.timeout)
    finally:
        # Timed out, or check() itself was cancelled: stop the check, collect it later.
        if not task.done():
            task.cancel()
            task.add_done_callback(_consume)
    if not done:
        return CheckResult("fail", f"timed out after {spec.timeout:g}s")
    if task.cancelled():
        # check() was not cancelled (the wait returned): the check cancelled itself, or
        # raised CancelledError. Reported, not propagated, so the report still comes back.
        return CheckResult("fail", "CancelledError: the check was cancelled")
    try:
        return _normalise(task.result())
    except Exception as exc:  # noqa: BLE001 -- see above: a failing check is reported
        return _failure(exc)


def _failure(exc: BaseException) -> CheckResult:
    return CheckResult("fail", f"{type(exc).__name__}: {exc}")


def _normalise(value: CheckResult | bool | None) -> CheckResult:
    if value is None or value is True:
        return CheckResult("pass")
    if value is False:
        return CheckResult("fail", "check returned False")
    if isinstance(value, CheckResult):
        return value
    raise TypeError(f"a health check must return CheckResult, bool or None, not {value!r}")


def _consume(task: asyncio.Future[Any]) -> None:
    # Retrieve the abandoned check's outcome so asyncio does not log it as never retrieved.
    if not task.cancelled():
        task.exception()


def _iso(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def redis_check(
    url_or_client: str | aioredis.Redis,
    *,
    name: str = "redis:ping",
    clock: Clock = system_clock,
) -> CheckFunction:
    """A check that PINGs Redis and reports the round trip in ms as ``observedValue``.

    Given a URL, each run opens a fresh connection and closes it (a health check every few
    seconds needs no pool, and leaves nothing to clean up); given a client, it is reused and
    stays the caller's to close. Redis errors become a ``fail`` result naming ``name``; the
    registry's timeout bounds the whole run.

    Args:
        url_or_client: ``redis://`` URL or a ready asyncio client.
        name: Check name, used in failure messages.
        clock: Source of the latency measurement.

    Returns:
        An async check for :meth:`HealthRegistry.register`.

    Raises:
        ConfigurationError: ``url_or_client`` is a URL with an unsupported scheme or no host.
    """
    if isinstance(url_or_client, str):
        validate_redis_url(url_or_client)

    async def ping() -> CheckResult:
        client = (
            create_redis_client(url_or_client) if isinstance(url_or_client, str) else url_or_client
        )
        try:
            started = clock.monotonic()
            with redis_errors(f"health check {name}"):
                await client.ping()
            elapsed_ms = round((clock.monotonic() - started) * 1000, 3)
        except CommunicationsError as exc:
            return CheckResult("fail", str(exc), component_type="datastore")
        finally:
            if client is not url_or_client:
                await client.aclose()
        return CheckResult(
            "pass", observed_value=elapsed_ms, observed_unit="ms", component_type="datastore"
        )

    return ping
