"""The service end to end against real servers: config → providers → bytes at the server.

Fault tests: SMTP server down then up, provider 500 then 200, 429 with Retry-After, a hanging
provider (deadline) with failover, idempotency from two OS processes at once, scheduled sends that
survive a service restart (Redis).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from _support.http_server import RecordingHTTPServer, Reply
from dotmac.communications.config import CommunicationsConfig
from dotmac.communications.notifications import Notification, NotificationService
from dotmac.communications.notifications.channels.webhook import WebhookProvider
from dotmac.communications.resilience import RetryPolicy
from dotmac.communications.testing import FakeClock

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Inbox:
    """aiosmtpd handler keeping every message received."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        self.messages.append((envelope, email.message_from_bytes(raw, policy=email.policy.default)))  # type: ignore[arg-type]
        return "250 OK"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[Controller, Inbox]]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        yield controller, inbox
    finally:
        controller.stop()


def _config(**notifications: Any) -> CommunicationsConfig:
    return CommunicationsConfig(notifications=notifications)


async def test_email_from_config_reaches_the_smtp_server(smtp: tuple[Controller, Inbox]) -> None:
    controller, inbox = smtp
    config = _config(
        email={"host": "127.0.0.1", "port": controller.port, "from_address": "app@example.com"}
    )
    svc = NotificationService.from_config(config.notifications)
    svc.templates.register(
        "welcome", subject="Welcome {{ name }}", text="Hi {{ name }}!", html="<p>Hi {{ name }}!</p>"
    )
    async with svc:
        result = await svc.send(
            Notification(
                channel="email",
                to=["a@example.com", "b@example.com"],
                template="welcome",
                context={"name": "<Ann>"},
            )
        )
    assert result.status == "sent"
    assert sorted(env.rcpt_tos[0] for env, _ in inbox.messages) == [
        "a@example.com",
        "b@example.com",
    ]
    _, msg = inbox.messages[0]
    assert msg["Subject"] == "Welcome <Ann>"
    assert msg["From"] == "app@example.com"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert text.strip() == "Hi <Ann>!"
    assert "<p>Hi &lt;Ann&gt;!</p>" in html
    ids = {d.provider_message_id for d in result.deliveries}
    assert ids == {m["Message-ID"] for _, m in inbox.messages}


async def test_smtp_server_down_then_up_is_retried_and_delivered() -> None:
    inbox = Inbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    started: list[int] = []

    def bring_up(_attempt: object) -> None:
        if not started:  # the first failure brings the server up for the retry
            controller.start()
            started.append(1)

    config = _config(email={"host": "127.0.0.1", "port": port, "from_address": "app@example.com"})
    retry = RetryPolicy(max_attempts=3, initial_delay=0.01, on_retry=bring_up)
    try:
        async with NotificationService.from_config(config.notifications, retry=retry) as svc:
            result = await svc.send(Notification(channel="email", to="a@example.com", text="x"))
    finally:
        if started:
            controller.stop()
    delivery = result.deliveries[0]
    assert delivery.status == "sent"
    assert delivery.attempts == 2
    assert len(inbox.messages) == 1
    events = [e.event for e in await svc.status(result.id)]
    assert events == ["attempt_failed", "sent"]


async def test_smtp_server_that_stays_down_ends_in_dead_letters_and_replays() -> None:
    inbox = Inbox()
    port = _free_port()
    config = _config(email={"host": "127.0.0.1", "port": port, "from_address": "app@example.com"})
    clock = FakeClock()
    svc = NotificationService.from_config(
        config.notifications, retry=RetryPolicy(max_attempts=2, clock=clock), clock=clock
    )
    async with svc:
        result = await svc.send(Notification(channel="email", to="a@example.com", text="later"))
        assert result.status == "failed"
        (letter,) = await svc.dead_letters.list()
        assert "127.0.0.1" in letter.error
        controller = Controller(inbox, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            (replayed,) = await svc.dead_letters.replay()
        finally:
            controller.stop()
    assert replayed.status == "sent"
    assert len(inbox.messages) == 1
    assert inbox.messages[0][1].get_content().strip() == "later"


def _hook(server: RecordingHTTPServer, **kwargs: Any) -> WebhookProvider:
    kwargs.setdefault("allow_private_targets", True)
    return WebhookProvider(secret="s3cret", **kwargs)


async def test_webhook_500_then_200_is_retried(http_server: RecordingHTTPServer) -> None:
    http_server.enqueue(Reply(500, "boom"))
    clock = FakeClock()
    async with NotificationService([_hook(http_server)], clock=clock) as svc:
        result = await svc.send(
            Notification(channel="webhook", to=f"{http_server.url}/hook", data={"a": 1})
        )
    assert result.deliveries[0].status == "sent"
    assert result.deliveries[0].attempts == 2
    assert [r.json() for r in http_server.requests] == [{"a": 1}, {"a": 1}]


async def test_webhook_429_retry_after_is_waited(http_server: RecordingHTTPServer) -> None:
    http_server.enqueue(Reply(429, "", {"Retry-After": "3"}))
    clock = FakeClock()
    async with NotificationService([_hook(http_server)], clock=clock) as svc:
        result = await svc.send(
            Notification(channel="webhook", to=f"{http_server.url}/hook", data={})
        )
    assert result.deliveries[0].status == "sent"
    assert clock.sleeps[0] >= 3.0


async def test_hanging_provider_hits_its_deadline_and_fails_over(
    http_server: RecordingHTTPServer,
) -> None:
    http_server.enqueue(Reply(200, {}, delay=5.0))
    primary = _hook(http_server, timeout=0.3, name="primary")
    secondary = _hook(http_server, name="secondary")
    started = time.monotonic()
    async with NotificationService([primary, secondary], retry=RetryPolicy(max_attempts=1)) as svc:
        result = await svc.send(
            Notification(channel="webhook", to=f"{http_server.url}/hook", data={})
        )
    assert time.monotonic() - started < 3.0
    delivery = result.deliveries[0]
    assert (delivery.status, delivery.provider) == ("sent", "secondary")
    history = await svc.status(result.id)
    assert "OperationTimeoutError" in (history[0].error or "") or "within" in (
        history[0].error or ""
    )


_IDEMPOTENT_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from dotmac.communications.notifications import Notification, NotificationService
    from dotmac.communications.notifications._store_redis import RedisStore
    from dotmac.communications.notifications.channels.webhook import WebhookProvider

    async def main(redis_url, target, start_at):
        hook = WebhookProvider(secret=None, allow_private_targets=True)
        async with NotificationService([hook], store=RedisStore(url=redis_url)) as svc:
            n = Notification(channel="webhook", to=target, data={"pid": 1}, idempotency_key="once")
            await asyncio.sleep(max(0.0, start_at - time.time()))
            result = await svc.send(n)
            print(json.dumps({"id": result.id, "status": result.status.value}))

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)


async def test_idempotency_key_from_two_processes_sends_once(
    http_server: RecordingHTTPServer, redis_url: str
) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    start_at = time.time() + 1.5  # both processes send at the same moment
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _IDEMPOTENT_CHILD,
            redis_url,
            f"{http_server.url}/hook",
            str(start_at),
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [json.loads((await p.communicate())[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o["status"] for o in outs) == ["deduplicated", "sent"]
    assert outs[0]["id"] == outs[1]["id"]
    await asyncio.sleep(0.2)
    assert len(http_server.requests) == 1


async def test_scheduled_send_survives_a_service_restart_on_redis(
    http_server: RecordingHTTPServer, redis_url: str
) -> None:
    from dotmac.communications.notifications._store_redis import RedisStore

    target = f"{http_server.url}/later"
    send_at = datetime.now(UTC) + timedelta(seconds=0.5)
    async with NotificationService([_hook(http_server)], store=RedisStore(url=redis_url)) as first:
        result = await first.send(
            Notification(channel="webhook", to=target, data={"x": 1}, send_at=send_at)
        )
        assert result.status == "scheduled"
    assert http_server.requests == []  # the first service stopped before it was due
    async with NotificationService(
        [_hook(http_server)], store=RedisStore(url=redis_url), scheduler_interval=0.05
    ) as second:
        for _ in range(100):
            if http_server.requests:
                break
            await asyncio.sleep(0.05)
        history = [e.event for e in await second.status(result.id)]
    assert [r.json() for r in http_server.requests] == [{"x": 1}]
    assert history == ["scheduled", "sent"]


async def test_bad_sender_or_header_is_refused_at_the_call(smtp: tuple[Controller, Inbox]) -> None:
    """What is wrong for every recipient raises at send(); nothing reaches the server."""
    from dotmac.communications.errors import ConfigurationError, InvalidRecipientError

    controller, inbox = smtp
    no_from = _config(email={"host": "127.0.0.1", "port": controller.port})
    async with NotificationService.from_config(no_from.notifications) as svc:
        with pytest.raises(ConfigurationError, match="no From address"):
            await svc.send(Notification(channel="email", to="a@example.com", text="x"))
        with pytest.raises(InvalidRecipientError, match="sender"):
            await svc.send(
                Notification(channel="email", to="a@example.com", text="x", sender="nope")
            )
        with pytest.raises(InvalidRecipientError, match="Cc"):
            await svc.send(
                Notification(channel="email", to="a@example.com", text="x", sender="a@example.com",
                             headers={"Cc": "b@example.com"})
            )  # fmt: skip
        assert await svc.dead_letters.list() == []
    assert inbox.messages == []
