"""Push providers against a real loopback HTTP server: FCM (HTTP v1 + OAuth2) and Web Push."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os

import http_ece
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from _support.http_server import RecordingHTTPServer, Reply
from dotmac.communications.errors import (
    ConfigurationError,
    DeliveryError,
    InvalidRecipientError,
    PermanentDeliveryError,
    RecipientUnregisteredError,
)
from dotmac.communications.notifications._models import OutboundMessage
from dotmac.communications.notifications.channels.push import FCMProvider, WebPushProvider

NOW = 1_700_000_000.0
SEND_PATH = "/v1/projects/demo-project/messages:send"
DEVICE = "dGVzdC1kZXZpY2U6APA91bHk-token_0123"
EMAIL = "fcm-sender@demo-project.iam.gserviceaccount.com"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def push(recipient: str, **kwargs) -> OutboundMessage:
    return OutboundMessage(notification_id="n-1", channel="push", recipient=recipient, **kwargs)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- FCM --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def account(rsa_key, http_server):
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "kid-1",
        "private_key": pem,
        "client_email": EMAIL,
        "token_uri": f"{http_server.url}/token",
    }


def google(server: RecordingHTTPServer, *, token_delay: float = 0.0, expires_in: int = 3600):
    """Answer /token with tok-1, tok-2, ... and sends with a message name."""
    tokens = itertools.count(1)
    sends = itertools.count(1)

    def respond(request):
        if request.path == "/token":
            body = {"access_token": f"tok-{next(tokens)}", "expires_in": expires_in}
            return Reply(200, {**body, "token_type": "Bearer"}, delay=token_delay)
        return Reply(200, {"name": f"projects/demo-project/messages/{next(sends)}"})

    server.responder = respond


def fcm(server, account, **kwargs) -> FCMProvider:
    return FCMProvider(service_account=account, base_url=server.url, clock=Clock(), **kwargs)


def token_requests(server):
    return [r for r in server.requests if r.path == "/token"]


def send_requests(server):
    return [r for r in server.requests if r.path == SEND_PATH]


async def test_fcm_assertion_and_send_request(http_server, account, rsa_key):
    """The JWT assertion verifies with the account's key; the send body and headers are exact."""
    google(http_server)
    message = push(
        DEVICE,
        subject="Hi",
        text="There",
        data={"s": "x", "n": 1, "b": True, "o": {"k": [1, 2]}},
        priority="urgent",
    )
    async with fcm(http_server, account) as provider:
        receipt = await provider.send(message)
    token_request, send_request = http_server.requests
    assert token_request.method == "POST"
    assert token_request.path == "/token"
    form = token_request.form()
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    (assertion,) = form["assertion"]
    assert jwt.get_unverified_header(assertion) == {"alg": "RS256", "typ": "JWT", "kid": "kid-1"}
    claims = jwt.decode(
        assertion,
        rsa_key.public_key(),
        algorithms=["RS256"],
        audience=f"{http_server.url}/token",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "iss": EMAIL,
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": f"{http_server.url}/token",
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
    }
    assert send_request.method == "POST"
    assert send_request.path == SEND_PATH
    assert send_request.headers["authorization"] == "Bearer tok-1"
    assert send_request.json() == {
        "message": {
            "token": DEVICE,
            "notification": {"title": "Hi", "body": "There"},
            "data": {"s": "x", "n": "1", "b": "true", "o": '{"k":[1,2]}'},
            "android": {"priority": "high"},
            "apns": {"headers": {"apns-priority": "10"}},
        }
    }
    assert receipt.provider_message_id == "projects/demo-project/messages/1"


async def test_fcm_data_only_normal_priority(http_server, account):
    """Without subject/text no notification block is sent; normal priority maps to normal/5."""
    google(http_server)
    async with fcm(http_server, account) as provider:
        await provider.send(push(DEVICE, data={"k": "v"}, priority="low"))
    assert send_requests(http_server)[0].json()["message"] == {
        "token": DEVICE,
        "data": {"k": "v"},
        "android": {"priority": "normal"},
        "apns": {"headers": {"apns-priority": "5"}},
    }


async def test_fcm_token_cached_then_refreshed_after_expiry(http_server, account):
    """Three sends share one token; past expires_in minus 60 s a new one is fetched."""
    google(http_server)
    clock = Clock()
    provider = FCMProvider(service_account=account, base_url=http_server.url, clock=clock)
    async with provider:
        for _ in range(3):
            await provider.send(push(DEVICE, text="x"))
        assert len(token_requests(http_server)) == 1
        clock.now = NOW + 3600 - 61
        await provider.send(push(DEVICE, text="x"))
        assert len(token_requests(http_server)) == 1
        clock.now = NOW + 3600 - 59
        await provider.send(push(DEVICE, text="x"))
    assert len(token_requests(http_server)) == 2
    auths = [r.headers["authorization"] for r in send_requests(http_server)]
    assert auths == ["Bearer tok-1"] * 4 + ["Bearer tok-2"]


async def test_fcm_concurrent_sends_share_one_refresh(http_server, account):
    """Five concurrent sends with no token wait for one slow token request."""
    google(http_server, token_delay=0.3)
    async with fcm(http_server, account) as provider:
        await asyncio.gather(*(provider.send(push(DEVICE, text=str(i))) for i in range(5)))
    assert len(token_requests(http_server)) == 1
    assert len(send_requests(http_server)) == 5
    assert {r.headers["authorization"] for r in send_requests(http_server)} == {"Bearer tok-1"}


async def test_fcm_401_refreshes_and_retries_once(http_server, account):
    """A 401 drops the token, fetches a new one and retries the send once."""
    unauthenticated = {"error": {"code": 401, "message": "bad token", "status": "UNAUTHENTICATED"}}
    http_server.enqueue(
        Reply(200, {"access_token": "old", "expires_in": 3600}),
        Reply(401, unauthenticated),
        Reply(200, {"access_token": "new", "expires_in": 3600}),
        Reply(200, {"name": "projects/demo-project/messages/7"}),
    )
    async with fcm(http_server, account) as provider:
        receipt = await provider.send(push(DEVICE, text="x"))
    paths = [r.path for r in http_server.requests]
    assert paths == ["/token", SEND_PATH, "/token", SEND_PATH]
    assert http_server.requests[3].headers["authorization"] == "Bearer new"
    assert receipt.provider_message_id == "projects/demo-project/messages/7"


async def test_fcm_401_twice_is_permanent_naming_the_account(http_server, account):
    """A second 401 is not retried again: a permanent error naming the service account."""
    unauthenticated = {"error": {"code": 401, "message": "nope", "status": "UNAUTHENTICATED"}}
    http_server.enqueue(
        Reply(200, {"access_token": "a", "expires_in": 3600}),
        Reply(401, unauthenticated),
        Reply(200, {"access_token": "b", "expires_in": 3600}),
        Reply(401, unauthenticated),
    )
    async with fcm(http_server, account) as provider:
        with pytest.raises(PermanentDeliveryError, match=EMAIL):
            await provider.send(push(DEVICE, text="x"))
    assert len(http_server.requests) == 4


def fcm_error(status: int, state: str, code: str | None = None) -> dict:
    details = []
    if code:
        details = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]
    return {
        "error": {
            "code": status,
            "message": "computer says no",
            "status": state,
            "details": details,
        }
    }


async def test_fcm_error_mapping(http_server, account):
    """UNREGISTERED → unregistered; INVALID_ARGUMENT and a bare 404 → permanent; 429/503 → transient."""
    http_server.enqueue(
        Reply(200, {"access_token": "t", "expires_in": 3600}),
        Reply(404, fcm_error(404, "NOT_FOUND", "UNREGISTERED")),
        Reply(400, fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")),
        Reply(404, fcm_error(404, "NOT_FOUND")),
        Reply(429, fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), {"Retry-After": "30"}),
        Reply(503, fcm_error(503, "UNAVAILABLE", "UNAVAILABLE"), {"Retry-After": "2"}),
        Reply(500, "<html>plain failure</html>"),
    )
    async with fcm(http_server, account) as provider:
        with pytest.raises(RecipientUnregisteredError, match="UNREGISTERED"):
            await provider.send(push(DEVICE, text="x"))
        with pytest.raises(PermanentDeliveryError, match="INVALID_ARGUMENT") as invalid:
            await provider.send(push(DEVICE, text="x"))
        with pytest.raises(PermanentDeliveryError, match="check project_id") as bare:
            await provider.send(push(DEVICE, text="x"))
        with pytest.raises(DeliveryError, match="QUOTA_EXCEEDED") as quota:
            await provider.send(push(DEVICE, text="x"))
        with pytest.raises(DeliveryError, match="UNAVAILABLE") as unavailable:
            await provider.send(push(DEVICE, text="x"))
        with pytest.raises(DeliveryError, match=r"HTTP 500 from .*: <html>plain failure"):
            await provider.send(push(DEVICE, text="x"))
    assert not isinstance(invalid.value, RecipientUnregisteredError)
    assert not isinstance(bare.value, RecipientUnregisteredError)
    assert (quota.value.transient, quota.value.retry_after) == (True, 30.0)
    assert (unavailable.value.transient, unavailable.value.retry_after) == (True, 2.0)
    assert len(token_requests(http_server)) == 1


async def test_fcm_token_endpoint_errors(http_server, account):
    """invalid_grant is permanent naming the account; a 5xx is transient; nothing is sent."""
    http_server.enqueue(
        Reply(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
        Reply(502, "bad gateway", {"Retry-After": "5"}),
        Reply(200, {"token_type": "Bearer"}),
    )
    async with fcm(http_server, account) as provider:
        with pytest.raises(PermanentDeliveryError, match="invalid_grant") as refused:
            await provider.send(push(DEVICE, text="x"))
        with pytest.raises(DeliveryError, match="HTTP 502") as down:
            await provider.send(push(DEVICE, text="x"))
        with pytest.raises(PermanentDeliveryError, match="without an access_token"):
            await provider.send(push(DEVICE, text="x"))
    assert EMAIL in str(refused.value)
    assert not refused.value.transient
    assert (down.value.transient, down.value.retry_after) == (True, 5.0)
    assert send_requests(http_server) == []


async def test_fcm_refuses_bad_input_before_any_request(http_server, account):
    """Malformed tokens, reserved data keys and empty messages fail with no request."""
    async with fcm(http_server, account) as provider:
        for bad in ("has space", "x" * 4097, "tökén"):
            with pytest.raises(InvalidRecipientError, match="registration token"):
                provider.validate(bad)
            with pytest.raises(InvalidRecipientError):
                await provider.send(push(bad, text="x"))
        with pytest.raises(PermanentDeliveryError, match="'from' is reserved"):
            await provider.send(push(DEVICE, data={"from": "me"}))
        with pytest.raises(PermanentDeliveryError, match=r"google\.x' is reserved"):
            await provider.send(push(DEVICE, data={"google.x": "1"}))
        with pytest.raises(PermanentDeliveryError, match="needs a subject, text or data"):
            await provider.send(push(DEVICE, html="<b>only html</b>"))
        with pytest.raises(PermanentDeliveryError, match="not JSON-serialisable"):
            await provider.send(push(DEVICE, data={"when": object()}))
    assert http_server.requests == []


async def test_fcm_service_account_from_file(http_server, account, tmp_path):
    """A path to the JSON key file works; project_id and token_uri come from it."""
    google(http_server)
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(account))
    async with FCMProvider(service_account=path, base_url=http_server.url) as provider:
        assert provider.project_id == "demo-project"
        await provider.send(push(DEVICE, text="x"))
    assert [r.path for r in http_server.requests] == ["/token", SEND_PATH]


def test_fcm_configuration_errors(account, tmp_path):
    """Missing files, fields, bad JSON and non-RSA keys raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match="cannot read service account file"):
        FCMProvider(service_account=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        FCMProvider(service_account=str(tmp_path / "bad.json"))
    with pytest.raises(ConfigurationError, match="missing client_email, project_id"):
        FCMProvider(service_account={"private_key": account["private_key"]})
    with pytest.raises(ConfigurationError, match="not a PEM private key"):
        FCMProvider(service_account={**account, "private_key": "garbage"})
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(ConfigurationError, match="must be an RSA key"):
        FCMProvider(service_account={**account, "private_key": ec_pem})
    assert FCMProvider(service_account={**account, "project_id": "other"}).project_id == "other"
    explicit = FCMProvider(service_account=json.dumps(account), project_id="p2")
    assert explicit.project_id == "p2"


# --- Web Push ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vapid_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def vapid_pem(vapid_key):
    return vapid_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def subscriber():
    """A browser's keys: an ECDH P-256 key pair and a 16-byte auth secret."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return key, public, os.urandom(16)


def subscription(endpoint: str, public: bytes, auth: bytes) -> str:
    keys = {"p256dh": b64url(public), "auth": b64url(auth)}
    return json.dumps({"endpoint": endpoint, "expirationTime": None, "keys": keys})


def webpush(vapid_pem, **kwargs) -> WebPushProvider:
    options = {
        "vapid_private_key": vapid_pem,
        "vapid_subject": "mailto:ops@example.com",
        "clock": Clock(),
        "allow_private_targets": True,  # the push service is on loopback
    }
    options.update(kwargs)
    return WebPushProvider(**options)


def decrypt(body: bytes, subscriber) -> dict:
    key, _public, auth = subscriber
    return json.loads(
        http_ece.decrypt(body, private_key=key, auth_secret=auth, version="aes128gcm")
    )


async def test_webpush_encrypts_and_signs(http_server, vapid_pem, vapid_key, subscriber):
    """The subscriber decrypts the payload; the VAPID JWT verifies with k= and has aud/sub/exp."""
    http_server.enqueue(Reply(201, headers={"Location": "https://push.example/m/123"}))
    _key, public, auth = subscriber
    recipient = subscription(f"{http_server.url}/push/abc?x=1", public, auth)
    message = push(
        recipient, subject="Hi", text="Body ✓", data={"url": "/x", "n": 2}, priority="urgent"
    )
    async with webpush(vapid_pem, ttl=600) as provider:
        receipt = await provider.send(message)
    (request,) = http_server.requests
    assert request.method == "POST"
    assert request.path == "/push/abc"
    assert request.query == {"x": ["1"]}
    assert request.headers["ttl"] == "600"
    assert request.headers["content-encoding"] == "aes128gcm"
    assert request.headers["content-type"] == "application/octet-stream"
    assert request.headers["urgency"] == "high"
    assert decrypt(request.body, subscriber) == {
        "title": "Hi",
        "body": "Body ✓",
        "data": {"url": "/x", "n": 2},
    }
    scheme, _, params = request.headers["authorization"].partition(" ")
    assert scheme == "vapid"
    fields = dict(part.strip().split("=", 1) for part in params.split(","))
    public_vapid = vapid_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert b64url_decode(fields["k"]) == public_vapid
    assert fields["k"] == provider.application_server_key
    verifier = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b64url_decode(fields["k"])
    )
    claims = jwt.decode(
        fields["t"],
        verifier,
        algorithms=["ES256"],
        audience=http_server.url,
        options={"verify_exp": False},
    )
    assert claims == {
        "aud": http_server.url,
        "sub": "mailto:ops@example.com",
        "exp": int(NOW) + 12 * 3600,
    }
    assert receipt.provider_message_id == "https://push.example/m/123"
    assert receipt.detail == "HTTP 201"


async def test_webpush_raw_key_and_urgency(http_server, vapid_pem, vapid_key, subscriber):
    """A base64url raw 32-byte key equals its PEM; low/normal priorities map to Urgency."""
    raw = vapid_key.private_numbers().private_value.to_bytes(32, "big")
    from_raw = webpush(b64url(raw), vapid_subject="https://example.com/contact")
    assert from_raw.application_server_key == webpush(vapid_pem).application_server_key
    _key, public, auth = subscriber
    recipient = subscription(f"{http_server.url}/p", public, auth)
    async with from_raw:
        await from_raw.send(push(recipient, text="a", priority="low"))
        await from_raw.send(push(recipient, data={"only": "data"}))
    low, normal = http_server.requests
    assert (low.headers["urgency"], normal.headers["urgency"]) == ("low", "normal")
    assert low.headers["ttl"] == "86400"
    assert decrypt(low.body, subscriber) == {"body": "a"}
    assert decrypt(normal.body, subscriber) == {"data": {"only": "data"}}


async def test_webpush_size_limit(http_server, vapid_pem, subscriber):
    """A payload that encrypts to exactly 4096 bytes is sent; one byte more is refused unsent."""
    _key, public, auth = subscriber
    recipient = subscription(f"{http_server.url}/p", public, auth)
    fits = "x" * (4096 - 103 - len('{"body":""}'))
    async with webpush(vapid_pem) as provider:
        await provider.send(push(recipient, text=fits))
        with pytest.raises(PermanentDeliveryError, match="too large"):
            await provider.send(push(recipient, text=fits + "x"))
    (request,) = http_server.requests
    assert len(request.body) == 4096
    assert decrypt(request.body, subscriber) == {"body": fits}


async def test_webpush_status_mapping(http_server, vapid_pem, subscriber):
    """410/404 → unregistered; 413 → permanent; 429 → transient with Retry-After; 500 → transient."""
    http_server.enqueue(
        Reply(410, "gone"),
        Reply(404, "not found"),
        Reply(413, "too big"),
        Reply(429, "", {"Retry-After": "12"}),
        Reply(500, "oops"),
    )
    _key, public, auth = subscriber
    recipient = subscription(f"{http_server.url}/p", public, auth)
    async with webpush(vapid_pem) as provider:
        with pytest.raises(RecipientUnregisteredError, match="HTTP 410"):
            await provider.send(push(recipient, text="x"))
        with pytest.raises(RecipientUnregisteredError, match="HTTP 404"):
            await provider.send(push(recipient, text="x"))
        with pytest.raises(PermanentDeliveryError, match="HTTP 413") as large:
            await provider.send(push(recipient, text="x"))
        with pytest.raises(DeliveryError) as limited:
            await provider.send(push(recipient, text="x"))
        with pytest.raises(DeliveryError, match="HTTP 500") as broken:
            await provider.send(push(recipient, text="x"))
    assert not isinstance(large.value, RecipientUnregisteredError)
    assert (limited.value.transient, limited.value.retry_after) == (True, 12.0)
    assert broken.value.transient


def bad_subscriptions(url: str, public: bytes, auth: bytes) -> list[tuple[str, str]]:
    good_keys = {"p256dh": b64url(public), "auth": b64url(auth)}
    return [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"keys": good_keys}), "no 'endpoint'"),
        (json.dumps({"endpoint": f"{url}/p"}), "no 'keys'"),
        (json.dumps({"endpoint": f"{url}/p", "keys": {"auth": b64url(auth)}}), "keys.p256dh"),
        (
            json.dumps({"endpoint": f"{url}/p", "keys": {**good_keys, "auth": "!!!"}}),
            "not base64url",
        ),
        (
            json.dumps({"endpoint": f"{url}/p", "keys": {**good_keys, "auth": b64url(b"short")}}),
            "16 bytes",
        ),
        (
            json.dumps(
                {
                    "endpoint": f"{url}/p",
                    "keys": {**good_keys, "p256dh": b64url(b"\x04" + b"\x01" * 64)},
                }
            ),
            "not an uncompressed P-256",
        ),
        (
            json.dumps({"endpoint": "http://push.example.com/p", "keys": good_keys}),
            "must be an https URL",
        ),
        (json.dumps({"endpoint": "ftp://127.0.0.1/p", "keys": good_keys}), "must be an https URL"),
    ]


async def test_webpush_refuses_bad_subscriptions_before_any_request(
    http_server, vapid_pem, subscriber
):
    """Bad JSON, missing or malformed keys and non-https endpoints fail with no request."""
    _key, public, auth = subscriber
    async with webpush(vapid_pem) as provider:
        for recipient, problem in bad_subscriptions(http_server.url, public, auth):
            with pytest.raises(InvalidRecipientError, match=problem):
                provider.validate(recipient)
            with pytest.raises(InvalidRecipientError, match=problem):
                await provider.send(push(recipient, text="x"))
        good = subscription(f"{http_server.url}/p", public, auth)
        assert provider.validate(good) == good
        with pytest.raises(PermanentDeliveryError, match="needs a subject, text or data"):
            await provider.send(push(good, html="<p>html only</p>"))
        with pytest.raises(PermanentDeliveryError, match="not JSON-serialisable"):
            await provider.send(push(good, data={"when": object()}))
    assert http_server.requests == []


def test_push_providers_split_recipients(account, vapid_pem, subscriber):
    """On the shared push channel, FCM takes device tokens and Web Push takes subscription JSON."""
    _key, public, auth = subscriber
    sub = subscription("https://push.example/p", public, auth)
    fcm_provider = FCMProvider(service_account=account)
    web = webpush(vapid_pem)
    assert (fcm_provider.handles(DEVICE), fcm_provider.handles(sub)) == (True, False)
    assert (web.handles(DEVICE), web.handles(sub), web.handles("{broken")) == (False, True, True)


def test_webpush_configuration_errors(vapid_pem, rsa_key):
    """Bad subjects, keys and ttl raise ConfigurationError; the key is never echoed."""
    with pytest.raises(ConfigurationError, match="vapid_subject must be"):
        webpush(vapid_pem, vapid_subject="ops@example.com")
    with pytest.raises(ConfigurationError, match="vapid_subject must be"):
        webpush(vapid_pem, vapid_subject="http://example.com")
    with pytest.raises(ConfigurationError, match="ttl must be"):
        webpush(vapid_pem, ttl=-1)
    with pytest.raises(ConfigurationError, match="vapid_private_key") as caught:
        webpush("c2VjcmV0LWJ1dC1ub3QtYS1rZXk")
    assert "c2VjcmV0" not in str(caught.value)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(ConfigurationError, match="P-256"):
        webpush(rsa_pem)


async def test_web_push_refuses_private_endpoints(vapid_pem, http_server):
    """A browser-supplied endpoint on a private network is refused before any request (SSRF)."""
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    provider = webpush(vapid_pem, allow_private_targets=False)
    for endpoint in ("https://10.0.0.5/push", "https://169.254.169.254/x", f"{http_server.url}/p"):
        sub = subscription(endpoint, public, os.urandom(16))
        with pytest.raises(InvalidRecipientError, match="allow_private_targets"):
            await provider.send(OutboundMessage("n", "push", sub, text="x"))
    assert http_server.requests == []
