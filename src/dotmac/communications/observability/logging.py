"""Structured logging with structlog: JSON lines in production, a console renderer in development.

The library logs through :func:`get_logger`, which hands every event to the standard
:mod:`logging` module, so a host that never calls :func:`configure_logging` still sees the
library's logs in its own handlers (as ``"event key=value ..."`` lines). A host that calls
:func:`configure_logging` gets one renderer for everything: the library's events, its own
structlog loggers and third-party stdlib loggers all come out as JSON (or console) lines with an
ISO UTC timestamp, level, logger name, formatted exceptions, the current trace and span ids, and
the context bound with :func:`bind_context` (``tenant_id``, ``channel``, ``event_id``,
``notification_id``). :func:`redact_secrets` runs on every event, and the rendered traceback and
stack are scrubbed the same way, so secrets never reach a log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any, Literal, TextIO

import structlog
from opentelemetry import trace
from pydantic import SecretBytes, SecretStr
from structlog.typing import EventDict, ExcInfo, Processor, WrappedLogger

from ._scrub import REDACTED, SENSITIVE_WORDS, scrub_secrets

__all__ = ["REDACTED", "bind_context", "configure_logging", "get_logger", "redact_secrets"]

# A key is secret when one of its ``_``/``-``/``.`` separated words names a secret
# (``jwt_secret``, ``access_token``, ``X-Api-Key``, ``Authorization``); ``tokens_left`` is not.
_SECRET_KEY = re.compile(rf"(?:^|[_.-])(?:{SENSITIVE_WORDS})(?:$|[_.-])")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Keys whose text is rendered after redact_secrets ran (format_exc_info, StackInfoRenderer).
_RENDERED_KEYS = ("event", "exception", "stack")
_MAX_DEPTH = 6
# The library's own events travel to stdlib handlers under this LogRecord attribute.
_STASH = "_dotmac_event"


def _secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    return _SECRET_KEY.search(_CAMEL.sub("_", key).lower()) is not None


def _scrub(value: Any, depth: int) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if isinstance(value, BaseException):
        # ``log.warning("retrying", error=exc)``: rendered as its message, which may hold a URL.
        value = f"{type(value).__qualname__}: {value}"
    if isinstance(value, str):
        return scrub_secrets(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if _secret_key(k) and v is not None else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Structlog processor: hide secrets before an event is rendered.

    Replaces pydantic ``SecretStr``/``SecretBytes`` values and the values of keys that name a
    secret (password, token, secret, authorization, api_key, private_key, credentials, cookie),
    in nested dicts and lists too, with :data:`REDACTED`; in strings (the event message
    included) masks passwords in URLs (``redis://:***@host``) and secret ``key=value`` pairs.
    Exceptions given as values are rendered as scrubbed ``"Type: message"`` text.
    """
    for key, val in event_dict.items():
        if key.startswith("_") or key in {"exc_info", "stack_info"}:
            continue
        if _secret_key(key) and val is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(val, 0)
    return event_dict


def _scrub_rendered(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # The traceback and stack are rendered from objects after redact_secrets ran, and an
    # exception message often quotes a connection URL: scrub the text that will be written.
    for key in _RENDERED_KEYS:
        text = event_dict.get(key)
        if isinstance(text, str):
            event_dict[key] = scrub_secrets(text)
    return event_dict


def _scrubbed_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    # Plain rather than rich tracebacks in the console: rich prints local variables (which may
    # hold secrets) and wraps long lines (which would split a URL before it is scrubbed).
    buffer = io.StringIO()
    structlog.dev.plain_traceback(buffer, exc_info)
    sio.write(scrub_secrets(buffer.getvalue()))


def _add_trace_ids(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def _to_stdlib(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # A readable message for hosts with plain formatters; the structured event rides along in
    # one LogRecord attribute (one name, so no key can collide with LogRecord's own fields).
    exc_info = event_dict.pop("exc_info", None)
    stack_info = event_dict.pop("stack_info", False)
    event = str(event_dict.get("event", ""))
    pairs = " ".join(f"{k}={v!r}" for k, v in event_dict.items() if k != "event")
    kwargs: dict[str, Any] = {"extra": {_STASH: event_dict}, "stack_info": bool(stack_info)}
    if exc_info:
        kwargs["exc_info"] = exc_info
    return ((f"{event} {pairs}" if pairs else event,), kwargs)


_RECORD_FIELDS = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName"}
)


def _add_record_fields(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # Foreign records: the library's stashed event, or the ``extra=`` fields a stdlib caller gave.
    record = event_dict.get("_record")
    if record is None:
        return event_dict
    stashed = record.__dict__.get(_STASH)
    if isinstance(stashed, dict):
        event_dict.update(stashed)
        return event_dict
    for key, val in record.__dict__.items():
        if key not in _RECORD_FIELDS and not key.startswith("_"):
            event_dict.setdefault(key, val)
    return event_dict


_LIBRARY_PROCESSORS: list[Processor] = [
    structlog.stdlib.filter_by_level,
    structlog.contextvars.merge_contextvars,
    redact_secrets,
    _to_stdlib,
]


def get_logger(name: str, **initial_values: Any) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger that writes to the stdlib logger ``name``.

    It works whether or not :func:`configure_logging` was called: events always go to
    :mod:`logging`, and are rendered as JSON or console lines once logging is configured.

    Args:
        name: Logger name, usually ``__name__``.
        **initial_values: Key-value pairs bound to every event of this logger.
    """
    return structlog.stdlib.BoundLogger(
        logging.getLogger(name), _LIBRARY_PROCESSORS, dict(initial_values)
    )


@contextlib.contextmanager
def bind_context(**values: Any) -> Iterator[None]:
    """Bind ``values`` to every log event inside the block (this task and its children only).

    Example:
        ``with bind_context(tenant_id="t1", notification_id=nid): ...``
    """
    with structlog.contextvars.bound_contextvars(**values):
        yield


class _DotmacHandler(logging.StreamHandler[TextIO]):
    """The root handler :func:`configure_logging` installs (found again by its type)."""


def configure_logging(
    level: str | int = "INFO",
    fmt: Literal["json", "console"] = "json",
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route structlog and stdlib logging through one renderer on the root logger.

    Call once at start-up (calling again replaces the previous setup; handlers are never
    duplicated). Configures structlog globally, so the host's own ``structlog.get_logger()``
    renders the same way.

    Args:
        level: Root log level, a name (``"DEBUG"``) or a number.
        fmt: ``"json"`` for one JSON object per line (production) or ``"console"`` for a
            readable, colored-when-a-terminal format (development).
        stream: Where to write; ``sys.stderr`` by default.

    Returns:
        The installed root handler.

    Raises:
        ValueError: ``fmt`` or ``level`` is not recognised.
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be 'json' or 'console', got {fmt!r}")
    level_no = _level_number(level)
    out = stream if stream is not None else sys.stderr

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        redact_secrets,
        structlog.processors.StackInfoRenderer(),
    ]
    final: list[Processor]
    if fmt == "json":
        final = [
            structlog.processors.format_exc_info,
            _scrub_rendered,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        final = [
            _scrub_rendered,
            structlog.dev.ConsoleRenderer(
                colors=_is_tty(out), exception_formatter=_scrubbed_traceback
            ),
        ]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_add_record_fields, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = _DotmacHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DotmacHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level_no)
    return handler


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
