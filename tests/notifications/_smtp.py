"""A real SMTP server on loopback (aiosmtpd) that records what it receives, plus TLS/DKIM keys.

``RecordingSMTPServer`` runs aiosmtpd's ``Controller`` in its own thread on 127.0.0.1. It counts
connections (every accepted socket), records the SMTP commands that matter to the pool (EHLO,
NOOP, RSET, QUIT, AUTH) and each accepted message's envelope and raw bytes. Replies can be
scripted: a per-recipient RCPT answer, a DATA answer, a DATA delay.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.message
import email.policy
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    peer: Any
    tls: bool
    auth_user: str | None

    @property
    def message(self) -> email.message.EmailMessage:
        """The raw bytes parsed with the modern email policy."""
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed


@dataclass
class _Script:
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    data_delay: float = 0.0
    rset_reply: str = "250 OK"


class _Handler:
    def __init__(self, server: RecordingSMTPServer) -> None:
        self._server = server

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802 -- aiosmtpd hook name
        self._server._record("EHLO")
        session.host_name = hostname  # the hook owns this once it exists
        return responses

    async def handle_NOOP(self, server, session, envelope, arg):  # noqa: N802 -- aiosmtpd hook name
        self._server._record("NOOP")
        return "250 OK"

    async def handle_RSET(self, server, session, envelope):  # noqa: N802 -- aiosmtpd hook name
        self._server._record("RSET")
        return self._server.script.rset_reply

    async def handle_QUIT(self, server, session, envelope):  # noqa: N802 -- aiosmtpd hook name
        self._server._record("QUIT")
        return "221 Bye"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802 -- aiosmtpd hook name
        reply = self._server.script.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 -- aiosmtpd hook name
        script = self._server.script
        with self._server._lock:
            self._server._active += 1
            self._server.max_active = max(self._server.max_active, self._server._active)
        try:
            if script.data_delay:
                await asyncio.sleep(script.data_delay)
            if script.data_reply is not None:
                return script.data_reply
            tls = server.transport.get_extra_info("ssl_object") is not None
            user = session.auth_data.decode() if isinstance(session.auth_data, bytes) else None
            self._server.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    session.peer,
                    tls,
                    user,
                )
            )
            return "250 2.0.0 Ok: queued as TEST"
        finally:
            with self._server._lock:
                self._server._active -= 1


class _CountingController(Controller):
    def __init__(self, owner: RecordingSMTPServer, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(**kwargs)

    def factory(self):
        smtpd = super().factory()
        with self._owner._lock:
            self._owner.connections += 1
            self._owner._sessions.append(smtpd)
        return smtpd


class RecordingSMTPServer:
    """aiosmtpd on 127.0.0.1 recording sessions and messages.

    Args:
        port: Port to listen on (default: a free one).
        tls_context: Offer STARTTLS with this server context.
        require_starttls: Refuse mail before STARTTLS.
        ssl_context: Implicit TLS on the listening socket.
        credentials: ``(user, password)`` accepted by AUTH; AUTH is then required.
        auth_exclude: AUTH mechanisms not offered (to force LOGIN or PLAIN).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        auth_exclude: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.script = _Script()
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.auth_mechanisms: list[str] = []
        self.connections = 0
        self.max_active = 0
        self._active = 0
        self._sessions: list[Any] = []
        self._lock = threading.Lock()
        self._credentials = credentials
        kwargs: dict[str, Any] = {
            "handler": _Handler(self),
            "hostname": "127.0.0.1",
            "port": self.port,
            "server_hostname": "mx.test",
            "ssl_context": ssl_context,
            "ready_timeout": 5.0,
        }
        if tls_context is not None:
            kwargs["tls_context"] = tls_context
            kwargs["require_starttls"] = require_starttls
        if credentials is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
            kwargs["auth_exclude_mechanism"] = list(auth_exclude)
        self._kwargs = kwargs
        self._controller: _CountingController | None = None

    def start(self) -> RecordingSMTPServer:
        """Start listening; connection counts start at zero (the startup probe is not counted)."""
        self._controller = _CountingController(self, **self._kwargs)
        self._controller.start()
        with self._lock:
            self.connections = 0
        return self

    def stop(self) -> None:
        """Stop listening and drop every open session (as a crashing server would)."""
        if self._controller is not None:
            # aiosmtpd's stop() leaves accepted sockets open; abort them inside the server loop
            # so no transport outlives it (an unclosed one would warn in some later test).
            asyncio.run_coroutine_threadsafe(self._abort_sessions(), self._controller.loop).result(
                timeout=5
            )
            self._controller.stop()
            self._controller = None

    async def _abort_sessions(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for smtpd in sessions:
            if smtpd.transport is not None:
                smtpd.transport.abort()
        for _ in range(3):  # let connection_lost callbacks run and close the sockets
            await asyncio.sleep(0)

    def restart(self) -> None:
        """Stop, then start again on the same port (open client connections are dropped)."""
        self.stop()
        self.start()

    def count(self, command: str) -> int:
        """How often ``command`` (EHLO, NOOP, RSET, QUIT) was received."""
        return self.commands.count(command)

    def _record(self, command: str) -> None:
        self.commands.append(command)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        self.auth_mechanisms.append(mechanism)
        assert self._credentials is not None
        ok = (
            isinstance(auth_data, LoginPassword)
            and (
                auth_data.login.decode(),
                auth_data.password.decode(),
            )
            == self._credentials
        )
        if ok:
            return AuthResult(success=True, auth_data=auth_data.login)
        return AuthResult(success=False, handled=False)


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1/localhost and contexts using it."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server context presenting the certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this certificate."""
        return ssl.create_default_context(cafile=str(self.cert))


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a fresh self-signed certificate and key into ``directory``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def make_dkim_key() -> tuple[bytes, bytes]:
    """An RSA key pair for DKIM: (private key PEM, the ``p=`` value for the DNS TXT record)."""
    import base64

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(der)
