"""SMTP plumbing for :class:`~.email.SMTPProvider`: a connection pool and error translation.

At most ``size`` connections are open (idle or leased) at once; a caller waits for a free slot,
so the waiting counts against whatever deadline surrounds :meth:`SmtpPool.acquire`. Idle
connections are reused most-recently-used first; one that has sat idle longer than
``noop_after`` seconds is checked with ``NOOP`` before it is handed out, and a dead one is
closed and replaced. The pool lets aiosmtplib's and the OS's exceptions through;
:func:`translate_error` maps them to the library's errors at the provider's boundary:
4xx → :class:`DeliveryError`, 5xx → :class:`PermanentDeliveryError` (server code and text kept),
an untrusted certificate or a missing required extension → :class:`PermanentDeliveryError`,
network errors and disconnects → :class:`DeliveryError`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib

from dotmac.communications.errors import (
    CommunicationsError,
    DeliveryError,
    PermanentDeliveryError,
)

__all__ = [
    "PooledConnection",
    "SmtpPool",
    "drop_connection",
    "smtp_hello",
    "smtp_reset",
    "translate_error",
]

_QUIT_TIMEOUT = 2.0


def drop_connection(smtp: aiosmtplib.SMTP) -> None:
    """Close ``smtp`` at once, without QUIT or a TLS close_notify exchange.

    Used for connections in an unknown or failed state. ``SMTP.close()`` alone starts a graceful
    TLS shutdown that needs the event loop to keep running; aborting frees the socket now.
    """
    transport = smtp.transport
    smtp.close()
    _abort(transport)


@dataclass(slots=True, eq=False)
class PooledConnection:
    """One SMTP connection owned by a :class:`SmtpPool`."""

    smtp: aiosmtplib.SMTP
    generation: int
    last_used: float
    reused: bool = False
    """True when it came from the idle list (it may have gone stale) rather than a fresh connect."""


class SmtpPool:
    """Up to ``size`` connected ``aiosmtplib.SMTP`` clients, reused across messages.

    Args:
        connect: Opens and returns a new, ready connection (greeting, EHLO, STARTTLS, AUTH done).
        size: Most connections open at once (>= 1).
        noop_after: Seconds of idleness after which a connection is checked with NOOP on reuse.
        clock: Monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[aiosmtplib.SMTP]],
        *,
        size: int,
        noop_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size!r}")
        self._connect = connect
        self._size = size
        self._noop_after = noop_after
        self._clock = clock
        self._slots = asyncio.Semaphore(size)
        self._idle: list[PooledConnection] = []
        self._generation = 0

    @property
    def idle_count(self) -> int:
        """Connections open and waiting to be reused."""
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> PooledConnection:
        """Wait for a free slot, then return a live idle connection or a new one.

        Args:
            fresh: Open a new connection even if idle ones exist (the least recently used idle
                one is closed to stay within ``size``).

        Raises:
            aiosmtplib.SMTPException | OSError: Opening a new connection failed (the slot is
                given back first).
        """
        await self._slots.acquire()
        try:
            if fresh and self._idle:
                drop_connection(self._idle.pop(0).smtp)
            while self._idle and not fresh:
                conn = self._idle.pop()
                if await self._alive(conn):
                    conn.reused = True
                    return conn
            smtp = await self._connect()
        except BaseException:
            # Whatever stopped us (connect error, deadline, cancellation), the slot is free again.
            self._slots.release()
            raise
        return PooledConnection(smtp, self._generation, self._clock())

    def release(self, conn: PooledConnection, *, reusable: bool) -> None:
        """Give ``conn`` back: keep it idle when ``reusable`` and still connected, else close it."""
        try:
            if reusable and conn.smtp.is_connected and conn.generation == self._generation:
                conn.last_used = self._clock()
                self._idle.append(conn)
            else:
                drop_connection(conn.smtp)
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """QUIT and close every idle connection; leased ones are closed when released.

        The pool stays usable: a later :meth:`acquire` opens new connections.
        """
        self._generation += 1
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(conn.smtp) for conn in idle))

    async def _alive(self, conn: PooledConnection) -> bool:
        if not conn.smtp.is_connected:
            drop_connection(conn.smtp)
            return False
        if self._clock() - conn.last_used < self._noop_after:
            return True
        try:
            await conn.smtp.noop()
        except (aiosmtplib.SMTPException, OSError):
            # Any failure means the connection is unusable; the caller opens a fresh one.
            drop_connection(conn.smtp)
            return False
        except BaseException:
            drop_connection(conn.smtp)
            raise
        return True


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    transport = smtp.transport
    try:
        async with asyncio.timeout(_QUIT_TIMEOUT):
            await smtp.quit()
    except (aiosmtplib.SMTPException, OSError):
        # A polite QUIT that fails changes nothing: the connection is closed below either way.
        pass
    finally:
        smtp.close()
        _abort(transport)


def _abort(transport: asyncio.BaseTransport | None) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()


async def smtp_hello(smtp: aiosmtplib.SMTP) -> None:
    """Send EHLO, falling back to HELO for servers that refuse it."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()


async def smtp_reset(smtp: aiosmtplib.SMTP) -> bool:
    """Send RSET after a failed transaction; False when the connection must be dropped."""
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        # The envelope cannot be cleared: the connection is dropped instead of reused.
        return False
    return True


def translate_error(
    exc: aiosmtplib.SMTPException | OSError,
    *,
    provider: str,
    where: str,
    stage: str,
    username: str | None,
    sender: str,
    recipient: str,
) -> CommunicationsError:
    """Map an aiosmtplib or OS error to the library's error (see the module docstring).

    Args:
        exc: The error raised while connecting or sending.
        provider: Provider name, first in the message.
        where: ``host:port`` of the server.
        stage: What was being done (``MAIL FROM``, ``RCPT TO``, ``DATA``, connecting...).
        username: The AUTH user, named when credentials are refused (never the password).
        sender: Envelope sender.
        recipient: Envelope recipient.
    """
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            what = f"{where} refused the credentials of {username!r}"
        elif isinstance(exc, aiosmtplib.SMTPRecipientRefused):
            what = f"{where} refused recipient {recipient}"
        elif isinstance(exc, aiosmtplib.SMTPSenderRefused):
            what = f"{where} refused sender {sender}"
        elif isinstance(exc, aiosmtplib.SMTPDataError):
            what = f"{where} refused the message to {recipient}"
        elif isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            what = f"{where} refused the connection"
        else:
            what = f"{where} answered an error during {stage}"
        text = f"{provider}: {what}: {exc.code} {exc.message}"
        return PermanentDeliveryError(text) if exc.code >= 500 else DeliveryError(text)
    cert_error = _find_cause(exc, ssl.SSLCertVerificationError)
    if cert_error is not None:
        return PermanentDeliveryError(
            f"{provider}: TLS certificate of {where} not trusted: {cert_error}"
        )
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return DeliveryError(f"{provider}: {where} closed the connection during {stage}")
    if isinstance(exc, OSError):
        return DeliveryError(f"{provider}: cannot reach {where}: {exc}")
    # SMTPNotSupported and plain SMTPException: a required extension (STARTTLS, AUTH) is
    # missing or the server answered nonsense; retrying the same server will not help.
    return PermanentDeliveryError(f"{provider}: {where} during {stage}: {exc}")


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
