"""SMTPProvider against a real aiosmtpd server on loopback: MIME, pooling, errors, TLS, DKIM."""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
import sys
import time

import pytest

from dotmac.communications.errors import (
    ConfigurationError,
    DeliveryError,
    InvalidRecipientError,
    OperationTimeoutError,
    PermanentDeliveryError,
)
from dotmac.communications.notifications._models import Attachment, OutboundMessage
from dotmac.communications.notifications.channels.email import DkimSigner, SMTPProvider
from notifications._smtp import (
    RecordingSMTPServer,
    free_port,
    make_dkim_key,
    make_tls_files,
)

TO = "alice@example.com"
FROM = "Alerts <alerts@example.com>"


def outbound(**overrides) -> OutboundMessage:
    fields = {
        "notification_id": "n1",
        "channel": "email",
        "recipient": TO,
        "subject": "Hello",
        "text": "Plain body\n",
    }
    fields.update(overrides)
    return OutboundMessage(**fields)


@pytest.fixture
def servers():
    """Start RecordingSMTPServers on demand; all are stopped at teardown."""
    started: list[RecordingSMTPServer] = []

    def start(**kwargs) -> RecordingSMTPServer:
        server = RecordingSMTPServer(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    gc.collect()  # an unclosed socket left by this test warns here, not in a later test


@pytest.fixture
def server(servers) -> RecordingSMTPServer:
    """A plain SMTP server without TLS or AUTH."""
    return servers()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def provider_for(server: RecordingSMTPServer, **kwargs) -> SMTPProvider:
    kwargs.setdefault("from_address", FROM)
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("local_hostname", "client.test")
    return SMTPProvider(host="127.0.0.1", port=server.port, **kwargs)


# --- message content -------------------------------------------------------------------------


async def test_text_only_message_is_delivered_as_sent(server):
    """A text message arrives with the envelope, headers and body the provider built."""
    async with provider_for(server) as provider:
        receipt = await provider.send(outbound(text="Héllo wörld, ünïcode\n"))
    [got] = server.received
    assert got.mail_from == "alerts@example.com"
    assert got.rcpt_tos == [TO]
    msg = got.message
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().replace("\r\n", "\n") == "Héllo wörld, ünïcode\n"
    assert msg["From"].addresses[0].display_name == "Alerts"
    assert msg["From"].addresses[0].addr_spec == "alerts@example.com"
    assert str(msg["To"]) == TO
    assert str(msg["Subject"]) == "Hello"
    assert msg["Date"].datetime is not None
    assert msg["Message-ID"] == receipt.provider_message_id
    assert receipt.provider_message_id.endswith("@example.com>")
    assert receipt.detail == "250 2.0.0 Ok: queued as TEST"
    assert got.raw.isascii(), "output must be 7-bit clean"
    assert b"\r\n" in got.raw


async def test_text_and_html_make_multipart_alternative(server):
    """Text and HTML bodies become a multipart/alternative with both parts."""
    async with provider_for(server) as provider:
        await provider.send(outbound(text="plain", html="<p>rich &amp; bold</p>"))
    msg = server.received[0].message
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "plain"
    assert parts[1].get_content().strip() == "<p>rich &amp; bold</p>"


async def test_html_only_message(server):
    """An HTML-only message is a single text/html part."""
    async with provider_for(server) as provider:
        await provider.send(outbound(text=None, html="<b>hi</b>"))
    msg = server.received[0].message
    assert msg.get_content_type() == "text/html"
    assert msg.get_content().strip() == "<b>hi</b>"


async def test_attachments_round_trip(server):
    """Attachment bytes, filenames and content types survive the trip; .eml goes as bytes."""
    binary = bytes(range(256)) + b"\r\n.\r\n..leading dots\n" + os.urandom(3000)
    attachments = (
        Attachment(filename="report.pdf", content=binary),
        Attachment(filename="notes.txt", content="ünï\n".encode(), content_type="text/plain"),
        Attachment(filename="rëport ñame.bin", content=b"\x00\x01"),
        Attachment(filename="forward.eml", content=b"Subject: x\r\n\r\nbody\r\n"),
    )
    async with provider_for(server) as provider:
        await provider.send(
            outbound(text="see attached", html="<p>see</p>", attachments=attachments)
        )
    msg = server.received[0].message
    assert msg.get_content_type() == "multipart/mixed"
    body, *files = list(msg.iter_parts())
    assert body.get_content_type() == "multipart/alternative"
    got = {part.get_filename(): part for part in files}
    assert set(got) == {"report.pdf", "notes.txt", "rëport ñame.bin", "forward.eml"}
    assert got["report.pdf"].get_content_type() == "application/pdf"
    assert got["report.pdf"].get_content() == binary
    assert got["notes.txt"].get_content_type() == "text/plain"
    assert got["notes.txt"].get_payload(decode=True) == "ünï\n".encode()
    assert got["rëport ñame.bin"].get_payload(decode=True) == b"\x00\x01"
    assert got["forward.eml"].get_content_type() == "application/octet-stream"
    assert got["forward.eml"].get_payload(decode=True) == b"Subject: x\r\n\r\nbody\r\n"
    assert all(part.get_content_disposition() == "attachment" for part in files)


async def test_reply_to_custom_headers_and_priority(server):
    """Reply-To, custom headers and the priority headers reach the server."""
    message = outbound(
        reply_to="Support Desk <support@example.org>",
        headers={"X-Campaign": "spring ☀ sale", "List-Unsubscribe": "<mailto:u@example.com>"},
        priority="urgent",
    )
    async with provider_for(server) as provider:
        await provider.send(message)
    msg = server.received[0].message
    assert msg["Reply-To"].addresses[0].addr_spec == "support@example.org"
    assert msg["Reply-To"].addresses[0].display_name == "Support Desk"
    assert str(msg["X-Campaign"]) == "spring ☀ sale"
    assert str(msg["List-Unsubscribe"]) == "<mailto:u@example.com>"
    assert str(msg["X-Priority"]) == "1 (Highest)"
    assert str(msg["Importance"]) == "high"


async def test_sender_overrides_from_address(server):
    """message.sender wins over the provider's from_address, in the header and the envelope."""
    async with provider_for(server) as provider:
        receipt = await provider.send(outbound(sender="ops@mail.example.net"))
    got = server.received[0]
    assert got.mail_from == "ops@mail.example.net"
    assert str(got.message["From"]) == "ops@mail.example.net"
    assert receipt.provider_message_id.endswith("@mail.example.net>")


def test_build_message_is_public_and_matches_send_shape():
    """build_message returns the EmailMessage with the documented headers, without connecting."""
    provider = SMTPProvider(host="127.0.0.1", port=free_port(), from_address=FROM)
    msg = provider.build_message(outbound(recipient="Bob@Bücher.de", priority="low"))
    assert str(msg["To"]) == "Bob@xn--bcher-kva.de"
    assert str(msg["X-Priority"]) == "5 (Lowest)"
    assert msg["MIME-Version"] == "1.0"
    assert msg.policy.linesep == "\r\n"


def test_validate_normalises_and_refuses():
    """validate() returns the normalised address and refuses malformed ones by name."""
    provider = SMTPProvider(host="127.0.0.1", port=free_port())
    assert provider.validate("bob@EXAMPLE.com") == "bob@example.com"
    for bad in ("not-an-address", "Bob <bob@example.com>", "ü@example.com", "a@b", "x@y.com\r\n"):
        with pytest.raises(InvalidRecipientError, match="recipient"):
            provider.validate(bad)


# --- refused before any connection -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"recipient": "nobody"}, "recipient"),
        ({"recipient": "a@example.com\r\nBcc: evil@example.com"}, "recipient"),
        ({"sender": "not an address"}, "sender"),
        ({"sender": "ok@example.com\nBcc: evil@example.com"}, "sender"),
        ({"reply_to": "@example.com"}, "reply_to"),
        ({"subject": "hi\r\nBcc: evil@example.com"}, "subject"),
        ({"headers": {"X-Tag": "a\r\nBcc: evil@example.com"}}, "X-Tag"),
        ({"headers": {"Bad Name": "x"}}, "header name"),
        ({"headers": {"Bcc": "evil@example.com"}}, "Bcc"),
        ({"headers": {"content-type": "text/html"}}, "content-type"),
        ({"headers": {"Message-ID": "<x@y>"}}, "Message-ID"),
    ],
)
async def test_bad_input_is_refused_before_connecting(server, overrides, match):
    """Bad addresses, CR/LF and reserved headers raise InvalidRecipientError; no session opens."""
    async with provider_for(server) as provider:
        with pytest.raises(InvalidRecipientError, match=match):
            await provider.send(outbound(**overrides))
    assert server.connections == 0
    assert server.received == []


async def test_missing_from_is_a_configuration_error(server):
    """Neither sender nor from_address → ConfigurationError, nothing sent."""
    async with SMTPProvider(host="127.0.0.1", port=server.port) as provider:
        with pytest.raises(ConfigurationError, match="from_address"):
            await provider.send(outbound())
    assert server.connections == 0


async def test_message_without_content_is_refused(server):
    """No text, html or attachment → PermanentDeliveryError before connecting."""
    async with provider_for(server) as provider:
        with pytest.raises(PermanentDeliveryError, match="no text, html or attachment"):
            await provider.send(outbound(text=None))
    assert server.connections == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_tls": True, "start_tls": True}, "exclude each other"),
        ({"password": "x"}, "password given without username"),
        ({"pool_size": 0}, "pool_size"),
        ({"timeout": 0}, "timeout"),
        ({"port": 0}, "port"),
        ({"from_address": "nope"}, "from_address"),
    ],
)
def test_bad_configuration(kwargs, match):
    """Inconsistent constructor arguments raise ConfigurationError naming the argument."""
    with pytest.raises(ConfigurationError, match=match):
        SMTPProvider(**{"host": "127.0.0.1", "port": 2525, **kwargs})


# --- pooling ---------------------------------------------------------------------------------


async def test_connection_is_reused_across_sends(server):
    """Five sequential sends on pool_size=1 use one connection and one EHLO."""
    async with provider_for(server, pool_size=1) as provider:
        ids = [
            (await provider.send(outbound(subject=f"m{i}"))).provider_message_id for i in range(5)
        ]
    assert server.connections == 1
    assert server.count("EHLO") == 1
    assert [str(r.message["Subject"]) for r in server.received] == [f"m{i}" for i in range(5)]
    assert len(set(ids)) == 5
    assert server.count("NOOP") == 0, "a connection idle for less than noop_after is not probed"
    assert server.count("QUIT") == 1, "aclose QUITs the pooled connection"


async def test_idle_connection_is_checked_with_noop(server):
    """A connection idle longer than noop_after gets a NOOP before reuse, and is reused."""
    async with provider_for(server, pool_size=1, noop_after=0.0) as provider:
        await provider.send(outbound())
        await provider.send(outbound())
    assert server.count("NOOP") == 1
    assert server.connections == 1
    assert len(server.received) == 2


@pytest.mark.parametrize("noop_after", [5.0, 0.0])
async def test_server_restart_replaces_dropped_connection(server, noop_after):
    """After the server restarts, the dropped pooled connection is replaced and the send works."""
    async with provider_for(server, pool_size=1, noop_after=noop_after) as provider:
        await provider.send(outbound(subject="before"))
        server.restart()
        receipt = await provider.send(outbound(subject="after"))
    assert receipt.detail.startswith("250")
    assert [str(r.message["Subject"]) for r in server.received] == ["before", "after"]
    assert server.connections == 1, "exactly one new connection after the restart"


async def test_server_down_is_transient_and_leaves_no_state():
    """No server → transient DeliveryError naming host:port; once it is up, sends succeed."""
    port = free_port()
    provider = SMTPProvider(
        host="127.0.0.1", port=port, from_address=FROM, pool_size=1, timeout=5.0
    )
    async with provider:
        for _ in range(3):  # a leaked pool slot would make the second attempt hang
            with pytest.raises(DeliveryError, match=f"127.0.0.1:{port}") as caught:
                await provider.send(outbound())
            assert caught.value.transient
            assert not isinstance(caught.value, PermanentDeliveryError)
        server = RecordingSMTPServer(port=port).start()
        try:
            receipt = await provider.send(outbound())
        finally:
            await provider.aclose()
            server.stop()
    assert receipt.detail.startswith("250")
    assert len(server.received) == 1


async def test_aclose_after_server_vanished_is_quiet_and_provider_reusable(server):
    """aclose() with a dead pooled connection does not raise; the provider works afterwards."""
    provider = provider_for(server, pool_size=1)
    await provider.send(outbound(subject="one"))
    server.restart()
    await provider.aclose()
    await provider.aclose()  # twice is fine
    await provider.send(outbound(subject="two"))
    await provider.aclose()
    assert [str(r.message["Subject"]) for r in server.received] == ["one", "two"]
    assert server.count("QUIT") == 1, "only the live connection gets a QUIT"


async def test_concurrent_sends_stay_within_pool_size(server):
    """Ten concurrent sends on pool_size=3 are all delivered over at most three connections."""
    server.script.data_delay = 0.05
    async with provider_for(server, pool_size=3) as provider:
        receipts = await asyncio.gather(
            *(provider.send(outbound(subject=f"c{i}")) for i in range(10))
        )
    assert len({r.provider_message_id for r in receipts}) == 10
    assert sorted(str(r.message["Subject"]) for r in server.received) == sorted(
        f"c{i}" for i in range(10)
    )
    assert 1 <= server.connections <= 3
    assert server.max_active <= 3
    assert server.max_active > 1, "the pool should actually send in parallel"


# --- SMTP error answers ----------------------------------------------------------------------


async def test_550_on_rcpt_is_permanent_and_connection_stays_usable(server):
    """A 550 for the recipient → PermanentDeliveryError with code and text; RSET; reuse."""
    server.script.rcpt_replies["gone@example.com"] = "550 5.1.1 <gone@example.com> no such user"
    async with provider_for(server, pool_size=1) as provider:
        with pytest.raises(PermanentDeliveryError, match=r"550 5\.1\.1") as caught:
            await provider.send(outbound(recipient="gone@example.com"))
        assert not isinstance(caught.value, InvalidRecipientError)
        assert "gone@example.com" in str(caught.value)
        assert server.count("RSET") == 1
        receipt = await provider.send(outbound())
    assert receipt.detail.startswith("250")
    assert server.connections == 1
    assert [r.rcpt_tos for r in server.received] == [[TO]]


async def test_connection_is_dropped_when_rset_fails(server):
    """If RSET after a refused recipient fails, the connection is dropped and a new one used."""
    server.script.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    server.script.rset_reply = "500 5.5.1 confused"
    async with provider_for(server, pool_size=1) as provider:
        with pytest.raises(PermanentDeliveryError, match="550"):
            await provider.send(outbound(recipient="gone@example.com"))
        await provider.send(outbound())
    assert server.count("RSET") == 1
    assert server.connections == 2
    assert len(server.received) == 1


@pytest.mark.parametrize(
    ("where", "reply", "permanent"),
    [
        ("rcpt", "451 4.3.0 try again later", False),
        ("rcpt", "452 4.2.2 mailbox full", False),
        ("data", "451 4.7.1 greylisted", False),
        ("data", "554 5.6.0 message rejected", True),
    ],
)
async def test_error_answers_map_by_class(server, where, reply, permanent):
    """4xx answers are transient DeliveryError, 5xx permanent; the server's text is kept."""
    if where == "rcpt":
        server.script.rcpt_replies[TO] = reply
    else:
        server.script.data_reply = reply
    async with provider_for(server, pool_size=1) as provider:
        with pytest.raises(DeliveryError if not permanent else PermanentDeliveryError) as caught:
            await provider.send(outbound())
        assert reply in str(caught.value)
        assert caught.value.transient is (not permanent)
        server.script.rcpt_replies.clear()
        server.script.data_reply = None
        await provider.send(outbound())
    assert server.connections == 1
    assert len(server.received) == 1


# --- deadlines -------------------------------------------------------------------------------


async def test_silent_server_times_out_within_deadline():
    """A server that accepts but never greets → OperationTimeoutError at the deadline."""
    writers: list[asyncio.StreamWriter] = []

    async def hang(reader, writer):
        writers.append(writer)
        await reader.read()

    silent = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    provider = SMTPProvider(host="127.0.0.1", port=port, from_address=FROM, timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError, match=f"127.0.0.1:{port} within 0.5s"):
            await provider.send(outbound())
        elapsed = time.monotonic() - started
    finally:
        await provider.aclose()
        for writer in writers:
            writer.close()
        silent.close()
        await silent.wait_closed()
    assert 0.4 <= elapsed < 1.5
    assert writers, "the provider did connect"


async def test_waiting_for_a_pooled_connection_counts_against_the_deadline(server):
    """With one connection busy, the queued send times out at its own deadline."""
    server.script.data_delay = 0.6
    async with provider_for(server, pool_size=1, timeout=1.0) as provider:
        started = time.monotonic()
        first, second = await asyncio.gather(
            provider.send(outbound(subject="first")),
            provider.send(outbound(subject="second")),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        assert not isinstance(first, BaseException)
        assert isinstance(second, OperationTimeoutError)
        assert elapsed < 1.5
        server.script.data_delay = 0.0
        await provider.send(outbound(subject="third"))
    assert [str(r.message["Subject"]) for r in server.received][-1] == "third"


# --- TLS and AUTH ----------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
@pytest.mark.parametrize("start_tls", [True, None])
async def test_starttls_and_auth(servers, tls_files, mechanism, start_tls):
    """STARTTLS with a trusted self-signed cert, then AUTH LOGIN/PLAIN with the credentials."""
    other = "PLAIN" if mechanism == "LOGIN" else "LOGIN"
    server = servers(
        tls_context=tls_files.server_context(),
        require_starttls=True,
        credentials=("mailer", "s3cret"),
        auth_exclude=(other,),
    )
    provider = provider_for(
        server,
        start_tls=start_tls,
        username="mailer",
        password="s3cret",
        tls_context=tls_files.client_context(),
    )
    async with provider:
        await provider.send(outbound())
    [got] = server.received
    assert got.tls
    assert got.auth_user == "mailer"
    assert server.auth_mechanisms == [mechanism]


async def test_wrong_password_is_permanent(servers, tls_files):
    """Refused credentials → PermanentDeliveryError with the 535 answer; no message."""
    server = servers(
        tls_context=tls_files.server_context(),
        require_starttls=True,
        credentials=("mailer", "s3cret"),
    )
    provider = provider_for(
        server, username="mailer", password="wrong", tls_context=tls_files.client_context()
    )
    async with provider:
        with pytest.raises(PermanentDeliveryError, match="535") as caught:
            await provider.send(outbound())
    assert "mailer" in str(caught.value)
    assert "wrong" not in str(caught.value)
    assert server.received == []


async def test_untrusted_certificate_is_permanent(servers, tls_files):
    """A certificate the client context does not trust → PermanentDeliveryError."""
    server = servers(tls_context=tls_files.server_context(), require_starttls=True)
    untrusting = ssl.create_default_context()
    untrusting.load_verify_locations(cadata=_other_ca_pem())
    async with provider_for(server, tls_context=untrusting) as provider:
        with pytest.raises(PermanentDeliveryError, match="not trusted"):
            await provider.send(outbound())
    assert server.received == []


async def test_required_starttls_not_offered_is_permanent(server):
    """start_tls=True against a server without STARTTLS → PermanentDeliveryError."""
    async with provider_for(server, start_tls=True) as provider:
        with pytest.raises(PermanentDeliveryError, match="STARTTLS"):
            await provider.send(outbound())
    assert server.received == []


async def test_implicit_tls(servers, tls_files):
    """use_tls=True talks TLS from the first byte (aiosmtpd with an ssl_context)."""
    server = servers(ssl_context=tls_files.server_context())
    async with provider_for(server, use_tls=True, tls_context=tls_files.client_context()) as p:
        await p.send(outbound())
        await p.send(outbound())
    assert [r.tls for r in server.received] == [True, True]
    assert server.connections == 1


def _other_ca_pem() -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return make_tls_files(Path(tmp)).cert.read_text()


# --- DKIM ------------------------------------------------------------------------------------


async def test_dkim_signature_verifies(server):
    """The received bytes carry a DKIM signature that verifies against the public key."""
    import dkim

    private_pem, public_b64 = make_dkim_key()
    signer = DkimSigner("sel1", "example.com", private_pem)

    def dns(name, timeout=5):
        assert name == b"sel1._domainkey.example.com."
        return b"v=DKIM1; k=rsa; p=" + public_b64

    async with provider_for(server, dkim=signer) as provider:
        await provider.send(
            outbound(
                html="<p>hi</p>", attachments=(Attachment(filename="a.bin", content=b"\x00" * 100),)
            )
        )
    raw = server.received[0].raw
    assert raw.startswith(b"DKIM-Signature:")
    assert dkim.verify(raw, dnsfunc=dns)
    tampered = raw.replace(b"Subject: Hello", b"Subject: Hellp")
    assert not dkim.verify(tampered, dnsfunc=dns)


def test_dkim_bad_key_and_missing_extra(monkeypatch):
    """A bad key is a ConfigurationError; without dkimpy the ImportError names the extra."""
    with pytest.raises(ConfigurationError, match="DKIM private key"):
        DkimSigner("sel", "example.com", b"-----BEGIN NOTHING-----")
    monkeypatch.setitem(sys.modules, "dkim", None)
    with pytest.raises(ImportError, match=r"dotmac-communications\[dkim\]"):
        DkimSigner("sel", "example.com", make_dkim_key()[0])
