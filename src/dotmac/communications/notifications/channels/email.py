"""Email over SMTP: pooled aiosmtplib connections, STARTTLS/TLS, AUTH, MIME, optional DKIM.

:class:`SMTPProvider` turns an :class:`~dotmac.communications.notifications.OutboundMessage` into
a MIME message (:meth:`SMTPProvider.build_message`) and sends it over a pooled connection:

- text only → ``text/plain``; html only → ``text/html``; both → ``multipart/alternative``;
  attachments wrap that in ``multipart/mixed``. The output is 7-bit clean (non-ASCII text is
  quoted-printable or base64, non-ASCII headers RFC 2047), so no server extension is needed.
- Every address (recipient, sender, Reply-To) is checked with email-validator, and every header
  value for CR/LF, before any connection is made: bad input raises
  :class:`~dotmac.communications.errors.InvalidRecipientError` naming it.
- Custom headers may not replace the ones the provider writes (From, To, Subject, Date,
  Message-ID, Reply-To, MIME and DKIM headers, ``Resent-*``), nor add recipients (Cc, Bcc): such a
  name raises :class:`~dotmac.communications.errors.InvalidRecipientError`. ``X-Priority`` and
  ``Importance`` given by the caller replace the ones derived from ``priority``.

Server answers map to the library's errors: 4xx → :class:`DeliveryError` (transient), 5xx
(including a refused recipient and refused credentials) → :class:`PermanentDeliveryError` with
the server's code and text; an unreachable or disconnecting server → :class:`DeliveryError`
naming ``host:port``; the per-send deadline → :class:`OperationTimeoutError`.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import functools
import importlib
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage, Message
from typing import Any, ClassVar

import aiosmtplib
from email_validator import EmailNotValidError, ValidatedEmail, validate_email

from dotmac.communications.errors import (
    ConfigurationError,
    InvalidRecipientError,
    OperationTimeoutError,
    PermanentDeliveryError,
)
from dotmac.communications.notifications._models import Attachment, OutboundMessage, SendReceipt
from dotmac.communications.notifications.channels._smtp_pool import (
    SmtpPool,
    drop_connection,
    smtp_hello,
    smtp_reset,
    translate_error,
)
from dotmac.communications.notifications.channels.base import Provider

__all__ = ["DEFAULT_DKIM_HEADERS", "DkimSigner", "SMTPProvider"]

DEFAULT_DKIM_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
)
"""Headers signed by :class:`DkimSigner` unless told otherwise."""

_RESERVED_HEADERS = frozenset(
    {
        "from", "sender", "to", "cc", "bcc", "subject", "date", "message-id", "reply-to",
        "mime-version", "return-path", "received", "dkim-signature",
    }
)  # fmt: skip
_RESERVED_PREFIXES = ("content-", "resent-")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ':'
_PRIORITY_HEADERS = {
    "low": ("5 (Lowest)", "low"),
    "high": ("1 (Highest)", "high"),
    "urgent": ("1 (Highest)", "high"),
}
_DKIM_EXTRA = "DKIM signing needs the 'dkim' extra: pip install 'dotmac-communications[dkim]'"


def _import_dkim(module: str = "dkim") -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ImportError(_DKIM_EXTRA) from exc


class DkimSigner:
    """Signs outgoing messages with DKIM (RFC 6376, ``rsa-sha256``) using dkimpy.

    Args:
        selector: The DNS selector (``<selector>._domainkey.<domain>`` holds the public key).
        domain: The signing domain (``d=``), normally the From address's domain.
        private_key_pem: The RSA private key, PEM (PKCS#1 or PKCS#8).
        headers: Header names to sign; ``From`` is always signed.

    Raises:
        ImportError: dkimpy is not installed (the ``dkim`` extra).
        ConfigurationError: Empty selector/domain or a key dkimpy cannot parse.
    """

    def __init__(
        self,
        selector: str,
        domain: str,
        private_key_pem: bytes,
        headers: Sequence[str] = DEFAULT_DKIM_HEADERS,
    ) -> None:
        self._dkim = _import_dkim()
        crypto = _import_dkim("dkim.crypto")
        if not selector or not domain:
            raise ConfigurationError(
                f"DKIM selector and domain must be non-empty, got {selector!r} and {domain!r}"
            )
        self._errors: tuple[type[Exception], ...] = (
            self._dkim.DKIMException,
            crypto.UnparsableKeyError,
            crypto.DigestTooLargeError,
        )
        try:
            crypto.parse_pem_private_key(private_key_pem)
        except (*self._errors, ValueError, TypeError) as exc:
            raise ConfigurationError(f"DKIM private key is not a usable PEM key: {exc}") from exc
        names = [h.strip().lower() for h in headers if h.strip()]
        if "from" not in names:
            names.insert(0, "from")
        self.selector = selector
        self.domain = domain
        self.headers = tuple(names)
        self._key = private_key_pem

    def sign(self, message: bytes) -> bytes:
        """Return the ``DKIM-Signature:`` header (CRLF-terminated) for ``message`` (CRLF lines).

        Raises:
            PermanentDeliveryError: dkimpy refused to sign the message.
        """
        try:
            signature: bytes = self._dkim.sign(
                message,
                self.selector.encode("ascii"),
                self.domain.encode("ascii"),
                self._key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[h.encode("ascii") for h in self.headers],
                linesep=b"\r\n",
            )
        except self._errors as exc:
            raise PermanentDeliveryError(f"DKIM signing failed for d={self.domain}: {exc}") from exc
        return signature

    def __repr__(self) -> str:
        return f"DkimSigner(selector={self.selector!r}, domain={self.domain!r})"


@dataclass(frozen=True, slots=True)
class _Prepared:
    message: EmailMessage
    envelope_from: str
    envelope_to: str
    raw: bytes


class SMTPProvider(Provider):
    """Sends email through one SMTP server over a small pool of reused connections.

    Args:
        host: SMTP server host name or IP.
        port: Server port (25, 587 for STARTTLS submission, 465 for implicit TLS).
        username: Log in with this user after connecting (AUTH PLAIN/LOGIN/CRAM-MD5).
        password: The password for ``username``.
        use_tls: Connect with implicit TLS (port 465 style).
        start_tls: ``True`` requires STARTTLS, ``False`` never uses it, ``None`` uses it when the
            server offers it. Not combinable with ``use_tls=True``.
        from_address: Default From (``"Name <addr>"`` or ``addr``) when a message has no sender.
        timeout: Total deadline of one :meth:`send` in seconds, including the wait for a free
            pooled connection, connecting, and the whole SMTP transaction.
        pool_size: Most connections open at once.
        tls_context: SSL context for TLS/STARTTLS (default: the system's trust store).
        dkim: Sign every message with this signer.
        local_hostname: Name sent in EHLO (default: this host's FQDN).
        noop_after: A pooled connection idle longer than this many seconds is checked with NOOP
            before reuse (and replaced if the check fails).
        name: Provider name in results, metrics and errors.

    Raises:
        ConfigurationError: An argument is out of range or inconsistent (the message names it).
    """

    channel: ClassVar[str] = "email"

    def __init__(
        self,
        *,
        host: str,
        port: int = 25,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool | None = None,
        from_address: str | None = None,
        timeout: float = 30.0,
        pool_size: int = 5,
        tls_context: ssl.SSLContext | None = None,
        dkim: DkimSigner | None = None,
        local_hostname: str | None = None,
        noop_after: float = 5.0,
        name: str = "smtp",
    ) -> None:
        problems = []
        if not host:
            problems.append("host must be non-empty")
        if not 0 < port < 65536:
            problems.append(f"port must be 1..65535, got {port!r}")
        if use_tls and start_tls:
            problems.append("use_tls=True (implicit TLS) and start_tls=True exclude each other")
        if password is not None and username is None:
            problems.append("password given without username")
        if not timeout > 0:
            problems.append(f"timeout must be > 0, got {timeout!r}")
        if pool_size < 1:
            problems.append(f"pool_size must be >= 1, got {pool_size!r}")
        if noop_after < 0:
            problems.append(f"noop_after must be >= 0, got {noop_after!r}")
        if from_address is not None:
            try:
                _mailbox(from_address, "from_address", display_name=True)
            except InvalidRecipientError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigurationError(f"{name}: " + "; ".join(problems))
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.use_tls = use_tls
        self.start_tls = False if use_tls else start_tls
        self.from_address = from_address
        self.timeout = timeout
        self.pool_size = pool_size
        self.tls_context = tls_context
        self.dkim = dkim
        self.local_hostname = local_hostname
        self.name = name
        self._pool = SmtpPool(self._connect, size=pool_size, noop_after=noop_after)

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def validate(self, recipient: str) -> str:
        """Check one recipient address and return its normalised form.

        A bare address only (no display name); the domain may be internationalised, the
        local part must be ASCII.

        Raises:
            InvalidRecipientError: The address is malformed (the message names it).
        """
        return str(_validated(recipient, "recipient", display_name=False).normalized)

    def build_message(self, message: OutboundMessage) -> EmailMessage:
        """Build the MIME message :meth:`send` would send (without a DKIM signature).

        Headers: From (``message.sender`` or ``from_address``), To, Subject, Date, Message-ID
        (with the From domain), Reply-To, X-Priority/Importance for low/high/urgent, then
        ``message.headers``. The message uses ``email.policy.SMTP`` (CRLF line ends).

        Raises:
            ConfigurationError: Neither ``message.sender`` nor ``from_address`` is set.
            InvalidRecipientError: A bad recipient, sender or Reply-To address, a header name
                or value with CR/LF, or a header name the provider reserves.
            PermanentDeliveryError: The message has no text, html or attachment to send.
        """
        sender, reply_to, custom = self._envelope(message)
        # A bare address, set as text: the header parses it once, where an Address would parse
        # its addr_spec first (same header, same bytes; email-validator allows no quoting here).
        recipient = _validated(message.recipient, "recipient", display_name=False).ascii_email

        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = sender
        msg["To"] = recipient
        if message.subject is not None:
            msg["Subject"] = message.subject
        msg["Date"] = email.utils.format_datetime(datetime.now(UTC))
        msg["Message-ID"] = email.utils.make_msgid(domain=sender.domain)
        if reply_to is not None:
            msg["Reply-To"] = reply_to
        lowered = {k.lower() for k in custom}
        priority = _PRIORITY_HEADERS.get(message.priority)
        if priority is not None:
            if "x-priority" not in lowered:
                msg["X-Priority"] = priority[0]
            if "importance" not in lowered:
                msg["Importance"] = priority[1]
        for key, value in custom.items():
            msg[key] = value
        _set_body(msg, message.text, message.html, message.attachments)
        return msg

    def check(self, message: OutboundMessage) -> None:
        """Refuse a bad sender, Reply-To, header or empty body before anything is sent.

        Raises:
            ConfigurationError: Neither ``message.sender`` nor ``from_address`` is set.
            InvalidRecipientError: A bad sender or Reply-To address, or a bad header.
            PermanentDeliveryError: The message has no text, html or attachment to send.
        """
        self._envelope(message)

    def _envelope(self, message: OutboundMessage) -> tuple[Address, Address | None, dict[str, str]]:
        sender_text = message.sender or self.from_address
        if not sender_text:
            raise ConfigurationError(
                f"{self.name}: no From address: set the provider's from_address or the "
                "notification's sender"
            )
        sender = _mailbox(sender_text, "sender", display_name=True)
        reply_to = (
            _mailbox(message.reply_to, "reply_to", display_name=True) if message.reply_to else None
        )
        custom = _checked_headers(message.headers)
        if message.subject is not None:
            _single_line(message.subject, "subject")
        if message.text is None and message.html is None and not message.attachments:
            raise PermanentDeliveryError(
                f"{self.name}: notification {message.notification_id} has no text, html or "
                "attachment to email"
            )
        return sender, reply_to, custom

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send ``message`` to ``message.recipient`` within ``timeout`` seconds.

        Returns:
            A receipt whose ``provider_message_id`` is the Message-ID and whose ``detail`` is
            the server's answer to DATA (``"250 ..."``).

        Raises:
            InvalidRecipientError: Bad address or header (before any connection).
            ConfigurationError: No From address.
            PermanentDeliveryError: A 5xx answer, refused credentials, an untrusted certificate,
                or a required extension (STARTTLS, AUTH) the server lacks.
            DeliveryError: A 4xx answer, or the server is unreachable / disconnected.
            OperationTimeoutError: The deadline passed.
        """
        prepared = self._prepare(message)
        stage = ["waiting for a free connection or connecting"]
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._deliver(prepared, stage)
        except TimeoutError as exc:  # the deadline, or aiosmtplib's own per-command timeout
            raise OperationTimeoutError(
                f"{self.name}: no answer from {self._where} within {self.timeout}s ({stage[0]})"
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise translate_error(
                exc,
                provider=self.name,
                where=self._where,
                stage=stage[0],
                username=self.username,
                sender=prepared.envelope_from,
                recipient=prepared.envelope_to,
            ) from exc
        return SendReceipt(
            provider_message_id=str(prepared.message["Message-ID"]),
            detail=f"{reply.code} {reply.message}",
        )

    async def aclose(self) -> None:
        """QUIT and close the pooled connections; the provider may be used again afterwards."""
        await self._pool.aclose()

    def _prepare(self, message: OutboundMessage) -> _Prepared:
        msg = self.build_message(message)
        raw = msg.as_bytes(policy=email.policy.SMTP)
        if self.dkim is not None:
            raw = self.dkim.sign(raw) + raw
        sender = msg["From"].addresses[0].addr_spec
        recipient = msg["To"].addresses[0].addr_spec
        return _Prepared(msg, sender, recipient, raw)

    async def _deliver(self, prepared: _Prepared, stage: list[str]) -> aiosmtplib.SMTPResponse:
        fresh = False
        while True:
            stage[0] = "waiting for a free connection or connecting"
            conn = await self._pool.acquire(fresh=fresh)
            smtp = conn.smtp
            reusable = False
            try:
                options = [f"SIZE={len(prepared.raw)}"] if smtp.supports_extension("size") else []
                stage[0] = "MAIL FROM"
                await smtp.mail(prepared.envelope_from, options=options)
                stage[0] = "RCPT TO"
                await smtp.rcpt(prepared.envelope_to)
                stage[0] = "DATA"
                reply = await smtp.data(prepared.raw)
                reusable = True
            except aiosmtplib.SMTPResponseException:
                stage_failed = stage[0]
                stage[0] = "RSET"
                reusable = await smtp_reset(smtp)
                stage[0] = stage_failed
                raise
            except aiosmtplib.SMTPServerDisconnected:
                # A pooled connection the server dropped while idle fails on its first command;
                # nothing was accepted before DATA, so one retry on a new connection is safe.
                if conn.reused and not fresh and stage[0] != "DATA":
                    fresh = True
                    continue
                raise
            finally:
                self._pool.release(conn, reusable=reusable)
            return reply

    async def _connect(self) -> aiosmtplib.SMTP:
        if self.local_hostname is None:
            # Resolved once per provider: getfqdn may do a slow DNS lookup.
            self.local_hostname = await asyncio.to_thread(socket.getfqdn)
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
            use_tls=self.use_tls,
            start_tls=False,  # done below, so a failure can drop the socket at once
            tls_context=self.tls_context,
        )
        await smtp.connect()
        try:
            await smtp_hello(smtp)
            wants_tls = self.start_tls is True or (
                self.start_tls is None and not self.use_tls and smtp.supports_extension("starttls")
            )
            if wants_tls:
                await smtp.starttls()
                await smtp_hello(smtp)
            if self.username is not None:
                await smtp.login(self.username, self._password or "")
        except BaseException:
            drop_connection(smtp)
            raise
        return smtp


def _single_line(value: str, what: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise InvalidRecipientError(
            f"{what} must not contain CR, LF or NUL (header injection), got {value!r}"
        )
    return value


@functools.lru_cache(maxsize=4096)
def _validated(value: str, what: str, *, display_name: bool) -> ValidatedEmail:
    # Cached: the same From and recipient are checked by check(), validate() and the builder,
    # and email-validator is the costliest step of building a message (~70 us a call).
    _single_line(value, what)
    try:
        return validate_email(
            value,
            check_deliverability=False,
            allow_display_name=display_name,
            allow_smtputf8=False,
        )
    except EmailNotValidError as exc:
        raise InvalidRecipientError(f"invalid {what} email address {value!r}: {exc}") from exc


@functools.lru_cache(maxsize=256)
def _mailbox(value: str, what: str, *, display_name: bool) -> Address:
    # Cached: From (and Reply-To) repeat on every message, check() and the builder both need
    # them, and Address() parses its addr_spec again (~0.2M instructions). Address is immutable.
    info = _validated(value, what, display_name=display_name)
    return Address(display_name=info.display_name or "", addr_spec=info.ascii_email)


def _checked_headers(headers: Any) -> dict[str, str]:
    checked: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not _HEADER_NAME.fullmatch(key):
            raise InvalidRecipientError(
                f"header name must be printable ASCII without ':' or spaces, got {key!r}"
            )
        lowered = key.lower()
        if lowered in _RESERVED_HEADERS or lowered.startswith(_RESERVED_PREFIXES):
            raise InvalidRecipientError(
                f"header {key!r} is set by the email provider and cannot be given in headers"
            )
        checked[key] = _single_line(str(value), f"header {key!r}")
    return checked


def _text_cte(text: str) -> str | None:
    if text.isascii():
        return None  # the email package picks 7bit, or quoted-printable for long lines
    wide = sum(1 for c in text if ord(c) > 127)
    return "base64" if wide * 3 > len(text) else "quoted-printable"


def _set_body(
    msg: EmailMessage, text: str | None, html: str | None, attachments: Sequence[Attachment]
) -> None:
    if text is not None:
        msg.set_content(text, cte=_text_cte(text))
        if html is not None:
            msg.add_alternative(html, subtype="html", cte=_text_cte(html))
    elif html is not None:
        msg.set_content(html, subtype="html", cte=_text_cte(html))
    else:
        msg["MIME-Version"] = "1.0"
    for attachment in attachments:
        probe = Message()
        probe["Content-Type"] = attachment.content_type
        maintype, subtype = probe.get_content_maintype(), probe.get_content_subtype()
        params = {k: v for k, v in probe.get_params(failobj=[])[1:] if isinstance(v, str)}
        if maintype in {"multipart", "message"}:
            # Their bodies may not be base64 (RFC 2046); sent as opaque bytes instead.
            maintype, subtype, params = "application", "octet-stream", {}
        msg.add_attachment(
            attachment.content,
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
            params=params,
        )
