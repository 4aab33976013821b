"""``NotificationService``: render, deduplicate, schedule, deliver with failover, record, report."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from opentelemetry.trace import SpanKind

from dotmac.communications._clock import Clock, system_clock
from dotmac.communications.errors import (
    CommunicationsError,
    ConfigurationError,
    InvalidRecipientError,
    NotificationError,
    RecipientOfflineError,
    RecipientUnregisteredError,
)
from dotmac.communications.observability import CheckResult, metrics, tracing
from dotmac.communications.resilience import (
    CircuitBreaker,
    CircuitBreakerOptions,
    RateLimiter,
    RetryPolicy,
)

from ._delivery import GuardedProvider, Outcome, is_final_for_recipient
from ._models import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    NotificationChannel,
    NotificationResult,
    OutboundMessage,
)
from ._store import NotificationDeadLetter, NotificationStore, StatusEntry
from ._store_memory import MemoryStore
from ._templates import TemplateRegistry
from .channels.base import Provider

if TYPE_CHECKING:
    from dotmac.communications.config import NotificationsSettings
    from dotmac.communications.events import EventBus

    from .channels.websocket import InAppGateway

__all__ = ["NotificationDeadLetters", "NotificationService"]

log = logging.getLogger("dotmac.communications.notifications")

_SENDS = "dotmac.notifications.deliveries"
_DURATION = "dotmac.notifications.send.duration"


def _handles_all(provider: Provider) -> bool:
    # True when the provider keeps the base ``handles`` (every recipient): its channel's route
    # then does not depend on the recipient and is computed once.
    return type(provider).handles is Provider.handles and "handles" not in getattr(
        provider, "__dict__", ()
    )


class NotificationService:
    """Sends notifications through each channel's ordered chain of providers.

    Per recipient, providers are tried in order: each behind its own rate limiter, circuit
    breaker and retry policy (transient errors only); a provider that still fails hands over
    to the next. A malformed recipient is refused before anything is sent; an unregistered one
    is marked ``suppressed`` and skipped from then on. What fails on every provider goes to
    :attr:`dead_letters`.

    Args:
        providers: Providers, in failover order per channel (``provider.channel``).
        store: Idempotency, status, schedule and dead-letter state (default: in memory).
        templates: Template registry (default: an empty one).
        events: Event bus on which ``notification.sent`` / ``.failed`` / ``.suppressed`` are
            published.
        gateway: WebSocket gateway for the ``websocket`` channel.
        retry: Retry policy per provider (default: 3 attempts, 0.5 s initial backoff).
        rate_limit_per_minute: Sends per minute per provider (``None``: unlimited).
        redis_url: Share rate limits through this Redis.
        idempotency_ttl: Seconds an idempotency key suppresses repeats.
        history_ttl: Seconds the status history and results are kept.
        recipient_concurrency: Recipients of one notification sent at once.
        scheduler_interval: Seconds between looks for due scheduled notifications.
        breaker: Circuit breaker options for every provider (``failure_rate_threshold``,
            ``minimum_calls``, ``reset_timeout``...; see :class:`CircuitBreaker`).
        clock: Clock for backoff, breakers, rate limits and scheduling.
    """

    def __init__(
        self,
        providers: Iterable[Provider] = (),
        *,
        store: NotificationStore | None = None,
        templates: TemplateRegistry | None = None,
        events: EventBus | None = None,
        gateway: InAppGateway | None = None,
        retry: RetryPolicy | None = None,
        rate_limit_per_minute: int | None = None,
        redis_url: str | None = None,
        idempotency_ttl: float = 86_400.0,
        history_ttl: float = 7 * 86_400.0,
        recipient_concurrency: int = 10,
        scheduler_interval: float = 1.0,
        breaker: CircuitBreakerOptions | None = None,
        clock: Clock | None = None,
    ) -> None:
        if recipient_concurrency < 1 or not scheduler_interval > 0:
            raise ConfigurationError(
                "NotificationService: recipient_concurrency must be >= 1 and "
                f"scheduler_interval > 0, got {recipient_concurrency!r}, {scheduler_interval!r}"
            )
        self.clock = clock or system_clock
        self.store = store or MemoryStore(clock=self.clock)
        self.templates = templates or TemplateRegistry()
        self.events = events
        self.retry = retry or RetryPolicy(
            max_attempts=3, initial_delay=0.5, max_delay=30.0, clock=self.clock
        )
        self.rate_limit_per_minute = rate_limit_per_minute
        self.idempotency_ttl = idempotency_ttl
        self.history_ttl = history_ttl
        self.recipient_concurrency = recipient_concurrency
        self.scheduler_interval = scheduler_interval
        self._redis_url = redis_url
        self._breaker_options: CircuitBreakerOptions = breaker or {}
        self._chains: dict[str, list[GuardedProvider]] = {}
        self._bound_sends: dict[tuple[str, str, str], metrics.BoundCounter] = {}
        self._bound_durations: dict[tuple[str, str], metrics.BoundHistogram] = {}
        # Per channel, the route of every recipient when no provider of the channel overrides
        # ``Provider.handles`` (the common case): one lookup instead of a filtered copy.
        self._routes: dict[str, list[GuardedProvider]] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self._started = False
        self.dead_letters = NotificationDeadLetters(self)
        """Deliveries that failed on every provider: ``list()``, ``replay()``, ``purge()``."""
        for provider in providers:
            self.add_provider(provider)
        if gateway is not None:
            from .channels.websocket import GatewayProvider  # noqa: PLC0415 -- optional part

            self.add_provider(GatewayProvider(gateway))

    # ------------------------------------------------------------------------------ set-up
    @classmethod
    def from_config(
        cls,
        settings: NotificationsSettings,
        *,
        events: EventBus | None = None,
        gateway: InAppGateway | None = None,
        clock: Clock | None = None,
        **kwargs: Any,
    ) -> NotificationService:
        """Build the service and its providers from ``CommunicationsConfig().notifications``.

        Email is always configured (the embedded default is an SMTP server on localhost:25,
        contacted only when an email is sent); SMS, push and chat providers exist when their
        settings are complete. With ``notifications.backend = "redis"`` state lives in Redis.
        """
        from ._config import providers_from_settings, store_from_settings  # noqa: PLC0415

        clock = clock or system_clock
        kwargs.setdefault("store", store_from_settings(settings, clock))
        kwargs.setdefault(
            "retry",
            RetryPolicy(
                max_attempts=settings.max_attempts,
                initial_delay=settings.retry_initial_delay,
                max_delay=max(30.0, settings.retry_initial_delay),
                clock=clock,
            ),
        )
        if settings.template_dir is not None:
            kwargs.setdefault("templates", TemplateRegistry(settings.template_dir))
        kwargs.setdefault("rate_limit_per_minute", settings.rate_limit_per_minute)
        kwargs.setdefault("idempotency_ttl", settings.idempotency_ttl_seconds)
        if settings.backend == "redis" and settings.redis_url:
            kwargs.setdefault("redis_url", settings.redis_url)
        return cls(
            providers_from_settings(settings),
            events=events,
            gateway=gateway,
            clock=clock,
            **kwargs,
        )

    def add_provider(self, provider: Provider) -> None:
        """Append ``provider`` to its channel's failover chain."""
        channel = NotificationChannel(provider.channel).value
        chain = self._chains.setdefault(channel, [])
        if any(g.name == provider.name for g in chain):
            raise ConfigurationError(
                f"channel {channel!r} already has a provider named {provider.name!r}; "
                "give each provider of a channel its own name"
            )
        limiter = None
        if self.rate_limit_per_minute is not None:
            per_minute = self.rate_limit_per_minute
            limiter = RateLimiter(
                f"notify:{channel}:{provider.name}",
                rate=per_minute / 60.0,
                capacity=max(1.0, per_minute / 6.0),  # bursts of ten seconds' worth
                redis_url=self._redis_url,
                clock=None if self._redis_url else self.clock,
            )
        options = CircuitBreakerOptions(clock=self.clock)
        options.update(self._breaker_options)
        chain.append(
            GuardedProvider(
                provider,
                retry=self.retry,
                breaker=CircuitBreaker(f"notify:{channel}:{provider.name}", **options),
                limiter=limiter,
                clock=self.clock,
            )
        )
        self._routes.pop(channel, None)
        if all(_handles_all(g.provider) for g in chain):
            self._routes[channel] = list(chain)

    def providers(self, channel: str) -> list[Provider]:
        """The failover chain of ``channel``, in order."""
        return [g.provider for g in self._chains.get(channel, [])]

    async def start(self) -> None:
        """Open provider pools and the store, and start the scheduler."""
        if self._started:
            return
        await self.store.start()
        opened: list[Provider] = []
        try:
            for chain in self._chains.values():
                for guarded in chain:
                    await guarded.provider.open()
                    opened.append(guarded.provider)
        except BaseException:
            for provider in opened:
                await provider.aclose()
            await self.store.close()
            raise
        self._started = True
        self._scheduler = asyncio.create_task(self._schedule_loop(), name="notifications-scheduler")

    async def close(self) -> None:
        """Stop the scheduler and close providers, rate limiters and the store."""
        if not self._started:
            return
        self._started = False
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        for chain in self._chains.values():
            for guarded in chain:
                with contextlib.suppress(CommunicationsError):
                    await guarded.provider.aclose()
                if guarded.limiter is not None:
                    await guarded.limiter.aclose()
        await self.store.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -------------------------------------------------------------------------------- send
    async def send(self, notification: Notification) -> NotificationResult:
        """Send ``notification`` to each recipient; return one result per recipient.

        Raises:
            ConfigurationError: The channel has no provider.
            InvalidRecipientError: A recipient (or sender/header) is malformed; nothing is sent.
            TemplateError: The template is unknown or failed to render; nothing is sent.
            BackendUnavailableError: The Redis store could not be reached.
        """
        messages = self._prepare(notification)
        return await self._send_prepared(notification, messages)

    async def send_many(
        self, notifications: Sequence[Notification], *, concurrency: int = 10
    ) -> list[NotificationResult]:
        """Send several notifications, ``concurrency`` at a time; results in input order.

        Every notification is rendered and validated first: bad input raises (naming its index)
        before anything is sent.
        """
        if concurrency < 1:
            raise ConfigurationError(f"send_many: concurrency must be >= 1, got {concurrency!r}")
        prepared = []
        for index, notification in enumerate(notifications):
            try:
                prepared.append((notification, self._prepare(notification)))
            except (NotificationError, ConfigurationError) as exc:
                raise type(exc)(f"send_many item {index}: {exc}") from exc
        gate = asyncio.Semaphore(concurrency)

        async def one(item: tuple[Notification, list[OutboundMessage]]) -> NotificationResult:
            async with gate:
                return await self._send_prepared(*item)

        return list(await asyncio.gather(*(one(item) for item in prepared)))

    async def status(self, notification_id: str) -> list[StatusEntry]:
        """The delivery history of a notification (empty when unknown or expired)."""
        return await self.store.history(notification_id)

    async def result(self, notification_id: str) -> NotificationResult | None:
        """The last result of a notification, while its history is kept."""
        return await self.store.get_result(notification_id)

    async def health_check(self) -> CheckResult:
        """A :class:`~dotmac.communications.observability.HealthRegistry` check.

        ``fail`` when the store does not answer; ``warn`` while a channel has no provider
        whose circuit breaker is closed (its sends fail over or fail); else ``pass``.
        """
        try:
            await self.store.ping()
        except CommunicationsError as exc:
            return CheckResult(
                "fail", output=f"notification store: {exc}", component_type="datastore"
            )
        down = [
            channel
            for channel, chain in self._chains.items()
            if chain and all(g.breaker.state == "open" for g in chain)
        ]
        if down:
            return CheckResult(
                "warn", output=f"every provider's breaker is open: {', '.join(down)}"
            )
        return CheckResult("pass", component_type="component")

    async def unsuppress(self, channel: str, recipient: str) -> bool:
        """Send to a suppressed recipient again (a token re-registered, a user sent START)."""
        channel = NotificationChannel(channel).value
        chain = [g for g in self._chains.get(channel, ()) if g.provider.handles(recipient)]
        if chain:  # the form suppressions were recorded in (E.164, normalised address)
            recipient = chain[0].provider.validate(recipient)
        return await self.store.unsuppress(channel, recipient)

    async def cancel(self, notification_id: str) -> bool:
        """Cancel a scheduled notification not yet taken for sending; True if it was waiting."""
        cancelled = await self.store.cancel_scheduled(notification_id)
        if cancelled:
            await self._record(notification_id, [self._entry("cancelled")])
            scheduled = await self.store.get_result(notification_id)
            if scheduled is not None:
                deliveries = tuple(
                    dataclasses.replace(d, status=DeliveryStatus.CANCELLED)
                    for d in scheduled.deliveries
                )
                result = NotificationResult.of(notification_id, deliveries)
                await self.store.save_result(result, self.history_ttl)
        return cancelled

    def _prepare(self, notification: Notification) -> list[OutboundMessage]:
        channel = notification.channel.value
        chain = self._chains.get(channel)
        if not chain:
            raise ConfigurationError(
                f"no provider for channel {channel!r}: configure notifications.{channel} or "
                "call add_provider()"
                + (" (pass gateway= for in-app delivery)" if channel == "websocket" else "")
            )
        subject, text, html = notification.subject, notification.text, notification.html
        if notification.template is not None:
            rendered = self.templates.render(notification.template, notification.context)
            subject = subject if subject is not None else rendered.subject
            if channel == NotificationChannel.SMS and rendered.sms is not None:
                text = text if text is not None else rendered.sms
            text = text if text is not None else rendered.text
            html = html if html is not None else rendered.html
        if notification.fallback is not None:
            fallback = notification.fallback.value
            if not self._chains.get(fallback):
                raise ConfigurationError(f"fallback channel {fallback!r} has no provider")
            for address in notification.fallback_to.values():
                self._route(fallback, address)[0].provider.validate(address)
        priority = notification.priority.value
        providers: list[Provider] = []
        messages: list[OutboundMessage] = []
        for recipient in notification.to:
            provider = self._route(channel, recipient)[0].provider
            providers.append(provider)
            messages.append(
                OutboundMessage(
                    notification_id=notification.id,
                    channel=channel,
                    recipient=provider.validate(recipient),
                    subject=subject,
                    text=text,
                    html=html,
                    data=notification.data,
                    attachments=notification.attachments,
                    priority=priority,
                    sender=notification.sender,
                    reply_to=notification.reply_to,
                    headers=notification.headers,
                    tenant_id=notification.tenant_id,
                    metadata=notification.metadata,
                )
            )
        checked: set[str] = set()
        for provider, message in zip(providers, messages, strict=True):
            if provider.name not in checked:  # once per provider: sender, headers, body
                provider.check(message)
                checked.add(provider.name)
        return messages

    def _sends_counter(self, channel: str, status: str, provider: str) -> metrics.BoundCounter:
        key = (channel, status, provider)
        bound = self._bound_sends.get(key)
        if bound is None:
            attrs = {"notification.channel": channel, "notification.status": status,
                     "notification.provider": provider}  # fmt: skip
            bound = metrics.counter(_SENDS, unit="{delivery}").bind(attrs)
            if len(self._bound_sends) < 10_000:  # channels x statuses x providers: few
                self._bound_sends[key] = bound
        return bound

    def _route(self, channel: str, recipient: str) -> list[GuardedProvider]:
        # The returned list may be shared (the per-channel cache): callers must not change it.
        route = self._routes.get(channel)
        if route is not None:
            return route if route[0].provider.failover else route[:1]
        chain = [g for g in self._chains.get(channel, ()) if g.provider.handles(recipient)]
        if chain and not chain[0].provider.failover:
            chain = chain[:1]
        if not chain:
            names = ", ".join(g.name for g in self._chains.get(channel, ())) or "none"
            raise InvalidRecipientError(
                f"no {channel} provider handles recipient {recipient!r} (providers: {names})"
            )
        return chain

    def _send_prepared(
        self, notification: Notification, messages: list[OutboundMessage]
    ) -> Coroutine[Any, Any, NotificationResult]:
        if notification.idempotency_key is None and notification.send_at is None:
            # Nothing to claim, release or schedule (the common case): the delivery itself,
            # without a coroutine around it that every resumption of the send would go through.
            return self._deliver_all(notification, messages)
        return self._send_claimed(notification, messages)

    async def _send_claimed(
        self, notification: Notification, messages: list[OutboundMessage]
    ) -> NotificationResult:
        key = notification.idempotency_key
        if key is not None:
            holder = await self.store.claim(key, notification.id, self.idempotency_ttl)
            if holder is not None:
                return await self._deduplicated(notification, holder)
        try:
            if notification.send_at is not None and not notification.due(self._now()):
                return await self._schedule(notification)
            return await self._deliver_all(notification, messages)
        except BaseException:
            if key is not None:  # nothing was sent: let a retry of the call go through
                with contextlib.suppress(CommunicationsError):
                    await self.store.release(key, notification.id)
            raise

    async def _deduplicated(self, notification: Notification, holder: str) -> NotificationResult:
        first = await self.store.get_result(holder)
        recipients = [d.recipient for d in first.deliveries] if first else list(notification.to)
        deliveries = tuple(
            DeliveryResult(r, DeliveryStatus.DEDUPLICATED, channel=notification.channel.value)
            for r in recipients
        )
        metrics.counter(_SENDS, unit="{delivery}").add(
            len(deliveries),
            {
                "notification.channel": notification.channel.value,
                "notification.status": "deduplicated",
            },
        )
        return NotificationResult.of(holder, deliveries)

    async def _schedule(self, notification: Notification) -> NotificationResult:
        await self.store.schedule(notification)
        result = NotificationResult.of(
            notification.id,
            tuple(
                DeliveryResult(r, DeliveryStatus.SCHEDULED, channel=notification.channel.value)
                for r in notification.to
            ),
        )
        await self._record(notification.id, [self._entry("scheduled")])
        await self.store.save_result(result, self.history_ttl)
        return result

    async def _deliver_each(
        self, notification: Notification, messages: list[OutboundMessage]
    ) -> tuple[DeliveryResult, ...]:
        if len(messages) == 1:  # the common case: no gate, no gather
            return (await self._deliver(notification, messages[0]),)
        gate = asyncio.Semaphore(self.recipient_concurrency)

        async def one(message: OutboundMessage) -> DeliveryResult:
            async with gate:
                return await self._deliver(notification, message)

        return tuple(await asyncio.gather(*(one(m) for m in messages)))

    async def _deliver_all(
        self,
        notification: Notification,
        messages: list[OutboundMessage],
        *,
        merge: bool = False,
    ) -> NotificationResult:
        """Deliver to every recipient; with ``merge``, update the saved result's deliveries."""
        start = time.perf_counter()
        if tracing.is_active():
            with tracing.span(
                "notification.send",
                {"notification.channel": notification.channel.value,
                 "notification.id": notification.id,
                 "notification.recipients": len(messages)},
                kind=SpanKind.PRODUCER,
            ):  # fmt: skip
                deliveries = await self._deliver_each(notification, messages)
        elif len(messages) == 1:  # the common case, one coroutine less on every resumption
            deliveries = (await self._deliver(notification, messages[0]),)
        else:
            deliveries = await self._deliver_each(notification, messages)
        result = NotificationResult.of(notification.id, deliveries)
        if merge:
            earlier = await self.store.get_result(notification.id)
            if earlier is not None:
                fresh = {d.recipient: d for d in deliveries}
                kept = tuple(fresh.pop(d.recipient, d) for d in earlier.deliveries)
                result = NotificationResult.of(notification.id, kept + tuple(fresh.values()))
        await self.store.save_result(result, self.history_ttl)
        self._duration(notification.channel.value, result.status.value).record(
            time.perf_counter() - start
        )
        return result

    def _duration(self, channel: str, status: str) -> metrics.BoundHistogram:
        key = (channel, status)
        bound = self._bound_durations.get(key)
        if bound is None:
            attrs = {"notification.channel": channel, "notification.status": status}
            bound = metrics.histogram(_DURATION, unit="s").bind(attrs)
            if len(self._bound_durations) < 1_000:  # channels x statuses: few
                self._bound_durations[key] = bound
        return bound

    async def _deliver(
        self, notification: Notification, message: OutboundMessage, origin: str | None = None
    ) -> DeliveryResult:
        # ``origin``: the user a fallback delivery stands in for (dead letters replay to them).
        reason = await self.store.suppressed(message.channel, message.recipient)
        if reason is not None:
            return await self._finish(
                notification, message, DeliveryStatus.SUPPRESSED, error=reason
            )
        chain = self._route(message.channel, message.recipient)  # never empty: it raises
        # The first provider is tried here, not in a helper: its send is the common case, and
        # every resumption of it would pass through one more coroutine.
        outcome = await chain[0].send(message, self._attempt_failed)
        provider = chain[0].name
        if outcome.receipt is None:
            outcome, provider = await self._fail_over(message, chain, outcome)
        if outcome.receipt is not None:
            return await self._finish(
                notification, message, DeliveryStatus.SENT, provider=provider,
                attempts=outcome.attempts, message_id=outcome.receipt.provider_message_id,
            )  # fmt: skip
        error = outcome.error
        if isinstance(error, RecipientOfflineError) and notification.fallback is not None:
            return await self._fall_back(notification, message, error)
        if isinstance(error, RecipientUnregisteredError):
            await self.store.suppress(message.channel, message.recipient, str(error))
            return await self._finish(
                notification, message, DeliveryStatus.SUPPRESSED, provider=provider,
                attempts=outcome.attempts, error=str(error),
            )  # fmt: skip
        text = f"{type(error).__name__}: {error}"
        return await self._fail(
            notification, message, text, provider=provider, attempts=outcome.attempts,
            recipient=origin,
        )  # fmt: skip

    async def _fail(
        self,
        notification: Notification,
        message: OutboundMessage,
        error: str,
        *,
        provider: str | None,
        attempts: int,
        recipient: str | None = None,
    ) -> DeliveryResult:
        # ``recipient``: the notification's own recipient when ``message`` went to a fallback.
        original = recipient or message.recipient
        await self.store.add_dead(
            NotificationDeadLetter(
                id=f"{notification.id}:{original}",
                notification=notification,
                recipient=original,
                error=error,
                attempts=attempts,
                time=self._now(),
                provider=provider,
            )
        )
        return await self._finish(
            notification, message, DeliveryStatus.FAILED, provider=provider,
            attempts=attempts, error=error,
        )  # fmt: skip

    async def _attempt_failed(
        self, message: OutboundMessage, provider: str, attempt: int, exc: BaseException
    ) -> None:
        await self._record(
            message.notification_id,
            [self._entry("attempt_failed", message.recipient, provider, attempt, str(exc))],
        )

    async def _fail_over(
        self, message: OutboundMessage, chain: list[GuardedProvider], first: Outcome
    ) -> tuple[Outcome, str]:
        # The first provider of ``chain`` failed with ``first``: the next ones, in order, unless
        # no provider can do better for this recipient.
        attempts = first.attempts
        outcome = first
        provider = chain[0].name
        if not is_final_for_recipient(outcome.error):
            for guarded in chain[1:]:
                provider = guarded.name
                outcome = await guarded.send(message, self._attempt_failed)
                attempts += outcome.attempts
                if outcome.receipt is not None or is_final_for_recipient(outcome.error):
                    break
        return Outcome(attempts, receipt=outcome.receipt, error=outcome.error), provider

    async def _fall_back(
        self, notification: Notification, message: OutboundMessage, offline: Exception
    ) -> DeliveryResult:
        assert notification.fallback is not None  # noqa: S101 -- checked by the caller
        channel = notification.fallback.value
        address = notification.fallback_to.get(message.recipient)
        if address is None:
            error = f"{offline}; no fallback_to address for this user on {channel!r}"
            return await self._fail(notification, message, error, provider=None, attempts=1)
        fallback = OutboundMessage(
            notification_id=message.notification_id,
            channel=channel,
            recipient=self._route(channel, address)[0].provider.validate(address),
            subject=message.subject,
            text=message.text,
            html=message.html,
            data=message.data,
            priority=message.priority,
            tenant_id=message.tenant_id,
            metadata=message.metadata,
        )
        result = await self._deliver(notification, fallback, origin=message.recipient)
        # One result per recipient of the notification: the user, delivered on the fallback.
        return dataclasses.replace(result, recipient=message.recipient)

    async def _finish(
        self,
        notification: Notification,
        message: OutboundMessage,
        status: DeliveryStatus,
        *,
        provider: str | None = None,
        attempts: int = 0,
        error: str | None = None,
        message_id: str | None = None,
    ) -> DeliveryResult:
        result = DeliveryResult(
            recipient=message.recipient,
            status=status,
            provider=provider,
            attempts=attempts,
            error=error,
            provider_message_id=message_id,
            channel=message.channel,
        )
        event = status.value
        entry = StatusEntry(self._now(), event, message.recipient, provider, attempts, error,
                            message_id)  # fmt: skip
        await self._record(notification.id, [entry])
        self._sends_counter(message.channel, event, provider or "").add(1)
        if status is DeliveryStatus.FAILED:
            log.error(
                "notifications: %s to %s failed after %d attempt(s): %s",
                message.channel, message.recipient, attempts, error,
            )  # fmt: skip
        if self.events is not None:
            await self._emit(notification, result)
        return result

    async def _emit(self, notification: Notification, result: DeliveryResult) -> None:
        if self.events is None:
            return
        data = {
            "notification_id": notification.id,
            "channel": result.channel,
            "recipient": result.recipient,
            "status": result.status.value,
            "provider": result.provider,
            "attempts": result.attempts,
            "error": result.error,
            "provider_message_id": result.provider_message_id,
            "metadata": notification.metadata,
        }
        try:
            await self.events.publish(
                f"notification.{result.status.value}",
                data,
                key=notification.id,
                tenant_id=notification.tenant_id,
            )
        except CommunicationsError as exc:
            # The delivery itself is done and recorded; a lost event must not fail it.
            log.warning("notifications: could not publish notification.%s: %s",
                        result.status.value, exc)  # fmt: skip

    # --------------------------------------------------------------------------- scheduler
    async def _schedule_loop(self) -> None:
        while True:
            try:
                await self.run_due()
            except CommunicationsError as exc:
                log.warning("notifications: scheduler could not read due notifications: %s", exc)
            except Exception:
                # Deliberately broad: the scheduler must outlive any one bad notification.
                log.exception("notifications: scheduler error")
            # Polling cadence is real time; whether something is due is judged on the clock.
            await asyncio.sleep(self.scheduler_interval)

    async def run_due(self, limit: int = 100) -> int:
        """Send the scheduled notifications that are due now; return how many were sent.

        The scheduler calls this every ``scheduler_interval``; tests and cron-style hosts may
        call it directly.
        """
        due = await self.store.take_due(self._now(), limit, lease=max(60.0, self.retry_budget()))
        for notification in due:
            try:
                messages = self._prepare(notification)
                await self._deliver_all(notification, messages)
            except (NotificationError, ConfigurationError) as exc:
                # It cannot be sent as it stands (a template or provider went away since it
                # was scheduled): dead-letter every recipient, to replay once that is fixed.
                log.error(  # noqa: TRY400 -- bad input or configuration, not a bug
                    "notifications: scheduled %s cannot be sent: %s", notification.id, exc
                )
                deliveries = []
                for recipient in notification.to:
                    message = OutboundMessage(
                        notification.id, notification.channel.value, recipient
                    )
                    failed = await self._fail(
                        notification, message, f"{type(exc).__name__}: {exc}",
                        provider=None, attempts=0,
                    )  # fmt: skip
                    deliveries.append(failed)
                result = NotificationResult.of(notification.id, tuple(deliveries))
                await self.store.save_result(result, self.history_ttl)
            await self.store.finish_scheduled(notification.id)
        return len(due)

    def retry_budget(self) -> float:
        """Rough upper bound of one delivery's retries, in seconds (the scheduler's lease)."""
        retry = self.retry
        return float(retry.max_attempts) * (retry.max_delay + 30.0)

    # ----------------------------------------------------------------------------- helpers
    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.time(), UTC)

    def _entry(  # noqa: PLR0917 -- mirrors StatusEntry's fields, in order
        self,
        event: str,
        recipient: str | None = None,
        provider: str | None = None,
        attempt: int = 0,
        error: str | None = None,
        message_id: str | None = None,
    ) -> StatusEntry:
        return StatusEntry(self._now(), event, recipient, provider, attempt, error, message_id)

    async def _record(self, notification_id: str, entries: list[StatusEntry]) -> None:
        try:
            await self.store.record(notification_id, entries, self.history_ttl)
        except CommunicationsError as exc:
            # History is informative; the delivery already happened and must not be reported
            # as failed because its history could not be written.
            log.warning("notifications: could not record history of %s: %s", notification_id, exc)


class NotificationDeadLetters:
    """Deliveries that failed on every provider, with what is needed to replay them."""

    def __init__(self, service: NotificationService) -> None:
        self._service = service

    async def list(
        self, *, channel: str | None = None, limit: int = 100
    ) -> builtins.list[NotificationDeadLetter]:
        """Dead letters, newest first."""
        return await self._service.store.dead_letters(channel=channel, limit=limit)

    async def replay(
        self, letter_ids: Sequence[str] | None = None, *, channel: str | None = None
    ) -> builtins.list[NotificationResult]:
        """Send the given dead letters (default: all, or all of ``channel``) again.

        Each goes to its one recipient, under its original notification id (the history
        continues); its dead letter is removed first, and a new one is written if it fails
        again.
        """
        service = self._service
        letters = await service.store.dead_letters(channel=channel, limit=1_000_000)
        if letter_ids is not None:
            wanted = set(letter_ids)
            letters = [letter for letter in letters if letter.id in wanted]
        results = []
        for letter in reversed(letters):  # oldest first
            notification = letter.notification.model_copy(
                update={"to": (letter.recipient,), "send_at": None, "idempotency_key": None}
            )
            try:
                messages = service._prepare(notification)
            except (NotificationError, ConfigurationError) as exc:
                # Still cannot be sent (its template or provider is gone): it stays a dead
                # letter, and the other letters are replayed.
                log.error(  # noqa: TRY400 -- expected while the cause is not fixed
                    "notifications: dead letter %s cannot be replayed yet: %s", letter.id, exc
                )
                continue
            if not await service.store.remove_dead([letter.id]):
                continue  # replayed meanwhile by someone else
            await service._record(notification.id, [service._entry("replayed", letter.recipient)])
            results.append(await service._deliver_all(notification, messages, merge=True))
        return results

    async def purge(
        self, letter_ids: Sequence[str] | None = None, *, channel: str | None = None
    ) -> int:
        """Remove dead letters (default: all, or all of ``channel``); return how many."""
        letters = await self._service.store.dead_letters(channel=channel, limit=1_000_000)
        ids = [letter.id for letter in letters]
        if letter_ids is not None:
            wanted = set(letter_ids)
            ids = [i for i in ids if i in wanted]
        return await self._service.store.remove_dead(ids) if ids else 0
