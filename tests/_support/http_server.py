"""A real HTTP server on loopback that records requests and answers as a test scripts it.

It runs in its own thread (stdlib ``ThreadingHTTPServer``), so it answers while the test's event
loop awaits the client under test, and a handler may block to simulate a hanging provider.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Recorded:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def form(self) -> dict[str, list[str]]:
        """The body parsed as an urlencoded form."""
        return parse_qs(self.body.decode())


@dataclass
class Reply:
    """What the server answers."""

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a hanging provider)


Responder = Callable[[Recorded], Reply]


class RecordingHTTPServer:
    """Loopback HTTP server: ``url``, ``requests``, and scripted replies.

    Replies come from ``enqueue()``d ones first (in order), then from ``responder`` (default:
    200 with an empty JSON object).
    """

    def __init__(self, responder: Responder | None = None) -> None:
        self.requests: list[Recorded] = []
        self.responder: Responder = responder or (lambda _r: Reply(200, {}))
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each reply waits ~40 ms for delayed ACKs

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                recorded = Recorded(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with outer._lock:
                    outer.requests.append(recorded)
                    reply = outer._queue.popleft() if outer._queue else None
                if reply is None:
                    reply = outer.responder(recorded)
                if reply.delay:
                    outer._closing.wait(reply.delay)
                payload = reply.body
                headers = dict(reply.headers)
                if isinstance(payload, (dict, list)):
                    payload = json.dumps(payload).encode()
                    headers.setdefault("Content-Type", "application/json")
                elif isinstance(payload, str):
                    payload = payload.encode()
                try:
                    self.send_response(reply.status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (deadline tests)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def enqueue(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order."""
        with self._lock:
            self._queue.extend(replies)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Recorded]:
        """Block until ``count`` requests arrived (fail with AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.005)
        raise AssertionError(f"expected {count} requests, got {len(self.requests)}")

    def start(self) -> RecordingHTTPServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; hanging replies are released."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(responder: Responder | None = None) -> Iterator[RecordingHTTPServer]:
    """Generator for fixtures: a started server, closed afterwards."""
    server = RecordingHTTPServer(responder).start()
    try:
        yield server
    finally:
        server.close()
