"""Topic names and subscription patterns.

A topic is dot-separated segments of letters, digits, ``_`` and ``-`` (``orders.created``). A
pattern may use ``*`` for exactly one segment and ``#`` for the rest (zero or more segments,
last only).
"""

from __future__ import annotations

import re
from functools import lru_cache

from dotmac.communications.errors import InvalidPatternError, InvalidTopicError

__all__ = ["compile_pattern", "validate_topic"]

MAX_TOPIC_LENGTH = 200
_SEGMENT = re.compile(r"[A-Za-z0-9_\-]+\Z")


@lru_cache(maxsize=4096)
def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name.

    Raises:
        InvalidTopicError: Empty, too long, wrong type, or a segment with other characters
            (wildcards included: you publish to a topic, not to a pattern).
    """
    if not isinstance(topic, str) or not topic:
        raise InvalidTopicError(f"topic must be a non-empty string, got {topic!r}")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidTopicError(
            f"topic is longer than {MAX_TOPIC_LENGTH} characters: {topic[:40]!r}…"
        )
    for segment in topic.split("."):
        if not _SEGMENT.match(segment):
            raise InvalidTopicError(
                f"invalid topic {topic!r}: segment {segment!r} must be letters, digits, '_' or '-' "
                "(segments are separated by single dots; wildcards are for subscriptions)"
            )
    return topic


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a subscription pattern to a regular expression matching whole topics.

    Raises:
        InvalidPatternError: Empty, ``#`` not last, a wildcard mixed into a segment
            (``ord*``), or an invalid literal segment.
    """
    if not isinstance(pattern, str) or not pattern:
        raise InvalidPatternError(f"pattern must be a non-empty string, got {pattern!r}")
    segments = pattern.split(".")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        if segment == "#":
            if index != len(segments) - 1:
                raise InvalidPatternError(
                    f"invalid pattern {pattern!r}: '#' must be the last segment"
                )
            # '#' matches zero or more further segments: 'orders.#' matches 'orders' too.
            parts.append(r"(?:\.[^.]+)*" if index else r"[^.]+(?:\.[^.]+)*")
            continue
        if segment == "*":
            parts.append((r"\." if index else "") + r"[^.]+")
            continue
        if not _SEGMENT.match(segment):
            raise InvalidPatternError(
                f"invalid pattern {pattern!r}: segment {segment!r} must be a name, '*' or '#'"
            )
        parts.append((r"\." if index else "") + re.escape(segment))
    return re.compile("".join(parts) + r"\Z")
