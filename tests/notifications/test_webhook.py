"""Webhook provider against a real loopback HTTP server: body, headers, signature, errors, guard."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from importlib import metadata

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from _support.http_server import RecordingHTTPServer, Reply
from dotmac.communications.errors import (
    ConfigurationError,
    DeliveryError,
    InvalidRecipientError,
    OperationTimeoutError,
    PermanentDeliveryError,
)
from dotmac.communications.notifications._models import OutboundMessage
from dotmac.communications.notifications.channels._targets import check_target, validate_url
from dotmac.communications.notifications.channels.webhook import (
    WebhookProvider,
    sign_payload,
    verify_signature,
)

T0 = 1_700_000_000
SECRET = "whsec_test"
BODY = b'{"event":"invoice.paid","amount":12.5}'
# HMAC-SHA256(SECRET, b"1700000000." + BODY), computed outside the library.
SIG = "3fa3d3239e068ae4940cf5ca4abb8174d9ceb596ecc3dcce89b59baab97628bb"
OLD_SIG = "66d21b7d530621618ccc4d5b4180d83a53b45b6b0e463b9a0c79527e51041160"  # key "old-secret"


def _message(url: str, **kw) -> OutboundMessage:
    kw.setdefault("data", {"event": "invoice.paid", "amount": 12.5})
    return OutboundMessage(notification_id="n-1", channel="webhook", recipient=url, **kw)


def _provider(**kw) -> WebhookProvider:
    kw.setdefault("allow_private_targets", True)
    kw.setdefault("clock", lambda: T0 + 0.9)
    return WebhookProvider(**kw)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _count_connections(server: RecordingHTTPServer) -> list[object]:
    """Record each TCP connection the server accepts (wraps the stdlib server's accept)."""
    accepted: list[object] = []
    inner = server._server
    original = inner.get_request

    def get_request():
        conn = original()
        accepted.append(conn[1])
        return conn

    inner.get_request = get_request  # type: ignore[method-assign]
    return accepted


async def test_signed_post_body_and_headers_exact(http_server):
    """The server receives the data as compact JSON with every specified header and signature."""
    async with _provider(secret=SECRET) as provider:
        receipt = await provider.send(_message(f"{http_server.url}/hooks/in?x=1"))
    [req] = http_server.requests
    assert (req.method, req.path, req.query) == ("POST", "/hooks/in", {"x": ["1"]})
    assert req.body == BODY
    version = metadata.version("dotmac-communications")
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"] == f"dotmac-communications/{version}"
    assert req.headers["x-dotmac-delivery"] == "n-1"
    assert req.headers["idempotency-key"] == "n-1"
    assert req.headers["x-dotmac-signature"] == f"t={T0},v1={SIG}"
    assert verify_signature(req.body, req.headers["x-dotmac-signature"], SECRET, now=T0 + 5)
    assert receipt.detail == "HTTP 200"
    assert receipt.provider_message_id is None


async def test_body_from_content_and_unsigned_without_secret(http_server):
    """Without data the body is the non-None subject/text/html; without a secret, no signature."""
    async with _provider() as provider:
        await provider.send(_message(http_server.url, data=None, subject="Hi", text="Body"))
    [req] = http_server.requests
    assert req.body == b'{"subject":"Hi","text":"Body"}'
    assert "x-dotmac-signature" not in req.headers


async def test_request_id_header_becomes_provider_message_id(http_server):
    """A response X-Request-Id is kept as the provider message id."""
    http_server.enqueue(Reply(202, headers={"X-Request-Id": "req-42"}))
    async with _provider() as provider:
        receipt = await provider.send(_message(http_server.url))
    assert (receipt.provider_message_id, receipt.detail) == ("req-42", "HTTP 202")


def test_sign_payload_format_and_rotation():
    """sign_payload gives t=<ts>,v1=<hex>, one v1 per secret when rotating."""
    assert sign_payload(SECRET, BODY, T0) == f"t={T0},v1={SIG}"
    assert sign_payload([SECRET, "old-secret"], BODY, T0) == f"t={T0},v1={SIG},v1={OLD_SIG}"
    with pytest.raises(ValueError, match="non-empty"):
        sign_payload("", BODY, T0)


@pytest.mark.parametrize(
    "secret",
    ["k", "s" * 63, "s" * 64, "s" * 65, "é-secret-" * 20, ["new-secret", "x" * 200]],
    ids=["1-byte", "63-bytes", "64-bytes", "65-bytes", "non-ascii-long", "rotation"],
)
def test_provider_signature_equals_sign_payload(secret):
    """The provider's signature (keys prepared once) is sign_payload's for any key length."""
    provider = _provider(secret=secret)
    headers = provider.headers(_message("http://127.0.0.1/hook"), BODY)
    assert headers["X-Dotmac-Signature"] == sign_payload(secret, BODY, T0)
    assert verify_signature(BODY, headers["X-Dotmac-Signature"], secret, now=T0)


def test_verify_signature_accepts_rotation():
    """Any v1 entry matching any given secret verifies."""
    both = f"t={T0},v1={SIG},v1={OLD_SIG}"
    assert verify_signature(BODY, both, "old-secret", now=T0)
    assert verify_signature(BODY, both, SECRET, now=T0)
    assert verify_signature(BODY, f"t={T0},v1={OLD_SIG}", [SECRET, "old-secret"], now=T0)
    assert verify_signature(BODY, f"t={T0}, v1={SIG}, v2=future", SECRET, now=T0)


@pytest.mark.parametrize(
    ("body", "header", "secret", "now"),
    [
        (BODY + b" ", f"t={T0},v1={SIG}", SECRET, T0),  # tampered body
        (BODY, f"t={T0},v1={SIG}", "wrong", T0),  # wrong secret
        (BODY, f"t={T0},v1={SIG}", SECRET, T0 + 301),  # stale
        (BODY, f"t={T0},v1={SIG}", SECRET, T0 - 301),  # far future
        (BODY, f"t={T0 + 1},v1={SIG}", SECRET, T0),  # timestamp changed
        (BODY, "", SECRET, T0),
        (BODY, None, SECRET, T0),
        (BODY, "garbage", SECRET, T0),
        (BODY, f"v1={SIG}", SECRET, T0),  # no t
        (BODY, f"t={T0}", SECRET, T0),  # no v1
        (BODY, f"t=abc,v1={SIG}", SECRET, T0),
        (BODY, f"t={T0},t={T0},v1={SIG}", SECRET, T0),
        (BODY, f"t={T0},v1={SIG[:-1]}é", SECRET, T0),
        (BODY, f"t={T0};v1={SIG}", SECRET, T0),
    ],
)
def test_verify_signature_rejects(body, header, secret, now):
    """Tampered body, wrong secret, stale timestamp or malformed header -> False."""
    assert verify_signature(body, header, secret, now=now) is False


async def test_500_then_200(http_server):
    """A 500 is a transient DeliveryError; the next attempt is sent."""
    http_server.enqueue(Reply(500, "boom"))
    async with _provider() as provider:
        with pytest.raises(DeliveryError, match="HTTP 500") as info:
            await provider.send(_message(http_server.url))
        assert info.value.transient
        assert (await provider.send(_message(http_server.url))).detail == "HTTP 200"
    assert len(http_server.requests) == 2


async def test_429_retry_after_seconds(http_server):
    """429 with Retry-After: 2 -> transient DeliveryError with retry_after == 2."""
    http_server.enqueue(Reply(429, headers={"Retry-After": "2"}))
    async with _provider() as provider:
        with pytest.raises(DeliveryError) as info:
            await provider.send(_message(http_server.url))
    assert info.value.transient
    assert info.value.retry_after == 2


async def test_429_retry_after_http_date(http_server):
    """An HTTP-date Retry-After becomes the seconds until that date."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    http_server.enqueue(Reply(503, headers={"Retry-After": when}))
    async with _provider() as provider:
        with pytest.raises(DeliveryError) as info:
            await provider.send(_message(http_server.url))
    assert info.value.retry_after is not None
    assert 27 <= info.value.retry_after <= 31


async def test_4xx_permanent(http_server):
    """Other 4xx answers (400, 401, 404, 410, 422) are permanent."""
    statuses = [400, 401, 404, 410, 422]
    http_server.enqueue(*(Reply(status, "nope") for status in statuses))
    async with _provider() as provider:
        for status in statuses:
            with pytest.raises(PermanentDeliveryError, match=f"HTTP {status}") as info:
                await provider.send(_message(http_server.url))
            assert type(info.value) is PermanentDeliveryError
            assert not info.value.transient
    assert len(http_server.requests) == len(statuses)


async def test_redirect_not_followed(http_server):
    """A 301 is permanent, says redirects are not followed, and the Location is not requested."""
    http_server.enqueue(Reply(301, headers={"Location": f"{http_server.url}/moved?token=SECRET"}))
    async with _provider() as provider:
        with pytest.raises(PermanentDeliveryError, match="redirects are not followed") as info:
            await provider.send(_message(f"{http_server.url}/hook"))
    assert "SECRET" not in str(info.value)
    assert [r.path for r in http_server.requests] == ["/hook"]


async def test_hanging_server_times_out(http_server):
    """A server that does not answer hits the total deadline quickly."""
    http_server.enqueue(Reply(delay=5))
    async with _provider(timeout=0.3) as provider:
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError) as info:
            await provider.send(_message(http_server.url))
    assert time.monotonic() - started < 1.5
    assert info.value.transient


async def test_connection_refused_is_transient():
    """Nothing listening -> transient DeliveryError."""
    async with _provider() as provider:
        with pytest.raises(DeliveryError, match="cannot reach") as info:
            await provider.send(_message(f"http://127.0.0.1:{_closed_port()}/hook"))
    assert info.value.transient


PRIVATE_URLS = [
    "http://127.0.0.1:{port}/hook",
    "http://10.0.0.1/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:{port}/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://100.64.0.1/hook",
    "http://0.0.0.0:{port}/",
    "https://[fe80::1]/",
    "http://224.0.0.1/",
    "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
]


async def test_private_literal_refused(http_server):
    """Private, loopback, link-local, shared and multicast IP literals are refused unconnected."""
    async with _provider(allow_private_targets=False) as provider:
        for template in PRIVATE_URLS:
            url = template.format(port=http_server.port)
            with pytest.raises(InvalidRecipientError, match="allow_private_targets"):
                provider.validate(url)
            with pytest.raises(InvalidRecipientError, match=r"notifications\.webhook\.allow_priv"):
                await provider.send(_message(url))
    assert http_server.requests == []


def test_public_literal_accepted():
    """Public IPv4/IPv6 literals (also embedded in mapped/NAT64 forms) pass validate()."""
    provider = WebhookProvider()
    for url in ["https://8.8.8.8/h", "http://[::ffff:8.8.8.8]/h", "http://[64:ff9b::808:808]/h"]:
        assert provider.validate(url) == url


async def test_private_name_refused_at_connect(http_server):
    """A name resolving to loopback passes the syntax check but the pinned connect refuses it."""
    url = f"http://localhost:{http_server.port}/hook?token=SECRET"
    async with _provider(allow_private_targets=False) as provider:
        assert provider.validate(url) == url  # syntax only, no DNS in validate()
        with pytest.raises(InvalidRecipientError, match="private/loopback") as info:
            await provider.send(_message(url))
    assert "SECRET" not in str(info.value)
    assert http_server.requests == []


async def test_injected_client_checked_before_request(http_server):
    """With an injected client, check_target refuses a private name before the request."""
    async with httpx.AsyncClient() as client:
        provider = WebhookProvider(client=client, timeout=2)
        with pytest.raises(InvalidRecipientError, match="resolves to a private/loopback"):
            await provider.send(_message(f"http://localhost:{http_server.port}/hook"))
        await provider.aclose()
        assert not client.is_closed  # an injected client is the caller's to close
    assert http_server.requests == []


async def test_injected_client_sends(http_server):
    """An injected client is used for the request."""
    async with (
        httpx.AsyncClient(headers={"X-Extra": "1"}) as client,
        _provider(client=client) as provider,
    ):
        await provider.send(_message(http_server.url))
    assert http_server.requests[0].headers["x-extra"] == "1"


async def test_injected_client_gets_every_provider_header(http_server):
    """Over an injected client, Content-Type and User-Agent are still the provider's own."""
    async with (
        httpx.AsyncClient(headers={"User-Agent": "host-app/1"}) as client,
        _provider(client=client, secret=SECRET) as provider,
    ):
        await provider.send(_message(http_server.url))
    headers = http_server.requests[0].headers
    assert (
        headers["user-agent"]
        == f"dotmac-communications/{metadata.version('dotmac-communications')}"
    )
    assert headers["content-type"] == "application/json"
    assert headers["x-dotmac-signature"] == f"t={T0},v1={SIG}"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://example.com/hook", "must use http or https"),
        ("http:///hook", "has no host"),
        ("example.com/hook", "must use http or https"),
        ("http://exa mple.com/", "without spaces"),
        ("", "non-empty"),
    ],
)
async def test_bad_url_refused(url, match):
    """Non-http(s) URLs and URLs without a host are refused, naming the URL."""
    with pytest.raises(InvalidRecipientError, match=match):
        validate_url(url)
    async with _provider() as provider:
        with pytest.raises(InvalidRecipientError, match=match):
            provider.validate(url)
        with pytest.raises(InvalidRecipientError, match=match):
            await provider.send(_message(url))


async def test_check_target():
    """check_target: private names refused, public literals and allowed targets pass."""
    with pytest.raises(InvalidRecipientError, match=r"'http://localhost:1/x' resolves to"):
        await check_target("http://user:pw@localhost:1/x?k=SECRET", allow_private=False)
    await check_target("http://localhost:1/x", allow_private=True)
    await check_target("https://93.184.216.34/x", allow_private=False)  # literal: no DNS
    with pytest.raises(InvalidRecipientError, match="must use http"):
        await check_target("file:///etc/passwd", allow_private=True)


async def test_unresolvable_host_is_transient():
    """A host that does not resolve -> transient DeliveryError, from check and from send."""
    with pytest.raises(DeliveryError, match="cannot resolve") as info:
        await check_target("http://no-such-host.invalid/x", allow_private=False)
    assert info.value.transient
    async with _provider(allow_private_targets=False) as provider:
        with pytest.raises(DeliveryError, match="cannot resolve"):
            await provider.send(_message("http://no-such-host.invalid/x"))


async def test_unserialisable_data_is_permanent(http_server):
    """Data orjson cannot encode fails permanently and nothing is sent."""
    async with _provider() as provider:
        with pytest.raises(PermanentDeliveryError, match="JSON-serialisable"):
            await provider.send(_message(http_server.url, data={"ids": {1, 2}}))
    assert http_server.requests == []


def test_bad_configuration():
    """An empty secret or a non-positive timeout is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="secret"):
        WebhookProvider(secret="")
    with pytest.raises(ConfigurationError, match="timeout"):
        WebhookProvider(timeout=0)
    with pytest.raises(ConfigurationError, match="max_connections"):
        WebhookProvider(max_connections=0)


async def test_connections_reused_and_capped_per_host(http_server):
    """Sequential sends share one connection; concurrent ones stay within max_connections."""
    accepted = _count_connections(http_server)
    async with _provider(max_connections=3) as provider:
        for _ in range(10):
            await provider.send(_message(http_server.url))
        assert len(accepted) == 1
        http_server.responder = lambda _r: Reply(200, {}, delay=0.02)
        await asyncio.gather(*(provider.send(_message(http_server.url)) for _ in range(12)))
    assert len(http_server.requests) == 22
    assert len(accepted) <= 3


async def test_usable_again_after_aclose(http_server):
    """aclose() drops the pool; the next send opens a new one."""
    provider = _provider()
    await provider.send(_message(http_server.url))
    await provider.aclose()
    await provider.aclose()
    await provider.send(_message(http_server.url))
    await provider.aclose()
    assert len(http_server.requests) == 2


async def test_server_hanging_up_without_an_answer_is_transient():
    """A server that reads the request and closes the connection -> transient DeliveryError."""
    seen: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with _provider() as provider:
            with pytest.raises(DeliveryError, match="RemoteProtocolError") as info:
                await provider.send(_message(f"http://127.0.0.1:{port}/hook"))
    finally:
        server.close()
        await server.wait_closed()
    assert info.value.transient
    [request] = seen
    assert request.startswith(b"POST /hook HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n".encode() in request


async def test_non_ascii_header_value_refused_unsent(http_server):
    """A header value HTTP cannot carry is a permanent error naming it; nothing is sent."""
    async with _provider() as provider:
        with pytest.raises(PermanentDeliveryError, match="X-Dotmac-Delivery") as info:
            await provider.send(
                OutboundMessage(
                    notification_id="n-\u00e9", channel="webhook", recipient=http_server.url,
                    data={"a": 1},
                )
            )  # fmt: skip
    assert not info.value.transient
    assert http_server.requests == []


def _self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by its own key (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture
async def https_hook(tmp_path):
    """A loopback HTTPS endpoint answering 200; yields (url, cert path, requests, connections)."""
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    requests: list[bytes] = []
    connections: list[object] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername"))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                requests.append(head + await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        port = server.sockets[0].getsockname()[1]
        yield f"https://127.0.0.1:{port}/hook", cert, requests, connections
    finally:
        server.close()
        await server.wait_closed()


async def test_https_target_with_a_trusted_private_ca(https_hook):
    """An https hook whose CA is given in ssl_context gets the signed body over TLS, reused."""
    url, cert, requests, connections = https_hook
    context = ssl.create_default_context(cafile=cert)
    async with _provider(secret=SECRET, ssl_context=context) as provider:
        for _ in range(3):
            assert (await provider.send(_message(url))).detail == "HTTP 200"
    assert len(requests) == 3
    assert len(connections) == 1
    assert all(r.endswith(BODY) and b"X-Dotmac-Signature: t=" in r for r in requests)


async def test_https_target_with_an_untrusted_certificate_is_not_sent(https_hook):
    """By default certificates are verified: a self-signed one fails the delivery, unsent."""
    url, _cert, requests, _connections = https_hook
    async with _provider() as provider:
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED") as info:
            await provider.send(_message(url))
    assert info.value.transient
    assert requests == []


async def test_connection_the_server_closed_while_idle_is_not_reused():
    """A keep-alive connection the server closed between sends is replaced, not written to."""
    connections: list[object] = []

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername"))
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # keep-alive, then...
        await writer.drain()
        writer.close()  # ...the server's idle timeout fires

    server = await asyncio.start_server(one_answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    try:
        async with _provider() as provider:
            for _ in range(3):
                await asyncio.sleep(0.05)  # the close reaches the client
                assert (await provider.send(_message(url))).detail == "HTTP 200"
    finally:
        server.close()
        await server.wait_closed()
    assert len(connections) == 3
