"""Metrics on the OpenTelemetry API, mirrored into an in-process snapshot.

Instruments are created on first use from the global meter provider (a host that configures its
own provider, or :func:`~dotmac.communications.observability.configure_telemetry`, receives every
measurement). Each measurement is also folded into an in-process aggregate that tests, ``/metrics``
and health read with :func:`snapshot` and :func:`value`, whatever provider is installed.

Names follow the OpenTelemetry messaging semantic conventions
(``messaging.client.operation.duration``, ``messaging.client.sent.messages``,
``messaging.client.consumed.messages``, ``messaging.process.duration``);
the library's own live under ``dotmac.*``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import metrics as otel_metrics

__all__ = [
    "Counter",
    "Histogram",
    "HistogramStats",
    "UpDownCounter",
    "counter",
    "histogram",
    "reset",
    "set_enabled",
    "snapshot",
    "up_down_counter",
    "value",
]

METER_NAME = "dotmac.communications"

Attributes = Mapping[str, str | int | float | bool]
_AttrKey = tuple[tuple[str, str | int | float | bool], ...]
_Kind = Literal["counter", "up_down_counter", "histogram"]

_lock = threading.Lock()
_enabled = True
_instruments: dict[str, _Instrument] = {}


@dataclass(frozen=True, slots=True)
class HistogramStats:
    """Aggregate of a histogram's recordings for one attribute set."""

    count: int
    sum: float
    min: float
    max: float


class _Instrument:
    __slots__ = ("_otel", "_values", "description", "kind", "name", "unit")

    def __init__(self, kind: _Kind, name: str, unit: str, description: str) -> None:
        self.kind = kind
        self.name = name
        self.unit = unit
        self.description = description
        self._otel: Any = None
        self._values: dict[_AttrKey, Any] = {}

    def _otel_instrument(self) -> Any:
        # Created lazily: nothing touches the meter provider at import time, and the API's proxy
        # meter forwards to a provider configured later.
        if self._otel is None:
            meter = otel_metrics.get_meter(METER_NAME)
            create = {
                "counter": meter.create_counter,
                "up_down_counter": meter.create_up_down_counter,
                "histogram": meter.create_histogram,
            }[self.kind]
            self._otel = create(self.name, unit=self.unit, description=self.description)
        return self._otel

    @staticmethod
    def _key(attributes: Attributes | None) -> _AttrKey:
        return tuple(sorted(attributes.items())) if attributes else ()


class Counter(_Instrument):
    """A monotonic counter."""

    __slots__ = ()

    def add(self, amount: float = 1, attributes: Attributes | None = None) -> None:
        """Add ``amount`` (>= 0) for ``attributes``.

        Raises:
            ValueError: ``amount`` is negative or not finite.
        """
        if not _enabled:
            return
        if amount < 0 or not math.isfinite(amount):
            raise ValueError(f"counter {self.name!r}: amount must be finite and >= 0, got {amount}")
        self._otel_instrument().add(amount, attributes)
        key = self._key(attributes)
        with _lock:
            self._values[key] = self._values.get(key, 0) + amount


class UpDownCounter(_Instrument):
    """A counter that may go down (connections open, items in flight)."""

    __slots__ = ()

    def add(self, amount: float, attributes: Attributes | None = None) -> None:
        """Add ``amount`` (may be negative) for ``attributes``."""
        if not _enabled:
            return
        self._otel_instrument().add(amount, attributes)
        key = self._key(attributes)
        with _lock:
            self._values[key] = self._values.get(key, 0) + amount


class Histogram(_Instrument):
    """A distribution of values (durations in seconds, sizes in bytes)."""

    __slots__ = ()

    def record(self, value: float, attributes: Attributes | None = None) -> None:
        """Record ``value`` for ``attributes``."""
        if not _enabled:
            return
        self._otel_instrument().record(value, attributes)
        key = self._key(attributes)
        with _lock:
            old: HistogramStats | None = self._values.get(key)
            self._values[key] = (
                HistogramStats(1, value, value, value)
                if old is None
                else HistogramStats(
                    old.count + 1, old.sum + value, min(old.min, value), max(old.max, value)
                )
            )


def _get(kind: _Kind, cls: type[_Instrument], name: str, unit: str, description: str) -> Any:
    with _lock:
        inst = _instruments.get(name)
        if inst is None:
            inst = cls(kind, name, unit, description)
            _instruments[name] = inst
    if inst.kind != kind:
        raise ValueError(f"metric {name!r} is already registered as a {inst.kind}, not a {kind}")
    return inst


def counter(name: str, *, unit: str = "1", description: str = "") -> Counter:
    """Return the counter called ``name``, creating it on first use.

    Raises:
        ValueError: ``name`` is already registered as another kind of instrument.
    """
    result: Counter = _get("counter", Counter, name, unit, description)
    return result


def up_down_counter(name: str, *, unit: str = "1", description: str = "") -> UpDownCounter:
    """Return the up-down counter called ``name``, creating it on first use."""
    result: UpDownCounter = _get("up_down_counter", UpDownCounter, name, unit, description)
    return result


def histogram(name: str, *, unit: str = "s", description: str = "") -> Histogram:
    """Return the histogram called ``name``, creating it on first use."""
    result: Histogram = _get("histogram", Histogram, name, unit, description)
    return result


def snapshot() -> dict[str, list[tuple[dict[str, Any], float | HistogramStats]]]:
    """Return every recorded value: metric name → list of (attributes, value or stats)."""
    with _lock:
        return {
            name: [(dict(key), val) for key, val in inst._values.items()]
            for name, inst in _instruments.items()
            if inst._values
        }


def value(name: str, attributes: Attributes | None = None) -> float:
    """Sum of a counter (or a histogram's count) over attribute sets that contain ``attributes``.

    Args:
        name: Metric name.
        attributes: A subset of attributes to match; ``None`` matches every set.

    Returns:
        The total; ``0`` when nothing matching was recorded.
    """
    wanted = set((attributes or {}).items())
    total = 0.0
    for attrs, val in snapshot().get(name, []):
        if wanted <= set(attrs.items()):
            total += val.count if isinstance(val, HistogramStats) else val
    return total


def set_enabled(enabled: bool) -> None:
    """Switch recording on or off (``observability.metrics_enabled``)."""
    global _enabled  # noqa: PLW0603 -- one process-wide switch, like the OTel global provider
    _enabled = enabled


def reset() -> None:
    """Forget every in-process value (tests); OTel instruments are kept."""
    with _lock:
        for inst in _instruments.values():
            inst._values.clear()
