"""NotificationService.from_config builds the providers the settings describe, and they deliver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from _support.http_server import RecordingHTTPServer
from dotmac.communications.config import CommunicationsConfig
from dotmac.communications.errors import ConfigurationError
from dotmac.communications.notifications import Notification, NotificationService


def _service_account(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = tmp_path / "sa.json"
    path.write_text(
        json.dumps(
            {"type": "service_account", "project_id": "proj", "private_key": pem,
             "client_email": "svc@proj.iam.gserviceaccount.com",
             "token_uri": "https://oauth2.googleapis.com/token"}
        )
    )  # fmt: skip
    return path


def _vapid_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def test_every_configured_provider_is_built(tmp_path: Path) -> None:
    config = CommunicationsConfig(
        notifications={
            "email": {"host": "127.0.0.1", "from_address": "app@example.com"},
            "sms": {"provider": "twilio", "from_number": "+14155550100",
                    "twilio": {"account_sid": "AC1", "auth_token": "t"}},
            "push": {"fcm": {"service_account_file": str(_service_account(tmp_path))},
                     "webpush": {"vapid_private_key": _vapid_pem(),
                                 "vapid_subject": "mailto:ops@example.com"}},
            "webhook": {"secret": "s", "allow_private_targets": True},
            "chat": {"slack_webhook_url": "https://hooks.slack.com/services/T/B/x",
                     "teams_webhook_url": "https://x.webhook.office.com/webhookb2/y"},
        }
    )  # fmt: skip
    svc = NotificationService.from_config(config.notifications)
    names = {
        ch: [p.name for p in svc.providers(ch)]
        for ch in ("email", "sms", "push", "webhook", "chat")
    }
    assert names == {
        "email": ["smtp"],
        "sms": ["twilio"],
        "push": ["fcm", "webpush"],
        "webhook": ["webhook"],
        "chat": ["slack", "teams"],
    }


async def test_generic_http_sms_from_config_delivers(http_server: RecordingHTTPServer) -> None:
    config = CommunicationsConfig(
        notifications={
            "sms": {
                "provider": "http",
                "from_number": "+14155550100",
                "http": {
                    "url": f"{http_server.url}/sms",
                    "body_template": {"dest": "{to}", "msg": {"body": "{body}"}},
                    "auth_header": "X-Key",
                    "auth_value": "k1",
                },
            },
            "webhook": {"allow_private_targets": True},
        }
    )
    async with NotificationService.from_config(config.notifications) as svc:
        result = await svc.send(Notification(channel="sms", to="+44 20 7946 0958", text="hi"))
    assert result.status == "sent"
    (request,) = http_server.requests
    assert request.json() == {"dest": "+442079460958", "msg": {"body": "hi"}}
    assert request.headers["x-key"] == "k1"


def test_redis_backend_without_url_is_refused() -> None:
    config = CommunicationsConfig(notifications={"backend": "redis"})
    with pytest.raises(ConfigurationError, match=r"notifications\.redis_url is not set"):
        NotificationService.from_config(config.notifications)


async def test_redis_backend_from_config_shares_idempotency(
    redis_url: str, http_server: RecordingHTTPServer
) -> None:
    config = CommunicationsConfig(
        redis_url=redis_url,
        notifications={"backend": "redis", "webhook": {"allow_private_targets": True}},
    )
    note = Notification(channel="webhook", to=f"{http_server.url}/h", data={}, idempotency_key="k")
    async with NotificationService.from_config(config.notifications) as a:
        first = await a.send(note)
    async with NotificationService.from_config(config.notifications) as b:
        second = await b.send(note.model_copy(update={"id": "other"}))
    assert (first.status, second.status) == ("sent", "deduplicated")
    assert second.id == first.id
    assert len(http_server.requests) == 1
