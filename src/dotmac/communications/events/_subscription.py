"""One subscription's consumer loop: fetch, dispatch, handle, retry, dead-letter, acknowledge.

Per subscription there is one fetch loop, ``concurrency`` workers, one acknowledgement flusher
and one keepalive task. Events with the same ``key`` are handled one at a time in delivery order:
while a key is busy (handling, or waiting to retry) its later events are parked behind it. A failed
event waits for its retry on a timer, so backoff never blocks the rest of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from dotmac.communications._clock import Clock
from dotmac.communications.errors import CommunicationsError, ConfigurationError, EventDecodeError
from dotmac.communications.observability import metrics, tracing
from dotmac.communications.resilience import RetryPolicy

from ._event import Event
from ._topics import compile_pattern
from .backends.base import Delivery, GroupConsumer, GroupId

__all__ = ["Handler", "Subscription", "SubscriptionRunner"]

log = logging.getLogger("dotmac.communications.events")

Handler = Callable[[Event], Awaitable[Any]]
"""An event handler: ``async def handle(event: Event) -> None``."""

_CONSUMED = "messaging.client.consumed.messages"
_PROCESS = "messaging.process.duration"
_FAILURES = "dotmac.events.handler.failures"
_DEAD = "dotmac.events.dead_letters"
_DROPPED = "dotmac.events.dropped"


@dataclass(frozen=True, slots=True, eq=False)
class Subscription:
    """A handler subscribed to a pattern in a consumer group (see :meth:`EventBus.subscribe`).

    Compared by identity: subscribing the same handler twice makes two consumers.
    """

    pattern: str
    group: str
    handler: Handler
    concurrency: int
    retry: RetryPolicy
    model: type[BaseModel] | None
    max_in_flight: int

    def __post_init__(self) -> None:
        compile_pattern(self.pattern)
        if not isinstance(self.group, str) or not self.group or "|" in self.group:
            raise ConfigurationError(
                f"subscribe({self.pattern!r}): group must be a non-empty string without '|', "
                f"got {self.group!r}"
            )
        if not callable(self.handler):
            raise ConfigurationError(
                f"subscribe({self.pattern!r}): handler must be an async callable, "
                f"got {self.handler!r}"
            )
        if not (inspect.iscoroutinefunction(self.handler) or _async_callable(self.handler)):
            raise ConfigurationError(
                f"subscribe({self.pattern!r}): handler {_name(self.handler)} must be "
                "`async def` (it is awaited for every event)"
            )
        for value, name in (
            (self.concurrency, "concurrency"),
            (self.max_in_flight, "max_in_flight"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"subscribe({self.pattern!r}): {name} must be an int >= 1, got {value!r}"
                )
        if self.model is not None and not (
            isinstance(self.model, type) and issubclass(self.model, BaseModel)
        ):
            raise ConfigurationError(
                f"subscribe({self.pattern!r}): model must be a pydantic model class, "
                f"got {self.model!r}"
            )

    @property
    def group_id(self) -> GroupId:
        """The backend's consumer group for this subscription."""
        return GroupId(self.group, self.pattern)


def _async_callable(obj: object) -> bool:
    call = getattr(obj, "__call__", None)  # noqa: B004 -- an instance with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _name(handler: object) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


_PARKED_PER_SLOT = 10
"""Parked deliveries allowed per max_in_flight slot before fetching pauses."""

_TASK_GRACE = 2.0
"""Seconds a cancelled background task gets to finish before it is abandoned."""


async def _cancel_and_wait(tasks: list[asyncio.Task[None]], grace: float) -> None:
    # redis-py can swallow a cancellation that lands mid-command; the loops also check
    # stopping(), and a task that still does not end within the grace period is abandoned.
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        log.warning("events: task %s did not stop within %.1fs; abandoning it", task, grace)


def consumer_name() -> str:
    """A consumer name unique to this process and run: ``host-pid-random``."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class SubscriptionRunner:
    """Runs one :class:`Subscription` against one backend consumer."""

    def __init__(
        self,
        sub: Subscription,
        consumer: GroupConsumer,
        *,
        system: str,
        clock: Clock,
        claim_idle: float,
        batch_size: int,
        poll_interval: float,
        keep_dead_letters: bool = True,
    ) -> None:
        self.sub = sub
        self._keep_dead_letters = keep_dead_letters
        self.consumer = consumer
        self._system = system
        self._clock = clock
        self._claim_idle = claim_idle
        self._batch = batch_size
        self._low_water = max(1, min(batch_size, sub.max_in_flight // 2))
        self._poll = poll_interval
        # Keyed by (stream, entry id): ids repeat across streams (topics, key lanes).
        self._in_flight: dict[tuple[str, str], Delivery] = {}
        self._parked = 0  # deliveries waiting behind a busy key
        self._ready: deque[Delivery] = deque()
        self._ready_wakeup = asyncio.Event()
        self._busy_keys: dict[str, deque[Delivery]] = {}
        self._acks: list[Delivery] = []
        self._ack_wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._active = 0
        self._timers: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._fetch_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.fetch_errors = 0
        """Consecutive failed fetches (health turns ``fail`` while the backend is away)."""
        self._room_wanted = False  # the fetch loop waits for room (settling then checks)
        self._process_bound: dict[str, metrics.BoundHistogram] = {}
        self._consumed_bound: dict[str, metrics.BoundCounter] = {}
        self._attrs = {
            "messaging.system": system,
            "messaging.consumer.group.name": sub.group,
        }

    # ---------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the fetch loop, workers, acknowledgement flusher and keepalive."""
        label = f"{self.sub.group}:{self.sub.pattern}"
        self._fetch_task = asyncio.create_task(self._fetch_loop(), name=f"events-fetch {label}")
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"events-worker {label}")
            for _ in range(self.sub.concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._ack_loop(), name=f"events-ack {label}"))
        self._tasks.append(asyncio.create_task(self._keepalive_loop(), name=f"events-keep {label}"))

    async def stop(self, timeout: float) -> None:
        """Stop fetching, let handlers already fetched finish within ``timeout``, then stop.

        What is left unacknowledged stays pending in its group for another consumer to claim.
        Every step is bounded: a task that ignores its cancellation is abandoned with a warning
        rather than hanging the shutdown.
        """
        self._stopping = True
        self._room.set()
        self._ack_wakeup.set()
        if self._fetch_task is not None:
            await _cancel_and_wait([self._fetch_task], _TASK_GRACE)
        await _cancel_and_wait(list(self._timers), _TASK_GRACE)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._active or self._ready:
                    self._idle.clear()
                    await self._idle.wait()
        await _cancel_and_wait(self._tasks, _TASK_GRACE)
        # What is left (waiting for a retry, parked behind its key, or still running past the
        # drain timeout) stays pending in the backend; tell it, so its lanes can be released.
        for delivery in list(self._in_flight.values()):
            self._abandon(delivery)
        self._busy_keys.clear()
        self._parked = 0
        with contextlib.suppress(TimeoutError, CommunicationsError):
            async with asyncio.timeout(_TASK_GRACE):
                await self._flush_acks()
                await self.consumer.close()

    def stopping(self) -> bool:
        """True once :meth:`stop` has begun."""
        return self._stopping

    # -------------------------------------------------------------------------------- fetch
    async def _fetch_loop(self) -> None:
        backoff = 0.05
        # Fetch again once there is room for a worthwhile batch, not after every settle: one
        # free slot would otherwise mean one round trip per event.
        low_water = self._low_water
        while not self.stopping():
            room = self._room_left()
            if room < low_water:
                self._room.clear()
                self._room_wanted = True
                await self._room.wait()
                continue
            try:
                batch = await self.consumer.fetch(min(room, self._batch), self._poll)
            except Exception as exc:
                # Deliberately broad: a consumer must survive anything; unexpected errors are
                # logged with their traceback below, then it backs off and fetches again.
                if self.stopping():
                    return
                self.fetch_errors += 1
                if not isinstance(exc, CommunicationsError):
                    log.exception("events: unexpected error fetching for %s|%s",
                                  self.sub.group, self.sub.pattern)  # fmt: skip
                log.warning(
                    "events: fetch for %s|%s failed (%s); retrying in %.2fs",
                    self.sub.group, self.sub.pattern, exc, backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self.fetch_errors = 0
            backoff = 0.05
            if batch:
                self._dispatch(batch)

    def _dispatch(self, batch: list[Delivery]) -> None:
        now = time.monotonic()
        in_flight = self._in_flight
        ready = self._ready
        busy_keys = self._busy_keys
        topic = batch[0].topic
        count = 0
        for delivery in batch:
            delivery.started = now
            in_flight[delivery.stream, delivery.entry_id] = delivery
            if delivery.topic != topic:  # batches are mostly of one topic: count runs of it
                self._count_consumed(topic, count)
                topic, count = delivery.topic, 0
            count += 1
            event = delivery.event
            key = event.key if event is not None else None
            if key is not None:
                parked = busy_keys.get(key)
                if parked is not None:
                    parked.append(delivery)
                    self._parked += 1
                    continue
                busy_keys[key] = deque()
            ready.append(delivery)
        self._ready_wakeup.set()
        self._count_consumed(topic, count)

    def _count_consumed(self, topic: str, count: int) -> None:
        bound = self._consumed_bound.get(topic)
        if bound is None:
            attrs = {**self._attrs, "messaging.destination.name": topic}
            bound = metrics.counter(_CONSUMED, unit="{message}").bind(attrs)
            if len(self._consumed_bound) < 10_000:  # topics are few; never grow without bound
                self._consumed_bound[topic] = bound
        bound.add(count)

    # ------------------------------------------------------------------------------ handling
    async def _worker(self) -> None:
        ready = self._ready
        wakeup = self._ready_wakeup
        handler = self.sub.handler
        plain = self.sub.model is None
        max_attempts = self.sub.retry.max_attempts
        perf_counter = time.perf_counter
        process_bound = self._process_bound
        in_flight = self._in_flight
        while True:
            if not ready:
                wakeup.clear()
                await wakeup.wait()
                continue
            delivery = ready.popleft()
            event = delivery.event
            self._active += 1
            try:
                if (
                    plain and event is not None and event.key is None
                    and delivery.attempt <= max_attempts and not tracing.is_active()
                ):  # fmt: skip
                    # The common case, handled right here: no key to order, no model to check,
                    # no span to open.
                    start = perf_counter()
                    try:
                        await handler(event)
                    except Exception as exc:  # noqa: BLE001 -- a failure is data: retry or dead-letter
                        delay = await self._failed(delivery, exc)
                        if delay is not None:
                            self._schedule_retry(delivery, delay)
                    else:
                        # _succeeded(), written out for this path.
                        elapsed = perf_counter() - start
                        topic = delivery.topic
                        (process_bound.get(topic) or self._process_metric(topic)).record(elapsed)
                        in_flight.pop((delivery.stream, delivery.entry_id), None)
                        if self._room_wanted:
                            self._check_room()
                        self._add_ack(delivery)
                else:
                    await self._chain(delivery)
            except Exception:  # noqa: BLE001 -- logged by _unsettled()
                # Deliberately broad: a worker must outlive any one delivery (_chain has its own).
                self._unsettled(delivery)
            finally:
                self._active -= 1
                if not self._active and not ready:
                    self._idle.set()

    async def _chain(self, first: Delivery) -> None:
        """Handle a delivery, then its key's parked successors in order."""
        delivery: Delivery | None = first
        while delivery is not None:
            try:
                delay = await self._attempt(delivery)
            except Exception:  # noqa: BLE001 -- logged by _unsettled()
                # Deliberately broad: a worker must outlive any one delivery.
                self._unsettled(delivery)
                delay = None
            if delay is not None:
                self._schedule_retry(delivery, delay)
                return  # the key stays busy until the retry settles it
            event = delivery.event
            if event is None or event.key is None:
                return
            delivery = self._next_for_key(event.key)

    def _unsettled(self, delivery: Delivery) -> None:
        # Not acknowledged, the delivery stays pending and is claimed again after claim_idle.
        log.exception(
            "events: could not settle %s entry %s; leaving it for a later claim",
            delivery.topic, delivery.entry_id,
        )  # fmt: skip
        self._abandon(delivery)

    def _next_for_key(self, key: str) -> Delivery | None:
        parked = self._busy_keys.get(key)
        if parked:
            self._parked -= 1
            return parked.popleft()
        self._busy_keys.pop(key, None)
        return None

    async def _attempt(self, delivery: Delivery) -> float | None:
        """Run the handler once; return a retry delay, or None when the delivery is settled."""
        sub = self.sub
        event = delivery.event
        if event is None or delivery.attempt > sub.retry.max_attempts or sub.model is not None:
            event = await self._admit(delivery)
            if event is None:
                return None  # dead-lettered
        start = time.perf_counter()
        try:
            if tracing.is_active():
                await self._traced(event)
            else:
                await sub.handler(event)
        except Exception as exc:  # noqa: BLE001 -- a handler's failure is data: retry or dead-letter
            return await self._failed(delivery, exc)
        self._succeeded(delivery, time.perf_counter() - start)
        return None

    def _succeeded(self, delivery: Delivery, elapsed: float) -> None:
        bound = self._process_bound.get(delivery.topic) or self._process_metric(delivery.topic)
        bound.record(elapsed)
        self._settled(delivery)
        self._add_ack(delivery)

    async def _admit(self, delivery: Delivery) -> Event | None:
        """Check a delivery before its handler runs: its event, or None once dead-lettered."""
        sub = self.sub
        event = delivery.event
        if event is None:
            await self._dead_letter(delivery, f"undecodable stream entry: {delivery.error}")
            return None
        if delivery.attempt > sub.retry.max_attempts:
            await self._dead_letter(
                delivery,
                f"delivered {delivery.attempt} times, more than max_attempts="
                f"{sub.retry.max_attempts} (consumers crashed or stalled while handling it)",
            )
            return None
        if sub.model is not None and not isinstance(event.data, sub.model):
            try:
                event.data = sub.model.model_validate(event.data)
            except ValidationError as exc:
                await self._dead_letter(
                    delivery, f"data does not match {sub.model.__name__}: {exc}"
                )
                return None
        return event

    def _add_ack(self, delivery: Delivery) -> None:
        acks = self._acks
        acks.append(delivery)
        if len(acks) == 1:  # the flusher takes the whole list: wake it once per batch
            self._ack_wakeup.set()

    def _process_metric(self, topic: str) -> metrics.BoundHistogram:
        bound = self._process_bound.get(topic)
        if bound is None:
            attrs = {**self._attrs, "messaging.destination.name": topic}
            bound = metrics.histogram(_PROCESS, unit="s").bind(attrs)
            if len(self._process_bound) < 10_000:  # topics are few; never grow without bound
                self._process_bound[topic] = bound
        return bound

    async def _traced(self, event: Event) -> None:
        carrier = {"traceparent": event.traceparent} if event.traceparent else {}
        with tracing.messaging_span(
            "process",
            event.type,
            operation_type="process",
            system=self._system,
            consumer_group=self.sub.group,
            message_id=event.id,
            context=tracing.extract_context(carrier),
        ):
            await self.sub.handler(event)

    async def _failed(self, delivery: Delivery, exc: Exception) -> float | None:
        attrs = {**self._attrs, "messaging.destination.name": delivery.topic,
                 "error.type": type(exc).__qualname__}  # fmt: skip
        metrics.counter(_FAILURES, unit="{message}").add(1, attrs)
        elapsed = time.monotonic() - delivery.started
        delay = self.sub.retry.retry_delay(delivery.attempt, exc, elapsed=elapsed)
        if delay is None:
            await self._dead_letter(delivery, f"{type(exc).__qualname__}: {exc}")
            return None
        log.info(
            "events: handler %s failed on %s (attempt %d), retrying in %.3fs: %r",
            _name(self.sub.handler), delivery.topic, delivery.attempt, delay, exc,
        )  # fmt: skip
        try:
            await self.consumer.record_failure(delivery)
        except CommunicationsError as err:
            log.warning("events: could not record the failed attempt: %s", err)
        return delay

    def _schedule_retry(self, delivery: Delivery, delay: float) -> None:
        if self._stopping:
            # Stopping: left pending, so another consumer (or the next start) handles it.
            self._abandon(delivery)
            return
        timer = asyncio.create_task(self._retry_later(delivery, delay))
        self._timers.add(timer)
        timer.add_done_callback(self._timers.discard)

    async def _retry_later(self, delivery: Delivery, delay: float) -> None:
        await self._clock.sleep(delay)
        delivery.attempt += 1
        try:
            # Decode afresh: the retry must not see what the failed attempt changed.
            delivery.event = delivery.fresh_event()
        except EventDecodeError as exc:  # pragma: no cover - it decoded the first time
            delivery.event, delivery.error = None, str(exc)
        self._ready.append(delivery)
        self._ready_wakeup.set()

    async def _dead_letter(self, delivery: Delivery, error: str) -> None:
        if not self._keep_dead_letters:
            await self._drop(delivery, error)
            return
        log.error(
            "events: dead-lettering %s entry %s for group %s after %d attempt(s): %s",
            delivery.topic, delivery.entry_id, self.sub.group, delivery.attempt, error,
        )  # fmt: skip
        try:
            await self.consumer.dead_letter(delivery, error)
        except CommunicationsError:
            # Left pending: it is claimed again after claim_idle and dead-lettered then.
            log.exception("events: could not dead-letter %s", delivery.entry_id)
            self._abandon(delivery)
            return
        else:
            attrs = {**self._attrs, "messaging.destination.name": delivery.topic}
            metrics.counter(_DEAD, unit="{message}").add(1, attrs)
        self._settled(delivery)

    async def _drop(self, delivery: Delivery, error: str) -> None:
        # events.dead_letter_enabled=false: the failure is logged and counted, then acknowledged.
        log.error(
            "events: dropping %s entry %s for group %s after %d attempt(s) "
            "(dead letters disabled): %s",
            delivery.topic, delivery.entry_id, self.sub.group, delivery.attempt, error,
        )  # fmt: skip
        attrs = {**self._attrs, "messaging.destination.name": delivery.topic}
        metrics.counter(_DROPPED, unit="{message}").add(1, attrs)
        self._settled(delivery)
        self._add_ack(delivery)

    def _abandon(self, delivery: Delivery) -> None:
        """Stop tracking a delivery left unsettled; the backend hands it out again later."""
        self._settled(delivery)
        self.consumer.abandon(delivery)

    def _settled(self, delivery: Delivery) -> None:
        self._in_flight.pop((delivery.stream, delivery.entry_id), None)
        if self._room_wanted:
            self._check_room()

    def _check_room(self) -> None:
        # Wake the fetch loop (waiting for room) once a worthwhile batch fits.
        if self._room_left() >= self._low_water:
            self._room_wanted = False
            self._room.set()

    def _room_left(self) -> int:
        # Events parked behind a key waiting for its retry do not hold up other keys; they are
        # capped on their own so a stuck key cannot grow memory without bound.
        if self._parked >= _PARKED_PER_SLOT * self.sub.max_in_flight:
            return 0
        return self.sub.max_in_flight - (len(self._in_flight) - self._parked)

    # ------------------------------------------------------------------------ acks, keepalive
    async def _ack_loop(self) -> None:
        while not self.stopping():
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            if not await self._flush_acks():
                await asyncio.sleep(0.5)  # backend away: keep the acks and try again

    async def _flush_acks(self) -> bool:
        batch, self._acks = self._acks, []
        if not batch:
            return True
        try:
            await self.consumer.ack(batch)
        except CommunicationsError as exc:
            log.warning("events: acknowledging %d events failed, will retry: %s", len(batch), exc)
            self._acks[:0] = batch
            self._ack_wakeup.set()
            return False
        except asyncio.CancelledError:
            self._acks[:0] = batch  # the final flush in stop() sends them
            raise
        return True

    async def _keepalive_loop(self) -> None:
        period = self._claim_idle / 3
        while not self.stopping():
            await asyncio.sleep(period)
            cutoff = time.monotonic() - period
            held = [d for d in self._in_flight.values() if d.started <= cutoff]
            try:  # also with nothing held: the backend renews leases and liveness here
                await self.consumer.keepalive(held)
            except CommunicationsError as exc:
                log.warning("events: keepalive failed: %s", exc)
            except Exception:
                # Deliberately broad: without this loop leases lapse and entries get claimed
                # from under running handlers, so it must outlive any error.
                log.exception("events: unexpected keepalive error")
