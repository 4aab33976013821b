"""``EventBus``: publish events and consume them in groups with at-least-once delivery."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

from pydantic import BaseModel

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import (
    CommunicationsError,
    ConfigurationError,
    EventError,
    PublishTimeoutError,
    UnknownBackendError,
    is_transient,
)
from dotmac.communications.observability import CheckResult, metrics, tracing
from dotmac.communications.resilience import RetryPolicy

from ._dlq import DeadLetters
from ._event import DEFAULT_SOURCE, Event
from ._subscription import Handler, Subscription, SubscriptionRunner, consumer_name
from .backends.base import EventBackend
from .backends.memory import MemoryBackend

if TYPE_CHECKING:
    from dotmac.communications.config import EventsSettings

__all__ = ["EventBus"]

H = TypeVar("H", bound=Handler)

_JSON_TYPES = frozenset({dict, list, str, int, float, bool, type(None)})
"""Types of ``data`` that cannot be a pydantic model (skips an ``isinstance`` per publish)."""

_SENT = "messaging.client.sent.messages"
_OPERATION = "messaging.client.operation.duration"


def _retry_handler_errors(exc: BaseException) -> bool:
    # Handlers are retried on any failure except a library error that says it is permanent.
    return not (isinstance(exc, CommunicationsError) and not exc.transient)


def _retry_publish_errors(exc: BaseException) -> bool:
    # A full in-memory backend already waited publish_timeout; waiting again helps nobody.
    return is_transient(exc) and not isinstance(exc, PublishTimeoutError)


def _check_str(value: object, name: str) -> None:
    if value is not None and not isinstance(value, str):
        raise EventError(f"{name} must be a string or None, got {type(value).__name__}")


def _check_headers(headers: Mapping[str, str] | None) -> None:
    if headers is None:
        return
    if not isinstance(headers, Mapping):
        raise EventError(f"headers must be a mapping of str to str, got {type(headers).__name__}")
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EventError(f"headers must map str to str; {key!r}: {value!r} does not")


class EventBus:
    """Publish events to topics and consume them in groups, at least once.

    Args:
        backend: Where events live: :class:`MemoryBackend` (default, one process) or
            :class:`RedisStreamsBackend` (many processes).
        source: CloudEvents ``source`` of published events.
        max_attempts: Handler runs per event before it is dead-lettered (default policy).
        max_event_bytes: Largest serialised event data (payload) ``publish`` accepts.
        publish_timeout: Seconds ``publish`` waits on a full or silent backend.
        publish_retry: Retry policy for transient publish failures (``None``: three quick
            attempts; pass ``RetryPolicy(max_attempts=1)`` to disable).
        shutdown_timeout: Seconds ``stop`` waits for running handlers.
        batch_size: Most entries one consumer fetches at once.
        poll_interval: Longest a consumer blocks waiting for new entries.
        clock: Clock for retry backoff (tests pass a fake one).
        dead_letters: Keep events that exhausted their attempts as dead letters; ``False``
            logs, counts (``dotmac.events.dropped``) and acknowledges them instead.

    Raises:
        ConfigurationError: A parameter is out of range.
    """

    def __init__(
        self,
        backend: EventBackend | None = None,
        *,
        source: str = DEFAULT_SOURCE,
        max_attempts: int = 5,
        max_event_bytes: int = 1_048_576,
        publish_timeout: float = 5.0,
        publish_retry: RetryPolicy | None = None,
        shutdown_timeout: float = 10.0,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        clock: Clock | None = None,
        dead_letters: bool = True,
    ) -> None:
        for value, name in ((max_attempts, "max_attempts"), (max_event_bytes, "max_event_bytes"),
                            (batch_size, "batch_size")):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"EventBus: {name} must be an int >= 1, got {value!r}")
        for number, name in ((publish_timeout, "publish_timeout"),
                             (shutdown_timeout, "shutdown_timeout"),
                             (poll_interval, "poll_interval")):  # fmt: skip
            if not number > 0:
                raise ConfigurationError(f"EventBus: {name} must be > 0, got {number!r}")
        self.backend: EventBackend = backend if backend is not None else MemoryBackend()
        self.source = source
        self.max_attempts = max_attempts
        self.max_event_bytes = max_event_bytes
        self.publish_timeout = publish_timeout
        self.shutdown_timeout = shutdown_timeout
        self.clock: Clock = clock or system_clock
        self.publish_retry = publish_retry or RetryPolicy(
            max_attempts=3, initial_delay=0.05, max_delay=0.5, retry_on=_retry_publish_errors,
            clock=self.clock, name="events.publish",
        )  # fmt: skip
        self.dead_letters = DeadLetters(self.backend, self._backend_opened)
        """List, replay and purge dead-lettered events."""
        self._keep_dead_letters = dead_letters
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._subscriptions: list[Subscription] = []
        self._runners: dict[Subscription, SubscriptionRunner] = {}
        self._started = False
        self._pending_starts: set[asyncio.Task[None]] = set()
        self._bound: dict[str, tuple[metrics.BoundHistogram, metrics.BoundCounter]] = {}
        self._unsent: dict[str, int] = {}  # published, not counted yet (see _flush_sent)
        self._remote = self.backend.system != "memory"

    @classmethod
    def from_config(
        cls, settings: EventsSettings, *, clock: Clock | None = None, **kwargs: Any
    ) -> EventBus:
        """Build a bus from ``CommunicationsConfig().events``.

        Args:
            settings: The events section.
            clock: Clock for retries.
            **kwargs: Further :class:`EventBus` arguments (``source``, ``batch_size``...).

        Raises:
            UnknownBackendError: ``backend`` is unknown, or ``redis`` without a Redis URL (an
                EventError and a ConfigurationError).
        """
        backend: EventBackend
        if settings.backend == "redis":
            if not settings.redis_url:
                raise UnknownBackendError(
                    "events.backend is 'redis' but events.redis_url is not set "
                    "(DOTMAC_EVENTS__REDIS_URL or DOTMAC_REDIS_URL)"
                )
            from .backends.redis_streams import RedisStreamsBackend  # noqa: PLC0415 -- lazy

            backend = RedisStreamsBackend(
                settings.redis_url,
                stream_prefix=settings.stream_prefix,
                maxlen=settings.maxlen,
                dead_letter_maxlen=settings.dead_letter_maxlen,
                claim_idle=settings.claim_idle_seconds,
                key_lanes=settings.key_lanes,
            )
        elif settings.backend == "memory":
            backend = MemoryBackend(
                maxlen=settings.maxlen,
                dead_letter_maxlen=settings.dead_letter_maxlen,
                claim_idle=settings.claim_idle_seconds,
                clock=clock,
            )
        else:
            raise UnknownBackendError(
                f"events.backend: unknown backend {settings.backend!r}; use 'memory' or 'redis'"
            )
        return cls(
            backend,
            max_attempts=settings.max_attempts,
            max_event_bytes=settings.max_event_bytes,
            shutdown_timeout=settings.shutdown_timeout,
            dead_letters=settings.dead_letter_enabled,
            clock=clock,
            **kwargs,
        )

    # ------------------------------------------------------------------------------ publish
    def _build(
        self,
        topic: str | Event,
        data: Any,
        *,
        key: str | None,
        headers: Mapping[str, str] | None,
        tenant_id: str | None,
        subject: str | None,
        correlation_id: str | None,
        causation_id: str | None,
    ) -> Event:
        if isinstance(topic, Event):
            return topic
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        if (
            key is None and headers is None and tenant_id is None and subject is None
            and correlation_id is None and causation_id is None
        ):  # fmt: skip
            return Event._plain(topic, data, self.source)  # the common case, built directly
        if (
            key is not None
            or tenant_id is not None
            or subject is not None
            or (correlation_id is not None or causation_id is not None)
        ):
            for value, name in ((key, "key"), (tenant_id, "tenant_id"), (subject, "subject"),
                                (correlation_id, "correlation_id"),
                                (causation_id, "causation_id")):  # fmt: skip
                _check_str(value, name)
        if headers is not None:
            _check_headers(headers)
        return Event(
            topic,
            data,
            source=self.source,
            key=key,
            headers=headers,
            tenant_id=tenant_id,
            subject=subject,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )

    async def publish(
        self,
        topic: str | Event,
        data: Any = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        tenant_id: str | None = None,
        subject: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Event:
        """Publish one event; return it once the backend has stored it.

        Args:
            topic: Topic name (``orders.created``), or a ready :class:`Event`.
            data: JSON-serialisable payload, or a pydantic model.
            key: Ordering key: same key, same group → handled in publish order.
            headers: String headers carried with the event.
            tenant_id: Tenant the event belongs to.
            subject: CloudEvents ``subject``.
            correlation_id: Id shared by a business flow's events.
            causation_id: Id of the event that caused this one.

        Raises:
            InvalidTopicError: The topic is empty or malformed.
            EventSerializationError: ``data`` is not JSON-serialisable.
            EventTooLargeError: The event is larger than ``max_event_bytes``.
            EventError: Another argument has the wrong type.
            PublishTimeoutError: The memory backend stayed full for ``publish_timeout``.
            BackendUnavailableError: Redis could not be reached (after the publish retries).
        """
        if (
            key is None and headers is None and tenant_id is None and subject is None
            and correlation_id is None and causation_id is None and type(topic) is str
            and (type(data) in _JSON_TYPES or not isinstance(data, BaseModel))
        ):  # fmt: skip
            event = Event._plain(topic, data, self.source)  # the common case, built directly
        else:
            event = self._build(
                topic, data, key=key, headers=headers, tenant_id=tenant_id, subject=subject,
                correlation_id=correlation_id, causation_id=causation_id,
            )  # fmt: skip
        if tracing.is_active():
            await self._send([event])
            return event
        # The hot path: stored at once when the backend can (memory with room), else awaited.
        event.data_json(max_bytes=self.max_event_bytes)
        if self.backend.try_publish(event):
            # Counted in bulk at the event loop's next turn: a burst of publishes costs one add.
            unsent = self._unsent
            if not unsent:
                asyncio.get_running_loop().call_soon(self._flush_sent)
            unsent[event.type] = unsent.get(event.type, 0) + 1
        else:
            await self._store([event])
        return event

    async def publish_many(
        self, items: Iterable[Event | tuple[str, Any] | Mapping[str, Any]]
    ) -> list[Event]:
        """Publish several events in one round trip (pipelined on Redis), in order.

        Every item is validated before anything is sent, so bad input writes nothing.

        Args:
            items: :class:`Event` objects, ``(topic, data)`` pairs, or mappings of
                :meth:`publish` keyword arguments (``{"topic": ..., "data": ..., "key": ...}``).

        Returns:
            The published events, in input order.
        """
        events = []
        for index, item in enumerate(items):
            try:
                event = self._coerce(item)
                event.data_json(max_bytes=self.max_event_bytes)  # validate before sending any
                events.append(event)
            except EventError as exc:
                raise type(exc)(f"publish_many item {index}: {exc}") from exc
            except (KeyError, ValueError, TypeError) as exc:
                raise EventError(f"publish_many item {index}: {exc!r}") from exc
        if events:
            await self._send(events)
        return events

    def _coerce(self, item: Event | tuple[str, Any] | Mapping[str, Any]) -> Event:
        if isinstance(item, Event):
            return item
        if isinstance(item, tuple):
            topic, data = item
            return self._build(topic, data, key=None, headers=None, tenant_id=None, subject=None,
                               correlation_id=None, causation_id=None)  # fmt: skip
        if not isinstance(item, Mapping):
            raise EventError(f"expected an Event, a (topic, data) pair or a mapping, got {item!r}")
        fields = dict(item)
        topic = fields.pop("topic")
        data = fields.pop("data", None)
        options = {
            name: fields.pop(name, None)
            for name in ("key", "headers", "tenant_id", "subject", "correlation_id", "causation_id")
        }
        if fields:
            raise EventError(f"unknown fields {sorted(fields)}")
        return self._build(topic, data, **options)

    async def _send(self, events: list[Event]) -> None:
        if tracing.is_active():
            first = events[0]
            with tracing.messaging_span(
                "send",
                first.type,
                operation_type="send",
                system=self.backend.system,
                message_id=first.id if len(events) == 1 else None,
            ):
                parent = tracing.current_traceparent()
                for event in events:
                    event.traceparent = event.traceparent or parent
                await self._store(events)
        else:
            await self._store(events)

    async def _store(self, events: list[Event]) -> None:
        max_bytes = self.max_event_bytes
        for event in events:
            event.data_json(max_bytes=max_bytes)  # validates; backends reuse the cached bytes
        start = time.perf_counter()
        try:
            await self.backend.publish(events, self.publish_timeout)
        except CommunicationsError as exc:
            await self._retry_publish(events, exc, start)
        self._count_published(events, start)

    async def _retry_publish(
        self, events: list[Event], exc: CommunicationsError, start: float
    ) -> None:
        # The first attempt runs bare (no policy overhead on the hot path); the policy takes
        # over from the second, and the first failure counts as its attempt 1.
        delay = self.publish_retry.retry_delay(1, exc, elapsed=time.perf_counter() - start)
        if delay is None:
            raise exc
        await self.clock.sleep(delay)
        retry = dataclasses.replace(
            self.publish_retry, max_attempts=max(self.publish_retry.max_attempts - 1, 1)
        )
        await retry.call(self.backend.publish, events, self.publish_timeout)

    def _count_published(self, events: list[Event], start: float) -> None:
        topic = events[0].type
        duration, sent = self._publish_metrics(topic)
        if len(events) == 1 and not self._remote:
            sent.add(1)  # one event in memory: no round trip to time
            return
        if self._remote:
            # A client operation's duration means a broker round trip; in memory there is none.
            duration.record(time.perf_counter() - start)
        if len(events) == 1 or all(event.type == topic for event in events):
            sent.add(len(events))
        else:
            for event in events:
                self._publish_metrics(event.type)[1].add(1)

    def _publish_metrics(self, topic: str) -> tuple[metrics.BoundHistogram, metrics.BoundCounter]:
        bound = self._bound.get(topic)
        if bound is None:
            attrs = {"messaging.system": self.backend.system, "messaging.operation.name": "send",
                     "messaging.destination.name": topic}  # fmt: skip
            bound = (
                metrics.histogram(_OPERATION, unit="s").bind(attrs),
                metrics.counter(_SENT, unit="{message}").bind(attrs),
            )
            if len(self._bound) < 10_000:  # topics are few; never grow without bound
                self._bound[topic] = bound
        return bound

    def _flush_sent(self) -> None:
        unsent, self._unsent = self._unsent, {}
        for topic, count in unsent.items():
            self._publish_metrics(topic)[1].add(count)

    # ---------------------------------------------------------------------------- subscribe
    @overload
    def subscribe(
        self,
        pattern: str,
        handler: None = None,
        *,
        group: str,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        model: type[BaseModel] | None = None,
        max_in_flight: int | None = None,
    ) -> Callable[[H], H]: ...

    @overload
    def subscribe(
        self,
        pattern: str,
        handler: H,
        *,
        group: str,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        model: type[BaseModel] | None = None,
        max_in_flight: int | None = None,
    ) -> Subscription: ...

    def subscribe(
        self,
        pattern: str,
        handler: H | None = None,
        *,
        group: str,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        model: type[BaseModel] | None = None,
        max_in_flight: int | None = None,
    ) -> Callable[[H], H] | Subscription:
        """Handle events whose topic matches ``pattern``, as a member of ``group``.

        Every group receives every matching event published after the group was first
        declared (when a bus with this subscription started); inside a group each event is
        handled by one consumer. Usable as ``bus.subscribe(p, handler, group=g)`` or as the
        decorator ``@bus.subscribe(p, group=g)``.

        Args:
            pattern: Topic pattern: ``*`` matches one segment, ``#`` the rest.
            handler: ``async def handler(event: Event)``; it is acknowledged once it returns.
            group: Consumer group name (no ``|``).
            concurrency: Handlers running at once (events with the same key never overlap).
            retry: Retry policy for failing handlers (default: ``max_attempts`` attempts with
                exponential backoff, every error but a permanent library error retried).
            model: A pydantic model validating ``event.data`` before the handler runs; data
                that fails goes to the dead letters without retries, and the handler gets the
                model instance as ``event.data``.
            max_in_flight: Events fetched and not yet settled (default ``10 * concurrency``,
                at least twice the bus's ``batch_size``).

        Returns:
            The :class:`Subscription` (direct form) or the decorator.

        Raises:
            InvalidPatternError: The pattern is malformed.
            ConfigurationError: Another argument is invalid (a sync handler, concurrency < 1...).
        """

        def register(fn: H) -> Subscription:
            sub = Subscription(
                pattern=pattern,
                group=group,
                handler=fn,
                concurrency=concurrency,
                retry=retry
                or RetryPolicy(
                    max_attempts=self.max_attempts,
                    initial_delay=0.1,
                    max_delay=30.0,
                    retry_on=_retry_handler_errors,
                    clock=self.clock,
                    name=f"events.{group}",
                ),
                model=model,
                max_in_flight=max_in_flight or max(2 * self._batch_size, 10 * concurrency),
            )
            self._subscriptions.append(sub)
            if self._started:
                # Started buses pick new subscriptions up at once (await bus.ready() to know).
                task = asyncio.get_running_loop().create_task(self._start_runner(sub))
                self._pending_starts.add(task)
                task.add_done_callback(self._pending_starts.discard)
            return sub

        if handler is not None:
            return register(handler)

        def decorator(fn: H) -> H:
            register(fn)
            return fn

        return decorator

    async def ready(self) -> None:
        """Wait until every subscription added to the running bus consumes (its group exists).

        ``subscribe()`` on a started bus declares the group in the background; await this
        before publishing events that the new subscription must see.
        """
        while self._pending_starts:
            await asyncio.gather(*self._pending_starts)

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop a subscription's consumer (its group keeps receiving events for later)."""
        runner = self._runners.pop(subscription, None)
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
        if runner is not None:
            await runner.stop(self.shutdown_timeout)

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """Current subscriptions."""
        return tuple(self._subscriptions)

    # ---------------------------------------------------------------------------- lifecycle
    async def _start_runner(self, sub: Subscription) -> None:
        await self.backend.declare_group(sub.group_id)
        runner = SubscriptionRunner(
            sub,
            self.backend.consumer(sub.group_id, consumer_name()),
            system=self.backend.system,
            clock=self.clock,
            claim_idle=self.backend.claim_idle,
            batch_size=self._batch_size,
            poll_interval=self._poll_interval,
            keep_dead_letters=self._keep_dead_letters,
        )
        self._runners[sub] = runner
        runner.start()

    @contextlib.asynccontextmanager
    async def _backend_opened(self) -> AsyncIterator[None]:
        # Dead-letter operations on a stopped bus open the backend for the call only.
        if self._started:
            yield
            return
        await self.backend.start()
        try:
            yield
        finally:
            await self.backend.close()

    async def start(self) -> None:
        """Connect the backend, declare every subscription's group and start consuming."""
        if self._started:
            return
        await self.backend.start()
        try:
            for sub in self._subscriptions:
                await self._start_runner(sub)
        except BaseException:
            # Half-started: stop what did start, so nothing keeps consuming behind our back.
            runners = list(self._runners.values())
            self._runners.clear()
            await asyncio.gather(*(r.stop(self.shutdown_timeout) for r in runners))
            await self.backend.close()
            raise
        self._started = True

    async def stop(self) -> None:
        """Stop fetching, drain running handlers within ``shutdown_timeout``, close the backend."""
        if not self._started:
            return
        self._started = False
        for task in list(self._pending_starts):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        runners = list(self._runners.values())
        self._runners.clear()
        await asyncio.gather(*(runner.stop(self.shutdown_timeout) for runner in runners))
        self._flush_sent()
        await self.backend.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Start, consume until cancelled (a worker process's main), then stop cleanly."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    async def close(self) -> None:
        """Same as :meth:`stop` (the old ``EventBus.close()``)."""
        await self.stop()

    # ------------------------------------------------------------------------------- health
    async def health_check(self) -> CheckResult:
        """A :class:`~dotmac.communications.observability.HealthRegistry` check.

        ``fail`` when the backend does not answer or a consumer cannot fetch.
        """
        try:
            await self.backend.ping()
        except CommunicationsError as exc:
            return CheckResult("fail", output=str(exc), component_type="datastore")
        stuck = [r for r in self._runners.values() if r.fetch_errors]
        if stuck:
            names = ", ".join(f"{r.sub.group}|{r.sub.pattern}" for r in stuck)
            return CheckResult("fail", output=f"consumers cannot fetch: {names}")
        return CheckResult("pass", component_type="datastore")
