"""The apprise bridge delivers to a real HTTP server through apprise's json:// plugin."""

from __future__ import annotations

import pytest

from _support.http_server import RecordingHTTPServer, Reply
from dotmac.communications.errors import DeliveryError, InvalidRecipientError
from dotmac.communications.notifications import OutboundMessage
from dotmac.communications.notifications.channels.apprise import AppriseProvider


def _message(recipient: str) -> OutboundMessage:
    return OutboundMessage("n1", "chat", recipient, subject="Deploy", text="v2 is live")


async def test_apprise_json_reaches_the_server(http_server: RecordingHTTPServer) -> None:
    provider = AppriseProvider()
    url = f"json://127.0.0.1:{http_server.port}/hook"
    await provider.send(_message(provider.validate(url)))
    (request,) = http_server.requests
    assert request.path == "/hook"
    body = request.json()
    assert body["title"] == "Deploy"
    assert body["message"] == "v2 is live"


async def test_apprise_failure_is_a_delivery_error(http_server: RecordingHTTPServer) -> None:
    http_server.enqueue(Reply(500, "down"))
    provider = AppriseProvider()
    with pytest.raises(DeliveryError, match="apprise could not notify json://"):
        await provider.send(_message(f"json://127.0.0.1:{http_server.port}/hook"))


def test_unknown_apprise_url_is_refused() -> None:
    with pytest.raises(InvalidRecipientError, match="not an apprise URL"):
        AppriseProvider().validate("nope://what")
