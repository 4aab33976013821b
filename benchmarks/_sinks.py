"""Loopback sinks for ``bench_notifications.py``, each run in its own OS process.

``python benchmarks/_sinks.py KIND`` listens on a free 127.0.0.1 port and prints ``PORT <n>``.
It then reads commands on stdin, one per line: ``stats`` answers ``STATS <messages> <cpu s>``
(messages accepted so far, and this process's user+system CPU seconds); end of stdin stops it
(so a sink never outlives the benchmark that started it).

Kinds:

- ``smtp``: a minimal asyncio SMTP responder (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT;
  every command answered ``250``, every message ``250 OK``). It parses only what it must: the
  command verb and the ``<CRLF>.<CRLF>`` end of DATA.
- ``aiosmtpd``: an aiosmtpd ``Controller`` whose handler counts the message and answers
  ``250 OK`` (the reference server; it costs more CPU per message than ``smtp``).
- ``http``: a minimal asyncio HTTP/1.1 keep-alive server: reads the head, then the body by
  ``Content-Length``, and answers ``200`` with ``Content-Length: 0`` (pipelining allowed;
  ``Connection: close`` honoured).

The benchmark samples the sink's CPU time around each run: a sink near 100 % of a core would be
the bottleneck. :class:`SinkProcess` and :func:`sinks` are the benchmark's side: they start
``python _sinks.py KIND``, read its port and ask for ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

_EOD = b"\r\n.\r\n"
_EHLO = b"250-sink.local\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250 HELP\r\n"
_OK = b"250 OK\r\n"
_HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_HTTP_OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_MAX_HEAD = 64 * 1024


class Counter:
    """Messages accepted by this sink (read by the stdin thread, written by the loop)."""

    messages = 0


class SmtpResponder(asyncio.Protocol):
    """One SMTP session: answers every command with success and counts DATA messages."""

    def __init__(self) -> None:
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # TCP server
        self.transport = transport
        transport.write(b"220 sink.local ESMTP bench sink\r\n")

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None  # set in connection_made
        self.buffer += data
        replies: list[bytes] = []
        while self.buffer:
            if self.in_data:
                # The body follows "354"; it ends at CRLF "." CRLF (a body is never empty here:
                # every client sends headers, so the first CRLF precedes the dot).
                end = self.buffer.find(_EOD)
                if end < 0:
                    break
                self.buffer = self.buffer[end + len(_EOD) :]
                self.in_data = False
                Counter.messages += 1
                replies.append(b"250 OK queued\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(_EHLO)
            elif verb == b"DATA":
                self.in_data = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 Bye\r\n")
                transport.write(b"".join(replies))
                transport.close()
                return
            elif verb in {b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"}:
                replies.append(_OK)
            else:
                replies.append(b"502 Command not implemented\r\n")
        if replies:
            transport.write(b"".join(replies))


class HttpResponder(asyncio.Protocol):
    """One HTTP/1.1 connection: reads each request (head, then body by length), answers 200."""

    def __init__(self) -> None:
        self.buffer = b""
        self.body_left = -1  # bytes of the current body still to come; -1: reading a head
        self.close_after = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # TCP server
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None  # set in connection_made
        self.buffer += data
        replies: list[bytes] = []
        while True:
            if self.body_left < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > _MAX_HEAD:
                        transport.close()
                        return
                    break
                head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4 :]
                self.body_left = 0
                self.close_after = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name == b"content-length":
                        self.body_left = int(value.strip())
                    elif name == b"connection" and value.strip() == b"close":
                        self.close_after = True
            if len(self.buffer) < self.body_left:
                self.body_left -= len(self.buffer)
                self.buffer = b""
                break
            self.buffer = self.buffer[self.body_left :]
            self.body_left = -1
            Counter.messages += 1
            if self.close_after:
                transport.write(b"".join(replies) + _HTTP_OK_CLOSE)
                transport.close()
                return
            replies.append(_HTTP_OK)
        if replies:
            transport.write(b"".join(replies))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serve_commands(stop: threading.Event) -> None:
    """Answer ``stats`` on stdin until it closes, then set ``stop``."""
    for line in sys.stdin:
        if line.strip() == "stats":
            print(f"STATS {Counter.messages} {_cpu_seconds():.4f}", flush=True)
    stop.set()


async def _serve_asyncio(kind: str) -> None:
    loop = asyncio.get_running_loop()
    factory: Any = SmtpResponder if kind == "smtp" else HttpResponder
    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    stop = threading.Event()
    done = asyncio.Event()
    threading.Thread(
        target=lambda: (_serve_commands(stop), loop.call_soon_threadsafe(done.set)),
        daemon=True,
    ).start()
    print(f"PORT {port}", flush=True)
    async with server:
        await done.wait()


def _serve_aiosmtpd() -> None:
    from aiosmtpd.controller import Controller  # only this kind needs it

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            Counter.messages += 1
            return "250 OK"

    with socket.socket() as probe:  # Controller checks readiness by connecting: no port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        print(f"PORT {port}", flush=True)
        stop = threading.Event()
        _serve_commands(stop)
    finally:
        controller.stop()


# ----------------------------------------------------------------------- the parent's side
class SinkProcess:
    """Start a sink of ``kind`` in its own process (the benchmark's handle on it).

    ``port`` is where it listens; :meth:`stats` returns (messages accepted, CPU seconds).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, __file__, kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            self.close()
            raise RuntimeError(f"{kind} sink did not start (said {line!r})")
        self.port = int(line[1])

    def stats(self) -> tuple[int, float]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        _, messages, cpu = self.proc.stdout.readline().split()
        return int(messages), float(cpu)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # end of stdin stops the sink
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def sinks(smtp_kind: str) -> Iterator[tuple[SinkProcess, SinkProcess]]:
    """An SMTP sink of ``smtp_kind`` and an HTTP sink, stopped on exit."""
    smtp = SinkProcess(smtp_kind)
    try:
        http = SinkProcess("http")
        try:
            yield smtp, http
        finally:
            http.close()
    finally:
        smtp.close()


def main() -> None:
    """Run the sink named by the first argument (``smtp``, ``aiosmtpd`` or ``http``)."""
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind in {"smtp", "http"}:
        asyncio.run(_serve_asyncio(kind))
    elif kind == "aiosmtpd":
        _serve_aiosmtpd()
    else:
        sys.exit(f"usage: {sys.argv[0]} smtp|aiosmtpd|http")


if __name__ == "__main__":
    main()
