"""Fixtures for notification tests: a recording HTTP server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from _support.http_server import RecordingHTTPServer, serve


@pytest.fixture
def http_server() -> Iterator[RecordingHTTPServer]:
    """A started loopback HTTP server that records requests (see ``_support.http_server``)."""
    yield from serve()
