"""CircuitBreaker: sliding window, open/half-open/closed transitions, hooks, registry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dotmac.communications.errors import (
    BackendUnavailableError,
    CircuitOpenError,
    ConfigurationError,
    PermanentDeliveryError,
)
from dotmac.communications.observability import metrics
from dotmac.communications.resilience import (
    CircuitBreaker,
    CircuitBreakerRegistry,
    Permit,
    StateChange,
    circuit_breakers,
)
from dotmac.communications.testing import FakeClock


async def ok() -> str:
    return "ok"


async def boom() -> None:
    raise BackendUnavailableError("down")


def breaker(clock: FakeClock, **kwargs: object) -> CircuitBreaker:
    options: dict[str, object] = {
        "minimum_calls": 4,
        "window_size": 4,
        "reset_timeout": 10.0,
        "half_open_max_calls": 2,
    }
    options.update(kwargs)
    return CircuitBreaker("smtp", clock=clock, **options)  # type: ignore[arg-type]


async def trip(cb: CircuitBreaker, failures: int = 4) -> None:
    for _ in range(failures):
        with pytest.raises(BackendUnavailableError):
            await cb.call(boom)


async def test_stays_closed_below_minimum_calls(clock: FakeClock) -> None:
    """Failures fewer than minimum_calls never open the breaker."""
    cb = breaker(clock)
    await trip(cb, failures=3)
    assert cb.state == "closed"


async def test_opens_at_failure_rate_threshold(clock: FakeClock) -> None:
    """With minimum_calls outcomes and a failure rate >= threshold the breaker opens."""
    cb = breaker(clock, failure_rate_threshold=0.5)
    await cb.call(ok)
    await cb.call(ok)
    await trip(cb, failures=2)
    assert cb.state == "open"
    snap = cb.snapshot()
    assert (snap.calls, snap.failures, snap.failure_rate) == (4, 2, 0.5)


async def test_sliding_window_forgets_old_outcomes(clock: FakeClock) -> None:
    """Only the last window_size outcomes count."""
    cb = breaker(clock, minimum_calls=4, window_size=4, failure_rate_threshold=0.75)
    await trip(cb, failures=2)
    for _ in range(4):
        await cb.call(ok)
    await trip(cb, failures=2)
    assert cb.state == "closed"
    assert cb.snapshot().failure_rate == 0.5


async def test_open_rejects_with_retry_after(clock: FakeClock) -> None:
    """An open breaker raises CircuitOpenError with the time left, without calling fn."""
    cb = breaker(clock)
    await trip(cb)
    clock.advance(4.0)
    called = False

    async def fn() -> None:
        nonlocal called
        called = True

    with pytest.raises(CircuitOpenError) as info:
        await cb.call(fn)
    assert not called
    assert info.value.retry_after == pytest.approx(6.0)
    assert info.value.breaker_name == "smtp"
    assert metrics.value("dotmac.resilience.circuit_breaker.calls", {"outcome": "rejected"}) == 1


async def test_half_open_success_closes_with_fresh_window(clock: FakeClock) -> None:
    """After reset_timeout trial calls go through; all succeeding closes the breaker."""
    cb = breaker(clock)
    await trip(cb)
    clock.advance(10.0)
    assert await cb.call(ok) == "ok"
    assert cb.state == "half_open"
    assert await cb.call(ok) == "ok"
    assert cb.state == "closed"
    assert cb.snapshot().calls == 0


async def test_half_open_failure_reopens(clock: FakeClock) -> None:
    """Trials failing at the threshold open the breaker again for another reset_timeout."""
    cb = breaker(clock)
    await trip(cb)
    clock.advance(10.0)
    await cb.call(ok)
    with pytest.raises(BackendUnavailableError):
        await cb.call(boom)
    assert cb.state == "open"
    assert cb.snapshot().retry_after == pytest.approx(10.0)


async def test_half_open_limits_trial_calls(clock: FakeClock) -> None:
    """While half_open_max_calls trials are out, further calls are rejected."""
    cb = breaker(clock)
    await trip(cb)
    clock.advance(10.0)
    first, second = cb.allow(), cb.allow()
    assert first.is_trial
    assert second.is_trial
    with pytest.raises(CircuitOpenError) as info:
        cb.allow()
    assert info.value.retry_after is None
    first.record_success()
    second.record_success()
    assert cb.state == "closed"


async def test_cancelled_trial_releases_its_slot(clock: FakeClock) -> None:
    """A cancelled trial call frees its slot for another trial."""
    cb = breaker(clock, half_open_max_calls=1)
    await trip(cb)
    clock.advance(10.0)
    gate = asyncio.Event()

    async def hang() -> None:
        await gate.wait()

    task = asyncio.create_task(cb.call(hang))
    await asyncio.sleep(0)
    assert cb.snapshot().half_open_in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cb.snapshot().half_open_in_flight == 0
    assert await cb.call(ok) == "ok"
    assert cb.state == "closed"


async def test_lost_trials_count_as_failures_and_reopen(clock: FakeClock) -> None:
    """Trials unreported for reset_timeout count as failed: the breaker reopens, never sticks."""
    cb = breaker(clock)
    await trip(cb)
    clock.advance(10.0)
    lost = [cb.allow(), cb.allow()]
    clock.advance(9.0)
    with pytest.raises(CircuitOpenError):
        cb.allow()
    clock.advance(1.0)
    with pytest.raises(CircuitOpenError) as info:
        cb.allow()
    assert cb.state == "open"
    assert info.value.retry_after == pytest.approx(10.0)
    assert not any(p.active for p in lost)
    lost[0].record_success()  # a late outcome of a written-off trial is ignored
    clock.advance(10.0)
    cb.allow().record_success()
    cb.allow().record_success()
    assert cb.state == "closed"


async def test_lost_trial_is_written_off_alone(clock: FakeClock) -> None:
    """Only a trial older than reset_timeout frees its slot; a younger one still counts."""
    cb = breaker(clock)
    await trip(cb)
    clock.advance(10.0)
    lost = cb.allow()
    clock.advance(9.5)
    young = cb.allow()
    clock.advance(0.6)
    with pytest.raises(CircuitOpenError):  # the lost trial's failure and `young` fill both slots
        cb.allow()
    assert not lost.active
    assert young.active
    snap = cb.snapshot()
    assert (snap.calls, snap.failures, snap.half_open_in_flight) == (1, 1, 1)
    young.record_failure()
    assert cb.state == "open"


async def test_trial_past_reset_timeout_counts_until_written_off(clock: FakeClock) -> None:
    """A slow trial that reports before any call writes it off still decides the verdict."""
    cb = breaker(clock)
    await trip(cb)
    clock.advance(10.0)
    first, second = cb.allow(), cb.allow()
    clock.advance(25.0)
    first.record_success()
    second.record_success()
    assert cb.state == "closed"


async def test_record_on_error_still_frees_the_trial_slot(clock: FakeClock) -> None:
    """If record_on raises, its error propagates and the trial slot is released."""

    def record_on(exc: BaseException) -> bool:
        if isinstance(exc, KeyError):
            raise RuntimeError("record_on bug")
        return True

    cb = breaker(clock, half_open_max_calls=1, record_on=record_on)
    await trip(cb)
    clock.advance(10.0)
    with pytest.raises(RuntimeError, match="record_on bug"), cb.allow():
        raise KeyError("x")
    assert cb.snapshot().half_open_in_flight == 0
    assert await cb.call(ok) == "ok"
    assert cb.state == "closed"


async def test_slow_calls_open_the_breaker(clock: FakeClock) -> None:
    """Calls slower than slow_call_duration count towards the slow-call rate."""
    cb = breaker(clock, slow_call_duration=1.0, slow_call_rate_threshold=0.5)

    async def slow() -> str:
        await clock.sleep(2.0)
        return "late"

    await cb.call(ok)
    await cb.call(ok)
    await cb.call(slow)
    await cb.call(slow)
    assert cb.state == "open"
    assert cb.snapshot().slow_call_rate == 0.5


async def test_permanent_errors_do_not_count_by_default(clock: FakeClock) -> None:
    """A permanent library error is recorded as a success; other errors are failures."""
    cb = breaker(clock)

    async def rejected() -> None:
        raise PermanentDeliveryError("550 no such user")

    for _ in range(4):
        with pytest.raises(PermanentDeliveryError):
            await cb.call(rejected)
    assert cb.state == "closed"
    assert cb.snapshot().failures == 0

    async def bug() -> None:
        raise RuntimeError("bug")

    for _ in range(2):  # the window is now 2 "successes" and 2 failures: 50 %
        with pytest.raises(RuntimeError):
            await cb.call(bug)
    assert cb.state == "open"


async def test_record_on_decides_failures(clock: FakeClock) -> None:
    """A custom record_on replaces the default classification."""
    cb = breaker(clock, record_on=lambda exc: isinstance(exc, KeyError))
    await trip(cb)
    assert cb.state == "closed"


async def test_state_change_hooks_and_metrics(clock: FakeClock) -> None:
    """Listeners get every transition; a failing listener is logged, not raised."""
    cb = breaker(clock)
    changes: list[StateChange] = []

    @cb.on_state_change
    def broken(change: StateChange) -> None:
        raise RuntimeError("listener bug")

    cb.on_state_change(changes.append)
    await trip(cb)
    clock.advance(10.0)
    await cb.call(ok)
    await cb.call(ok)
    assert [(c.old, c.new) for c in changes] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert changes[0].name == "smtp"
    assert changes[0].at == clock.time() - 10.0
    attrs = {"name": "smtp", "from": "closed", "to": "open"}
    assert metrics.value("dotmac.resilience.circuit_breaker.state_changes", attrs) == 1
    assert metrics.value("dotmac.resilience.circuit_breaker.calls", {"outcome": "failure"}) == 4


async def test_reset_closes_and_ignores_calls_in_flight(clock: FakeClock) -> None:
    """reset() closes the breaker; permits granted before it no longer count."""
    cb = breaker(clock)
    before = cb.allow()
    await trip(cb)
    cb.reset()
    assert cb.state == "closed"
    before.record_failure()
    assert cb.snapshot().calls == 0


async def test_decorator_guards_and_keeps_name(clock: FakeClock) -> None:
    """@breaker guards an async function and keeps its metadata."""
    cb = breaker(clock)

    @cb
    async def send(to: str) -> str:
        """Send."""
        return to

    assert send.__name__ == "send"
    assert await send("x") == "x"
    with pytest.raises(TypeError, match="async"):
        cb(len)  # type: ignore[arg-type]


def test_permit_reports_once(clock: FakeClock) -> None:
    """Only a permit's first report counts."""
    cb = breaker(clock)
    permit = cb.allow()
    permit.record_failure()
    permit.record_success()
    permit.release()
    assert cb.snapshot().calls == 1
    assert cb.snapshot().failures == 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"failure_rate_threshold": 0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"slow_call_rate_threshold": 0}, "slow_call_rate_threshold"),
        ({"window_size": 0}, "window_size"),
        ({"minimum_calls": 30, "window_size": 20}, "minimum_calls"),
        ({"minimum_calls": 2.5}, "minimum_calls"),
        ({"reset_timeout": -1}, "reset_timeout"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"slow_call_duration": 0}, "slow_call_duration"),
    ],
)
def test_invalid_parameters_are_named(kwargs: dict[str, object], param: str) -> None:
    """Bad parameters raise ConfigurationError naming the parameter."""
    with pytest.raises(ConfigurationError, match=param):
        CircuitBreaker("x", **kwargs)  # type: ignore[arg-type]


def test_empty_name_is_rejected() -> None:
    """A breaker needs a name."""
    with pytest.raises(ConfigurationError, match="name"):
        CircuitBreaker("")


def test_registry_returns_one_breaker_per_name(clock: FakeClock) -> None:
    """get_or_create returns the same breaker; conflicting options are an error."""
    registry = CircuitBreakerRegistry()
    first = registry.get_or_create("sms", reset_timeout=5.0, clock=clock)
    assert registry.get_or_create("sms") is first
    assert registry.get_or_create("sms", reset_timeout=5.0) is first
    assert "sms" in registry
    assert registry.get("email") is None
    assert registry.snapshots()["sms"].state == "closed"
    with pytest.raises(ConfigurationError, match="reset_timeout"):
        registry.get_or_create("sms", reset_timeout=9.0)


def test_default_registry_is_shared() -> None:
    """The module-level registry hands out one breaker per name."""
    assert circuit_breakers.get_or_create("push") is circuit_breakers.get_or_create("push")


@dataclass
class Held:
    """A permit the state machine holds, and what the model knows about it."""

    permit: Permit
    period: int  # state changes seen before it was granted
    deadline: float  # when the breaker may write it off as lost


class BreakerMachine(RuleBasedStateMachine):
    """Random successes, failures, cancellations, lost calls and time; the invariants hold."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.cb = CircuitBreaker(
            "machine",
            minimum_calls=3,
            window_size=5,
            reset_timeout=10.0,
            half_open_max_calls=2,
            clock=self.clock,
        )
        self.held: list[Held] = []
        self.period = 0
        # Calls in the window at each closed -> open change (listener errors are only logged,
        # so the check happens in an invariant).
        self.calls_when_opened: list[int] = []
        self.cb.on_state_change(self.note_transition)

    def note_transition(self, change: StateChange) -> None:
        self.period += 1
        if change.old == "closed" and change.new == "open":
            self.calls_when_opened.append(self.cb.snapshot().calls)

    def grant(self) -> None:
        permit = self.cb.allow()
        now = self.clock.monotonic()
        self.held.append(Held(permit, self.period, now + self.cb.reset_timeout))

    def live_trials(self) -> list[Held]:
        """Unreported trials of the current half-open period too young to be written off."""
        now = self.clock.monotonic()
        return [
            h
            for h in self.held
            if h.permit.is_trial and h.period == self.period and now < h.deadline
        ]

    @rule()
    def start_call(self) -> None:
        try:
            self.grant()
        except CircuitOpenError:
            assert self.cb.state in {"open", "half_open"}

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0), outcome=st.sampled_from(["ok", "fail", "cancel"]))
    def finish_call(self, index: int, outcome: str) -> None:
        held = self.held[index % len(self.held)]
        live = any(h is held for h in self.live_trials())
        self.held.remove(held)
        period, before = self.period, self.cb.snapshot()
        if outcome == "ok":
            held.permit.record_success()
        elif outcome == "fail":
            held.permit.record_failure()
        else:
            held.permit.release()
        if not live:
            return
        after = self.cb.snapshot()
        if outcome == "cancel":
            assert after.half_open_in_flight == before.half_open_in_flight - 1
        else:  # a counted trial's outcome is never dropped
            assert self.period != period or after.calls == before.calls + 1

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0))
    def lose_call(self, index: int) -> None:
        self.held.pop(index % len(self.held))  # never reports

    @rule(seconds=st.floats(min_value=0.0, max_value=15.0))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def never_stuck(self) -> None:
        self.clock.advance(self.cb.reset_timeout)
        try:
            self.grant()
        except CircuitOpenError:  # lost trials, counted as failures, reopened it
            retry_after = self.cb.snapshot().retry_after
            assert self.cb.state == "open"
            assert retry_after is not None
            self.clock.advance(retry_after)
            self.grant()

    @invariant()
    def state_is_known(self) -> None:
        assert self.cb.state in {"closed", "open", "half_open"}

    @invariant()
    def opened_only_after_minimum_calls(self) -> None:
        assert all(calls >= self.cb.minimum_calls for calls in self.calls_when_opened)

    @invariant()
    def trials_are_bounded(self) -> None:
        live = self.live_trials()
        in_flight = self.cb.snapshot().half_open_in_flight
        assert len(live) <= in_flight <= self.cb.half_open_max_calls
        assert all(h.permit.active for h in live)
        if self.cb.state != "half_open":
            assert in_flight == 0


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
test_breaker_state_machine = BreakerMachine.TestCase
