"""Event codec, topics and patterns: pure, synchronous behaviour."""

from __future__ import annotations

import contextlib
import math
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from dotmac.communications.errors import (
    EventDecodeError,
    EventSerializationError,
    EventTooLargeError,
    InvalidPatternError,
    InvalidTopicError,
)
from dotmac.communications.events import Event, compile_pattern, validate_topic

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)  # fmt: skip
segment = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
topics = st.lists(segment, min_size=1, max_size=4).map(".".join)


@given(
    topic=topics,
    data=json_values,
    key=st.none() | st.text(max_size=10),
    headers=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_json_round_trip_is_exact(
    topic: str, data: object, key: str | None, headers: dict[str, str]
) -> None:
    """from_json(to_json(e)) == e for any JSON data, key and headers."""
    event = Event(topic, data, key=key, headers=headers, tenant_id="t1", subject="s",
                  correlation_id="c", causation_id="x", traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")  # fmt: skip
    assert Event.from_json(event.to_json()) == event


def test_cloudevent_structured_mode() -> None:
    """to_cloudevent gives the CloudEvents 1.0 attributes and extension names."""
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    event = Event("orders.created", {"id": 1}, id="e1", source="/shop", time=when,
                  key="k", tenant_id="t", correlation_id="c", causation_id="p")  # fmt: skip
    doc = orjson.loads(event.to_json())
    assert doc == {
        "specversion": "1.0", "id": "e1", "source": "/shop", "type": "orders.created",
        "time": "2026-01-02T03:04:05.678901Z", "datacontenttype": "application/json",
        "key": "k", "tenantid": "t", "correlationid": "c", "causationid": "p", "data": {"id": 1},
    }  # fmt: skip
    assert Event.from_cloudevent(doc) == event
    structured = event.to_cloudevent()
    assert structured["time"] == "2026-01-02T03:04:05.678901Z"
    assert Event.from_cloudevent(structured) == event


def test_time_keeps_its_offset() -> None:
    """A non-UTC time survives the round trip with its offset."""
    when = datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    back = Event.from_json(Event("a", time=when).to_json())
    assert back.time == when
    assert back.time.utcoffset() == timedelta(hours=2)


def test_ids_are_unique() -> None:
    """Generated ids do not repeat."""
    assert len({Event("a").id for _ in range(10_000)}) == 10_000


class Order(BaseModel):
    id: int
    total: float


def test_pydantic_model_data_serialises() -> None:
    """A pydantic model as data becomes its JSON form."""
    assert orjson.loads(Event("a", Order(id=1, total=2.5)).to_json())["data"] == {
        "id": 1,
        "total": 2.5,
    }


@pytest.mark.parametrize("data", [object(), {1: "int key"}, {"x": {1, 2}}, 2**70, math.nan])
def test_unserialisable_data_is_refused(data: object) -> None:
    """Data JSON cannot hold raises EventSerializationError (also a ValueError)."""
    if isinstance(data, float):  # orjson writes NaN as null; that is allowed, not an error
        assert orjson.loads(Event("a", data).to_json())["data"] is None
        return
    with pytest.raises(EventSerializationError, match="not JSON-serialisable") as info:
        Event("a", data).to_json()
    assert isinstance(info.value, ValueError)


def test_size_limit_applies_to_data() -> None:
    """data_json(max_bytes=...) refuses larger payloads, naming the limit setting."""
    event = Event("a", "x" * 100)
    assert len(event.data_json(max_bytes=102)) == 102
    with pytest.raises(EventTooLargeError, match="max_event_bytes"):
        event.data_json(max_bytes=101)


def test_record_copies_are_independent() -> None:
    """An event rebuilt from its record shares nothing mutable with the published one."""
    event = Event("a", {"items": [1, 2]}, headers={"h": "1"})
    copy = Event.from_record(event.to_record(), 3)
    assert copy == Event.from_record(event.to_record(), 3)
    copy.data["items"].append(3)
    copy.headers["h"] = "2"
    assert event.data == {"items": [1, 2]}
    assert event.headers == {"h": "1"}
    assert copy.attempt == 3


def test_replacing_data_drops_the_cached_json() -> None:
    """Assigning data invalidates the serialised form."""
    event = Event("a", {"v": 1})
    event.data_json()
    event.data = {"v": 2}
    assert orjson.loads(event.to_json())["data"] == {"v": 2}


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1,2]", b'{"specversion":"0.3","id":"1","source":"/","type":"a"}',
     b'{"specversion":"1.0","source":"/","type":"a"}', b'{"specversion":"1.0","id":"1","source":"/","type":"bad topic"}',
     b'{"specversion":"1.0","id":"1","source":"/","type":"a","time":"yesterday"}',
     b'{"specversion":"1.0","id":"1","source":"/","type":"a","time":"2026-01-01T00:00:00"}',
     b'{"specversion":"1.0","id":"1","source":"/","type":"a","headers":[1]}'],
)  # fmt: skip
def test_malformed_entries_raise_decode_errors(raw: bytes) -> None:
    """Whatever else wrote into a stream, decoding fails with EventDecodeError, never a crash."""
    with pytest.raises(EventDecodeError):
        Event.from_json(raw)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash_the_decoder(raw: bytes) -> None:
    """Random bytes decode or raise EventDecodeError."""
    with contextlib.suppress(EventDecodeError):
        Event.from_json(raw)


@pytest.mark.parametrize(
    "topic", ["", ".", "a..b", "a.", ".a", "a b", "a.*", "a.#", "é", "a" * 201]
)
def test_bad_topics(topic: str) -> None:
    """Empty, malformed, wildcard or over-long topics raise InvalidTopicError (a ValueError)."""
    with pytest.raises(InvalidTopicError) as info:
        validate_topic(topic)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("orders.*", "orders.created", True),
        ("orders.*", "orders", False),
        ("orders.*", "orders.a.b", False),
        ("orders.#", "orders", True),
        ("orders.#", "orders.a.b", True),
        ("#", "anything.at.all", True),
        ("*.created", "orders.created", True),
        ("*.created", "orders.paid", False),
        ("a.*.c", "a.b.c", True),
        ("a.b", "a.b", True),
        ("a.b", "a.bc", False),
    ],
)
def test_pattern_matching(pattern: str, topic: str, matches: bool) -> None:
    """'*' matches exactly one segment, '#' zero or more trailing ones."""
    assert bool(compile_pattern(pattern).match(topic)) is matches


@pytest.mark.parametrize("pattern", ["", "a.#.b", "or*ders", "a..b", "#.a", "a.b#"])
def test_bad_patterns(pattern: str) -> None:
    """Malformed wildcards raise InvalidPatternError."""
    with pytest.raises(InvalidPatternError):
        compile_pattern(pattern)


@given(st.lists(segment, min_size=1, max_size=5))
def test_hash_matches_every_extension(segments: list[str]) -> None:
    """'first.#' matches every topic starting with that segment."""
    assert compile_pattern(f"{segments[0]}.#").match(".".join(segments))
