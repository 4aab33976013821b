"""Slack, Discord and Teams providers against a real loopback HTTP server."""

from __future__ import annotations

import pytest

from _support.http_server import Reply
from dotmac.communications.errors import (
    ConfigurationError,
    DeliveryError,
    InvalidRecipientError,
    PermanentDeliveryError,
)
from dotmac.communications.notifications._models import OutboundMessage
from dotmac.communications.notifications.channels.chat import (
    DiscordProvider,
    SlackProvider,
    TeamsProvider,
)

CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"


def _message(recipient: str, **kw) -> OutboundMessage:
    kw.setdefault("subject", "Outage in Zone 3")
    kw.setdefault("text", "Fibre cut near *Main St*; ETA 2h.")
    return OutboundMessage(notification_id="n-1", channel="chat", recipient=recipient, **kw)


async def test_slack_payload_exact(http_server):
    """Slack receives text fallback, a header block and a mrkdwn section; 200 ok is sent."""
    http_server.enqueue(Reply(200, "ok", headers={"Content-Type": "text/html"}))
    async with SlackProvider(allow_private_targets=True) as slack:
        receipt = await slack.send(_message(f"{http_server.url}/services/T1/B2/xyz"))
    [req] = http_server.requests
    assert (req.method, req.path) == ("POST", "/services/T1/B2/xyz")
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"].startswith("dotmac-communications/")
    assert req.json() == {
        "text": "Outage in Zone 3\nFibre cut near *Main St*; ETA 2h.",
        "blocks": [
            {
                "type": "header",
                "text": {"type": "plain_text", "text": "Outage in Zone 3", "emoji": True},
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "Fibre cut near *Main St*; ETA 2h."},
            },
        ],
    }
    assert (receipt.provider_message_id, receipt.detail) == (None, "HTTP 200")
    assert slack.name == "slack"
    assert slack.channel == "chat"


async def test_slack_blocks_from_data_and_limits(http_server):
    """data["blocks"] replaces the blocks; header and section text are cut to 150 and 3000."""
    blocks = [{"type": "divider"}]
    async with SlackProvider(allow_private_targets=True) as slack:
        await slack.send(_message(http_server.url, text="hi", data={"blocks": blocks}))
        await slack.send(_message(http_server.url, subject="S" * 200, text="x" * 3500))
    first, second = (r.json() for r in http_server.requests)
    assert first == {"text": "Outage in Zone 3\nhi", "blocks": blocks}
    header, section = second["blocks"]
    assert header["text"]["text"] == "S" * 149 + "…"
    assert section["text"]["text"] == "x" * 2999 + "…"
    assert len(second["text"]) == 200 + 1 + 3500  # fallback within Slack's 40,000


async def test_slack_errors_mapped(http_server):
    """404 no_service and 400 invalid_payload are permanent; 429 is transient with Retry-After."""
    http_server.enqueue(
        Reply(404, "no_service"),
        Reply(400, "invalid_payload"),
        Reply(429, "rate_limited", headers={"Retry-After": "3"}),
        Reply(200, {"ok": False, "error": "invalid_blocks"}),
    )
    url = f"{http_server.url}/services/T/B/X"
    async with SlackProvider(allow_private_targets=True) as slack:
        with pytest.raises(PermanentDeliveryError, match=r"HTTP 404.*no_service") as info:
            await slack.send(_message(url))
        assert not info.value.transient
        with pytest.raises(PermanentDeliveryError, match="invalid_payload"):
            await slack.send(_message(url))
        with pytest.raises(DeliveryError, match="HTTP 429") as limited:
            await slack.send(_message(url))
        assert limited.value.transient
        assert limited.value.retry_after == 3
        with pytest.raises(PermanentDeliveryError, match="invalid_blocks"):
            await slack.send(_message(url))


async def test_default_recipient_uses_webhook_url(http_server):
    """The recipient "default" posts to the configured webhook_url."""
    async with SlackProvider(
        webhook_url=f"{http_server.url}/services/T/B/default", allow_private_targets=True
    ) as slack:
        assert slack.validate("default") == "default"
        await slack.send(_message("default"))
    assert http_server.requests[0].path == "/services/T/B/default"


def test_recipient_validation():
    """A non-URL recipient, or "default" without webhook_url, is refused with a clear message."""
    slack = SlackProvider()
    with pytest.raises(InvalidRecipientError, match="needs a configured webhook_url"):
        slack.validate("default")
    with pytest.raises(InvalidRecipientError, match="webhook URL or 'default'"):
        slack.validate("#general")
    with pytest.raises(InvalidRecipientError, match=r"notifications\.webhook\.allow_private"):
        slack.validate("http://127.0.0.1:9/hook")
    with pytest.raises(ConfigurationError, match="webhook_url"):
        TeamsProvider(webhook_url="http://10.1.2.3/hook")
    with pytest.raises(ConfigurationError, match=r"webhook_url.*http or https"):
        DiscordProvider(webhook_url="ftp://discord.example/hook")


async def test_private_target_refused_without_request(http_server):
    """A loopback target is refused unless allowed; the server sees nothing."""
    async with DiscordProvider() as discord:
        with pytest.raises(InvalidRecipientError, match="private/loopback"):
            await discord.send(_message(f"http://localhost:{http_server.port}/api/webhooks/1/t"))
        with pytest.raises(InvalidRecipientError, match="private/loopback"):
            await discord.send(_message(f"{http_server.url}/api/webhooks/1/t"))
    assert http_server.requests == []


async def test_discord_payload_wait_and_message_id(http_server):
    """Discord gets a titled embed, ?wait=true (other query kept) and returns the message id."""
    http_server.enqueue(Reply(200, {"id": "1180000000000000001", "channel_id": "42"}))
    url = f"{http_server.url}/api/webhooks/1/tok?thread_id=77"
    async with DiscordProvider(allow_private_targets=True) as discord:
        receipt = await discord.send(_message(url))
    [req] = http_server.requests
    assert req.path == "/api/webhooks/1/tok"
    assert req.query == {"thread_id": ["77"], "wait": ["true"]}
    assert req.json() == {
        "allowed_mentions": {"parse": []},
        "embeds": [
            {"title": "Outage in Zone 3", "description": "Fibre cut near *Main St*; ETA 2h."}
        ],
    }
    assert receipt.provider_message_id == "1180000000000000001"
    assert receipt.detail == "HTTP 200"


async def test_discord_text_only_content_and_limits(http_server):
    """Without a subject Discord gets content cut to 2000; data overrides (mentions, username)."""
    async with DiscordProvider(allow_private_targets=True) as discord:
        receipt = await discord.send(_message(http_server.url, subject=None, text="y" * 2500))
        await discord.send(
            _message(
                http_server.url,
                subject=None,
                text="@here deploy",
                data={"username": "NOC", "allowed_mentions": {"parse": ["everyone"]}},
            )
        )
    first, second = (r.json() for r in http_server.requests)
    assert first == {"allowed_mentions": {"parse": []}, "content": "y" * 1999 + "…"}
    assert second == {
        "allowed_mentions": {"parse": ["everyone"]},
        "content": "@here deploy",
        "username": "NOC",
    }
    assert receipt.provider_message_id is None  # the test server answered {} without an id


async def test_discord_errors_mapped(http_server):
    """Discord 404 Unknown Webhook is permanent; 429 transient with retry_after; 502 transient."""
    http_server.enqueue(
        Reply(404, {"message": "Unknown Webhook", "code": 10015}),
        Reply(429, {"retry_after": 1.5}, headers={"Retry-After": "2"}),
        Reply(502, "bad gateway"),
    )
    async with DiscordProvider(allow_private_targets=True) as discord:
        with pytest.raises(PermanentDeliveryError, match="Unknown Webhook"):
            await discord.send(_message(http_server.url))
        with pytest.raises(DeliveryError) as limited:
            await discord.send(_message(http_server.url))
        assert limited.value.retry_after == 2
        with pytest.raises(DeliveryError, match="HTTP 502") as bad:
            await discord.send(_message(http_server.url))
        assert bad.value.transient


async def test_teams_adaptive_card_exact(http_server):
    """Teams receives an Adaptive Card 1.4 message; 202 Accepted is sent."""
    http_server.enqueue(Reply(202))
    async with TeamsProvider(allow_private_targets=True, name="teams-noc") as teams:
        receipt = await teams.send(_message(f"{http_server.url}/workflows/abc?sig=x"))
    [req] = http_server.requests
    assert req.query == {"sig": ["x"]}
    assert req.json() == {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "$schema": CARD_SCHEMA,
                    "body": [
                        {
                            "type": "TextBlock",
                            "text": "Outage in Zone 3",
                            "weight": "Bolder",
                            "size": "Medium",
                            "wrap": True,
                        },
                        {
                            "type": "TextBlock",
                            "text": "Fibre cut near *Main St*; ETA 2h.",
                            "wrap": True,
                        },
                    ],
                },
            }
        ],
    }
    assert receipt.detail == "HTTP 202"
    assert teams.name == "teams-noc"


async def test_teams_text_cut_by_utf8_bytes(http_server):
    """Teams text is cut to 20,000 UTF-8 bytes without splitting a character."""
    async with TeamsProvider(allow_private_targets=True) as teams:
        await teams.send(_message(http_server.url, subject=None, text="é" * 15_000))
    [block] = http_server.requests[0].json()["attachments"][0]["content"]["body"]
    assert block["text"].endswith("é…")
    assert len(block["text"].encode()) <= 20_000
    assert len(block["text"].encode()) >= 19_990


async def test_html_only_message_refused(http_server):
    """A chat message with neither subject, text nor data is refused permanently, unsent."""
    async with SlackProvider(allow_private_targets=True) as slack:
        with pytest.raises(PermanentDeliveryError, match="needs a subject or text"):
            await slack.send(_message(http_server.url, subject=None, text=None, html="<b>x</b>"))
    assert http_server.requests == []


async def test_service_routes_each_chat_recipient_to_one_provider(http_server) -> None:
    """By name or vendor host; a URL on an unknown host goes to the first; never failed over."""
    from dotmac.communications.notifications import Notification, NotificationService
    from dotmac.communications.notifications.channels.chat import (
        DiscordProvider,
        SlackProvider,
        TeamsProvider,
    )

    slack = SlackProvider(webhook_url=f"{http_server.url}/slack", allow_private_targets=True)
    discord = DiscordProvider(webhook_url=f"{http_server.url}/discord", allow_private_targets=True)
    teams = TeamsProvider(webhook_url=f"{http_server.url}/teams", allow_private_targets=True)
    assert discord.handles("https://discord.com/api/webhooks/1/x")
    assert not slack.handles("https://discord.com/api/webhooks/1/x")
    assert teams.handles("https://x.webhook.office.com/webhookb2/abc")
    assert not discord.handles("https://hooks.slack.com/services/T/B/x")
    http_server.enqueue(Reply(200, {"id": "d1"}), Reply(200, ""), Reply(500, "down"))
    async with NotificationService([slack, discord, teams]) as svc:
        result = await svc.send(
            Notification(channel="chat", to=["discord", "teams"], subject="S", text="T")
        )
        assert [d.provider for d in result.deliveries] == ["discord", "teams"]
        retried = await svc.send(Notification(channel="chat", to="slack", text="T"))
    paths = [r.path for r in http_server.requests]
    assert sorted(paths[:2]) == ["/discord", "/teams"]
    # Slack's 500 is retried on Slack only: the other vendors never see a Slack payload.
    assert set(paths[2:]) == {"/slack"}
    assert retried.deliveries[0].provider == "slack"
