"""``Event``: a CloudEvents 1.0 event with the library's extensions, and its JSON codec.

The wire form is one JSON object (orjson) holding the CloudEvents attributes (``specversion``,
``id``, ``source``, ``type``, ``time``, ``datacontenttype``, ``subject``, ``data``) plus the
extensions ``key``, ``tenantid``, ``correlationid``, ``causationid``, ``traceparent`` and
``headers``. CloudEvents extension names are lower-case alphanumerics, hence ``tenantid``.
"""

from __future__ import annotations

import itertools
import os
import time as _time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel

from dotmac.communications.errors import (
    EventDecodeError,
    EventError,
    EventSerializationError,
    EventTooLargeError,
)

from ._topics import validate_topic

__all__ = ["DEFAULT_SOURCE", "Event", "dumps", "new_event_id"]

DEFAULT_SOURCE = "/dotmac-communications"
SPECVERSION = "1.0"
_EXTENSIONS = (
    ("key", "key"),
    ("tenant_id", "tenantid"),
    ("correlation_id", "correlationid"),
    ("causation_id", "causationid"),
    ("traceparent", "traceparent"),
)
_FIELDS = (
    "type", "data", "id", "source", "time", "datacontenttype", "subject", "key", "tenant_id",
    "correlation_id", "causation_id", "traceparent", "headers", "attempt",
)  # fmt: skip

# Event ids: a random per-process prefix plus a counter. Unique across processes (48 random
# bits per process, re-drawn after fork) and ~7x cheaper than uuid4 on the publish hot path.
_prefix = os.urandom(6).hex()
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter  # noqa: PLW0603 -- per-process state must change after fork
    _prefix = os.urandom(6).hex()
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_event_id() -> str:
    """Return a new event id, unique across processes (24 hex characters)."""
    return f"{_prefix}{next(_counter):012x}"


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any) -> bytes:
    """Serialise ``value`` to JSON bytes (pydantic models become their JSON form).

    Raises:
        EventSerializationError: ``value`` contains something JSON cannot hold.
    """
    try:
        return orjson.dumps(value, default=_default, option=orjson.OPT_UTC_Z)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise EventSerializationError(f"event data is not JSON-serialisable: {exc}") from exc


class Event:
    """One event: CloudEvents 1.0 attributes plus routing and tracing extensions.

    Args:
        type: The topic (``orders.created``); CloudEvents ``type``.
        data: JSON-serialisable payload (a pydantic model is dumped to JSON form).
        id: Unique id; generated when omitted.
        source: URI-reference of the producer (CloudEvents ``source``).
        time: When it happened (aware datetime); now when omitted.
        datacontenttype: Media type of ``data``.
        subject: What the event is about within the source (CloudEvents ``subject``).
        key: Ordering key: events with the same key are handled in order within a group.
        tenant_id: Tenant the event belongs to.
        correlation_id: Id shared by every event of one business flow.
        causation_id: Id of the event that caused this one.
        traceparent: W3C trace context of the producer.
        headers: Further string headers.
        attempt: Delivery attempt (1 on the first delivery; set by the bus).

    Raises:
        InvalidTopicError: ``type`` is not a valid topic.
    """

    __slots__ = (
        "_data",
        "_data_json",
        "_dt",
        "_ts",
        "attempt",
        "causation_id",
        "correlation_id",
        "datacontenttype",
        "headers",
        "id",
        "key",
        "source",
        "subject",
        "tenant_id",
        "traceparent",
        "type",
    )

    def __init__(
        self,
        type: str,
        data: Any = None,
        *,
        id: str | None = None,
        source: str = DEFAULT_SOURCE,
        time: datetime | None = None,
        datacontenttype: str = "application/json",
        subject: str | None = None,
        key: str | None = None,
        tenant_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        traceparent: str | None = None,
        headers: Mapping[str, str] | None = None,
        attempt: int = 1,
    ) -> None:
        self.type = validate_topic(type)
        self._data = data
        self._data_json: bytes | None = None
        self.id = id or new_event_id()
        self.source = source
        # The datetime is built on first read: publishing never needs it on the memory backend.
        self._dt = time
        self._ts = _time.time() if time is None else 0.0
        self.datacontenttype = datacontenttype
        self.subject = subject
        self.key = key
        self.tenant_id = tenant_id
        self.correlation_id = correlation_id
        self.causation_id = causation_id
        self.traceparent = traceparent
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self.attempt = attempt

    @classmethod
    def _plain(cls, type: str, data: Any, source: str) -> Event:
        # The publish hot path's constructor: no options given, so no keyword handling.
        new = object.__new__(cls)
        new.type = validate_topic(type)
        new._data = data
        new._data_json = None
        new.id = f"{_prefix}{next(_counter):012x}"  # new_event_id(), inlined
        new.source = source
        new._dt = None
        new._ts = _time.time()
        new.datacontenttype = "application/json"
        new.subject = new.key = new.tenant_id = None
        new.correlation_id = new.causation_id = new.traceparent = None
        new.headers = {}
        new.attempt = 1
        return new

    @property
    def data(self) -> Any:
        """The payload (JSON types, or a model instance after validation by a subscription)."""
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data = value
        self._data_json = None

    @property
    def time(self) -> datetime:
        """When the event happened (aware, UTC unless given otherwise)."""
        dt = self._dt
        if dt is None:
            dt = self._dt = datetime.fromtimestamp(self._ts, UTC)
        return dt

    @time.setter
    def time(self, value: datetime) -> None:
        self._dt = value

    @property
    def topic(self) -> str:
        """The topic (same as ``type``)."""
        return self.type

    def __repr__(self) -> str:
        return (
            f"Event(type={self.type!r}, id={self.id!r}, key={self.key!r}, attempt={self.attempt})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable value object

    def data_json(self, *, max_bytes: int | None = None) -> bytes:
        """Serialise ``data`` (once; the result is cached until ``data`` is replaced).

        Args:
            max_bytes: Refuse data whose JSON is larger than this.

        Raises:
            EventSerializationError: ``data`` is not JSON-serialisable.
            EventTooLargeError: The JSON is larger than ``max_bytes``.
        """
        raw = self._data_json
        if raw is None:
            raw = self._data_json = dumps(self._data)
        if max_bytes is not None and len(raw) > max_bytes:
            raise EventTooLargeError(
                f"event {self.type!r} data is {len(raw)} bytes serialised; the limit is "
                f"{max_bytes} (events.max_event_bytes)"
            )
        return raw

    def to_record(self) -> tuple[Any, ...]:
        """Return the event as a flat tuple of immutable values (the memory backend's entry).

        A tuple of strings, numbers and bytes is not tracked by the garbage collector, so
        thousands of queued events cost it nothing; :meth:`from_record` rebuilds the event.
        """
        headers = tuple(self.headers.items()) if self.headers else None
        raw = self._data_json
        return (
            self.type, self.id, self.source, self._ts, self._dt, self.datacontenttype,
            self.subject, self.key, self.tenant_id, self.correlation_id, self.causation_id,
            self.traceparent, headers, self.data_json() if raw is None else raw,
        )  # fmt: skip

    @classmethod
    def from_record(cls, record: tuple[Any, ...], attempt: int = 1) -> Event:
        """Rebuild an independent event from :meth:`to_record` (``data`` decoded afresh)."""
        new = object.__new__(cls)
        (
            new.type, new.id, new.source, new._ts, new._dt, new.datacontenttype, new.subject,
            new.key, new.tenant_id, new.correlation_id, new.causation_id, new.traceparent,
            headers, raw,
        ) = record  # fmt: skip
        new.headers = dict(headers) if headers else {}
        new._data = orjson.loads(raw)
        new._data_json = raw
        new.attempt = attempt
        return new

    # ------------------------------------------------------------------------------ codec
    def to_cloudevent(self) -> dict[str, Any]:
        """Return the structured-mode CloudEvents JSON object (``time`` as RFC 3339 text)."""
        out = self._envelope()
        out["time"] = self.time.isoformat().replace("+00:00", "Z")
        return out

    def _envelope(self) -> dict[str, Any]:
        # time stays a datetime: orjson formats it faster than isoformat() does.
        out: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "datacontenttype": self.datacontenttype,
        }
        if self.subject is not None:
            out["subject"] = self.subject
        for attr, ext in _EXTENSIONS:
            value = getattr(self, attr)
            if value is not None:
                out[ext] = value
        if self.headers:
            out["headers"] = self.headers
        if self.data is not None:
            out["data"] = self.data
        return out

    def to_json(self, *, max_bytes: int | None = None) -> bytes:
        """Serialise to structured-mode CloudEvents JSON bytes.

        Args:
            max_bytes: Refuse events whose ``data`` serialises to more than this.

        Raises:
            EventSerializationError: ``data`` or ``headers`` are not JSON-serialisable.
            EventTooLargeError: The data is larger than ``max_bytes``.
        """
        envelope = self._envelope()
        if self.data is not None:
            # The data's JSON is reused when the bus already produced it.
            envelope["data"] = orjson.Fragment(self.data_json(max_bytes=max_bytes))
        return dumps(envelope)

    @classmethod
    def from_cloudevent(cls, obj: Mapping[str, Any], *, attempt: int = 1) -> Event:
        """Build an event from a structured-mode CloudEvents JSON object.

        Raises:
            EventDecodeError: Required attributes are missing or of the wrong type, or the
                specversion is not 1.0.
        """
        if obj.get("specversion") != SPECVERSION:
            raise EventDecodeError(
                f"unsupported CloudEvents specversion {obj.get('specversion')!r}"
            )
        headers = obj.get("headers") or {}
        if not isinstance(headers, dict):
            raise EventDecodeError(f"headers must be an object, got {type(headers).__name__}")
        # Built field by field (no __init__): this runs for every event a consumer reads.
        new = object.__new__(cls)
        try:
            new.type = validate_topic(obj["type"])
            new.id = _required_str(obj, "id")
            new.source = _required_str(obj, "source")
            time_text = obj.get("time")
            new._dt = _parse_time(time_text) if time_text else None
            new._ts = 0.0 if time_text else _time.time()
            new.datacontenttype = _optional_str(obj, "datacontenttype") or "application/json"
            new.subject = _optional_str(obj, "subject")
            new.key = _optional_str(obj, "key")
            new.tenant_id = _optional_str(obj, "tenantid")
            new.correlation_id = _optional_str(obj, "correlationid")
            new.causation_id = _optional_str(obj, "causationid")
            new.traceparent = _optional_str(obj, "traceparent")
        except (KeyError, ValueError, EventError) as exc:
            if isinstance(exc, EventDecodeError):
                raise
            raise EventDecodeError(f"not a valid event: {type(exc).__name__}: {exc}") from exc
        new._data = obj.get("data")
        new._data_json = None
        new.headers = headers
        new.attempt = attempt
        return new

    @classmethod
    def from_json(cls, raw: bytes | str, *, attempt: int = 1) -> Event:
        """Parse structured-mode CloudEvents JSON.

        Raises:
            EventDecodeError: Not JSON, not an object, or not a valid event.
        """
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EventDecodeError(f"event is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise EventDecodeError(f"event JSON must be an object, got {type(obj).__name__}")
        return cls.from_cloudevent(obj, attempt=attempt)


def _required_str(obj: Mapping[str, Any], name: str) -> str:
    value = obj[name]
    if not isinstance(value, str) or not value:
        raise EventDecodeError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _optional_str(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise EventDecodeError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _parse_time(text: Any) -> datetime:
    if isinstance(text, datetime) and text.tzinfo is not None:
        return text
    if not isinstance(text, str):
        raise EventDecodeError(f"time must be an RFC 3339 string, got {text!r}")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise EventDecodeError(f"time must carry a UTC offset, got {text!r}")
    return parsed
