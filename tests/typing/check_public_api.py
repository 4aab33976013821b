"""Type-checked (mypy --strict), never run: the public API used the way host apps use it."""

from __future__ import annotations

from dotmac.communications import CommunicationsConfig, ConfigurationError
from dotmac.communications.errors import is_transient
from dotmac.communications.observability import (
    HealthRegistry,
    configure_logging,
    configure_telemetry,
    get_logger,
    messaging_span,
    metrics,
    redis_check,
)
from dotmac.communications.resilience import CircuitBreaker, RateLimiter, RetryPolicy


async def fetch(order_id: int) -> str:
    return f"order-{order_id}"


async def main() -> None:
    try:
        config = CommunicationsConfig()
    except ConfigurationError as exc:
        raise SystemExit(str(exc)) from exc
    configure_logging(config.log_level, config.log_format or "json")
    with configure_telemetry(config.observability):
        log = get_logger("app")
        policy = RetryPolicy(max_attempts=3, deadline=5.0)
        breaker = CircuitBreaker("orders-api")
        limiter = RateLimiter("orders-api", rate=5.0, capacity=10, redis_url=config.redis_url)

        @policy
        async def fetch_with_retry(order_id: int) -> str:
            return await breaker.call(fetch, order_id)

        await limiter.acquire()
        value: str = await fetch_with_retry(1)
        also: str = await policy.call(fetch, 2)
        metrics.counter("app.fetches").add(1, {"result": "ok"})
        with messaging_span("send", "orders", operation_type="send", system="memory"):
            log.info("fetched", value=value, also=also)
        await limiter.aclose()

        registry = HealthRegistry()
        if config.redis_url:
            registry.register("redis:ping", redis_check(config.redis_url))
        report = await registry.check()
        status: int = report.http_status
        transient: bool = is_transient(TimeoutError())
        log.info("health", status=status, transient=transient)


async def events_usage(config: CommunicationsConfig) -> None:
    from pydantic import BaseModel

    from dotmac.communications.events import (
        Event,
        EventBus,
        MemoryIdempotencyStore,
        Subscription,
        idempotent,
    )

    class Order(BaseModel):
        id: int

    bus = EventBus.from_config(config.events)
    store = MemoryIdempotencyStore()

    @bus.subscribe("orders.*", group="billing", concurrency=4, model=Order)
    @idempotent(store)
    async def bill(event: Event) -> None:
        order = event.data
        assert isinstance(order, Order)

    async def audit(event: Event) -> None:
        pass

    sub: Subscription = bus.subscribe("#", audit, group="audit")
    async with bus:
        sent: Event = await bus.publish("orders.created", Order(id=1), key="c1")
        many: list[Event] = await bus.publish_many([("orders.paid", {"id": 1})])
        letters = await bus.dead_letters.list(group="billing", limit=10)
        replayed: int = await bus.dead_letters.replay([d.id for d in letters])
        await bus.unsubscribe(sub)
        del sent, many, replayed


async def notify(config: CommunicationsConfig) -> None:
    from dotmac.communications.notifications import (
        DeliveryStatus,
        Notification,
        NotificationResult,
        NotificationService,
        StatusEntry,
    )
    from dotmac.communications.notifications.channels.webhook import verify_signature

    svc = NotificationService.from_config(config.notifications)
    svc.templates.register("welcome", subject="Hi {{ name }}", text="Welcome, {{ name }}!")
    async with svc:
        result: NotificationResult = await svc.send(
            Notification(channel="email", to="ann@example.com", template="welcome",
                         context={"name": "Ann"}, idempotency_key="welcome-ann")
        )  # fmt: skip
        sent: bool = result.deliveries[0].status == DeliveryStatus.SENT
        history: list[StatusEntry] = await svc.status(result.id)
        many: list[NotificationResult] = await svc.send_many([], concurrency=5)
        replayed: list[NotificationResult] = await svc.dead_letters.replay()
        del sent, history, many, replayed
    ok: bool = verify_signature(b"{}", "t=1,v1=00", "secret")
    del ok


async def gateway(config: CommunicationsConfig) -> None:
    from dotmac.communications.websockets import (
        GatewayConnection,
        Identity,
        JWTAuthenticator,
        WebSocketGateway,
    )
    from dotmac.communications.websockets.asgi import GatewayEndpoint

    async def authorize(identity: Identity, action: str, channel: str) -> bool:
        return channel.startswith("public:") or identity.tenant_id is not None

    gw = WebSocketGateway(
        config.websockets,
        authenticator=JWTAuthenticator("a-secret-of-at-least-32-bytes-long!!", audience="app"),
        authorizer=authorize,
    )

    @gw.on_connect
    async def hello(connection: GatewayConnection) -> None:
        await connection.send({"type": "hello"})

    async with gw.serve("127.0.0.1", 0):
        delivered: int = await gw.publish("public:news", {"title": "hi"})
        online: bool = gw.is_online("user-1")
        await gw.send_to_user("user-1", {"n": 1})
        del delivered, online
    endpoint = GatewayEndpoint(gw)
    del endpoint
