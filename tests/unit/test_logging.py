"""configure_logging renders JSON lines with bound context, and secrets never reach the output."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from pydantic import SecretStr

from dotmac.communications.observability import (
    REDACTED,
    bind_context,
    configure_logging,
    get_logger,
    span,
    use_tracer_provider,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def out() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    return stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_event_level_logger_and_utc_timestamp(out: io.StringIO) -> None:
    """Each event is one JSON object with event, level, logger and an ISO UTC timestamp."""
    get_logger("dotmac.communications.test").info("notification sent", channel="email")
    [line] = _lines(out)
    assert line["event"] == "notification sent"
    assert line["channel"] == "email"
    assert line["level"] == "info"
    assert line["logger"] == "dotmac.communications.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])


def test_bound_context_appears_inside_the_block_only(out: io.StringIO) -> None:
    """bind_context adds tenant, channel, event and notification ids to events in its block."""
    log = get_logger("dotmac.test")
    ids = {"tenant_id": "t1", "channel": "sms", "event_id": "e1", "notification_id": "n1"}
    with bind_context(**ids):
        log.info("inside")
    log.info("outside")
    inside, outside = _lines(out)
    assert ids.items() <= inside.items()
    assert not ids.keys() & outside.keys()


def test_initial_values_bound_to_a_logger(out: io.StringIO) -> None:
    """Values given to get_logger and bind() appear on every event of that logger."""
    get_logger("dotmac.test", component="gateway").bind(conn="c1").warning("slow client")
    [line] = _lines(out)
    assert line["component"] == "gateway"
    assert line["conn"] == "c1"
    assert line["level"] == "warning"


def test_secrets_are_redacted(out: io.StringIO) -> None:
    """SecretStr values, secret-looking keys, nested headers and URL passwords are masked."""
    get_logger("dotmac.test").info(
        "connecting",
        smtp_password="hunter2",
        jwt_secret=SecretStr("s3cr3t"),
        settings={"api_key": "k-123", "apiKey": "k-456", "host": "mail"},
        headers=[{"Authorization": "Bearer abc"}],
        url="redis://user:pa55@cache:6379/0",
        accessToken="tok",
        tokens_left=5,
    )
    text = out.getvalue()
    for secret in ("hunter2", "s3cr3t", "k-123", "k-456", "Bearer abc", "pa55", 'tok"'):
        assert secret not in text
    [line] = _lines(out)
    assert line["smtp_password"] == REDACTED
    assert line["jwt_secret"] == REDACTED
    assert line["settings"] == {"api_key": REDACTED, "apiKey": REDACTED, "host": "mail"}
    assert line["headers"] == [{"Authorization": REDACTED}]
    assert line["url"] == "redis://user:***@cache:6379/0"
    assert line["accessToken"] == REDACTED
    assert line["tokens_left"] == 5


def test_bound_secrets_are_redacted_too(out: io.StringIO) -> None:
    """A secret bound as context is masked like one passed to the call."""
    with bind_context(authorization="Basic dXNlcjpwYXNz"):
        get_logger("dotmac.test").info("request")
    assert "dXNlcjpwYXNz" not in out.getvalue()


def test_stdlib_loggers_render_as_json(out: io.StringIO) -> None:
    """Third-party stdlib logging comes out as JSON with its extras, context and redaction."""
    with bind_context(tenant_id="t9"):
        logging.getLogger("thirdparty.client").warning(
            "retrying %s", "GET", extra={"attempt": 2, "password": "pw"}
        )
    [line] = _lines(out)
    assert line["event"] == "retrying GET"
    assert line["logger"] == "thirdparty.client"
    assert line["level"] == "warning"
    assert line["attempt"] == 2
    assert line["password"] == REDACTED
    assert line["tenant_id"] == "t9"


def test_host_structlog_loggers_share_the_renderer(out: io.StringIO) -> None:
    """After configure_logging the host's own structlog loggers render the same JSON."""
    structlog.get_logger("host.app").info("started", api_key="k")
    [line] = _lines(out)
    assert line["event"] == "started"
    assert line["logger"] == "host.app"
    assert line["api_key"] == REDACTED


def test_exceptions_are_formatted(out: io.StringIO) -> None:
    """log.exception() puts the formatted traceback under "exception"."""
    try:
        raise ValueError("bad payload")
    except ValueError:
        get_logger("dotmac.test").exception("handler failed")
    [line] = _lines(out)
    assert line["level"] == "error"
    assert "Traceback (most recent call last)" in line["exception"]
    assert "ValueError: bad payload" in line["exception"]


def test_level_filters_events(out: io.StringIO) -> None:
    """Events below the configured level are dropped."""
    log = get_logger("dotmac.test")
    log.debug("noise")
    log.info("signal")
    assert [line["event"] for line in _lines(out)] == ["signal"]


def test_configure_twice_keeps_one_handler() -> None:
    """Calling configure_logging again replaces its handler instead of adding a second."""
    first, second = io.StringIO(), io.StringIO()
    handler_one = configure_logging("INFO", stream=first)
    handler_two = configure_logging(logging.DEBUG, stream=second)
    root = logging.getLogger()
    assert handler_one not in root.handlers
    assert handler_two in root.handlers
    get_logger("dotmac.test").debug("once")
    assert first.getvalue() == ""
    assert [line["event"] for line in _lines(second)] == ["once"]


def test_console_format_is_human_readable() -> None:
    """The console renderer writes the event and its key-value pairs, not JSON."""
    stream = io.StringIO()
    configure_logging("INFO", "console", stream=stream)
    get_logger("dotmac.test").info("ready", port=8000, password="pw")
    text = stream.getvalue()
    assert "ready" in text
    assert "port=8000" in text
    assert "pw'" not in text
    assert REDACTED in text
    assert not text.lstrip().startswith("{")


def test_trace_ids_are_added_inside_a_span(out: io.StringIO) -> None:
    """An event logged inside a recording span carries its trace and span ids."""
    provider = TracerProvider()
    use_tracer_provider(provider)
    try:
        with span("notification.send") as current:
            get_logger("dotmac.test").info("sending")
        ctx = current.get_span_context()
    finally:
        use_tracer_provider(None)
        provider.shutdown()
    [line] = _lines(out)
    assert line["trace_id"] == f"{ctx.trace_id:032x}"
    assert line["span_id"] == f"{ctx.span_id:016x}"


def test_library_logs_reach_stdlib_without_configure(caplog: pytest.LogCaptureFixture) -> None:
    """Without configure_logging, library events go to stdlib logging as readable lines."""
    caplog.set_level(logging.INFO, logger="dotmac.plain")
    get_logger("dotmac.plain").info("sent", channel="email", token="t0k")
    [record] = caplog.records
    assert record.name == "dotmac.plain"
    assert record.getMessage() == f"sent channel='email' token='{REDACTED}'"


@pytest.mark.parametrize(
    ("level", "fmt", "message"),
    [("INFO", "xml", "log format"), ("LOUD", "json", "unknown log level")],
)
def test_bad_arguments_are_rejected(level: str, fmt: str, message: str) -> None:
    """An unknown format or level raises ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        configure_logging(level, fmt, stream=io.StringIO())  # type: ignore[arg-type]


def test_exception_text_is_scrubbed(out: io.StringIO) -> None:
    """A URL password in an exception message is masked in the formatted traceback."""
    try:
        raise ConnectionError("cannot reach redis://:hunter2@cache:6379")
    except ConnectionError:
        get_logger("dotmac.test").exception("publish failed")
    assert "hunter2" not in out.getvalue()
    [line] = _lines(out)
    assert "ConnectionError: cannot reach redis://:***@cache:6379" in line["exception"]


def test_stdlib_exception_and_message_are_scrubbed(out: io.StringIO) -> None:
    """A third-party logger's message and traceback lose URL passwords and secret pairs too."""
    try:
        raise OSError("login failed: password=hunter2")
    except OSError as exc:
        logging.getLogger("thirdparty.db").exception("lost redis://u:s3cr3t@db:6379/0: %s", exc)
    text = out.getvalue()
    assert "hunter2" not in text
    assert "s3cr3t" not in text
    [line] = _lines(out)
    assert line["event"] == f"lost redis://u:***@db:6379/0: login failed: password={REDACTED}"
    assert f"OSError: login failed: password={REDACTED}" in line["exception"]


def test_exception_values_are_scrubbed(out: io.StringIO) -> None:
    """An exception passed as a value is logged as its scrubbed "Type: message" text."""
    error = ConnectionError("redis://:hunter2@cache:6379 refused")
    get_logger("dotmac.test").warning("retrying", error=error)
    [line] = _lines(out)
    assert line["error"] == "ConnectionError: redis://:***@cache:6379 refused"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:p@ss@cache:6379/0", "redis://:***@cache:6379/0"),
        ("smtp://me@example.com:pw@smtp.host:587", "smtp://me@example.com:***@smtp.host:587"),
        ("redis://cache:6379/0?client_name=a@b", "redis://cache:6379/0?client_name=a@b"),
    ],
)
def test_url_password_ends_at_the_last_at_sign(out: io.StringIO, url: str, masked: str) -> None:
    """Userinfo runs to the last '@' of the authority: passwords and user names may hold '@'."""
    get_logger("dotmac.test").info("connecting", url=url)
    [line] = _lines(out)
    assert line["url"] == masked


def test_console_exception_is_scrubbed() -> None:
    """The console renderer's traceback is scrubbed as well."""
    stream = io.StringIO()
    configure_logging("INFO", "console", stream=stream)
    try:
        raise ConnectionError("cannot reach redis://:hunter2@cache:6379")
    except ConnectionError:
        get_logger("dotmac.test").exception("publish failed")
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "Traceback (most recent call last)" in text
    assert "redis://:***@cache:6379" in text
