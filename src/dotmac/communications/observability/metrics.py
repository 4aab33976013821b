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
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import metrics as otel_metrics

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "BoundCounter",
    "BoundHistogram",
    "Counter",
    "Histogram",
    "HistogramStats",
    "UpDownCounter",
    "counter",
    "histogram",
    "render_prometheus",
    "reset",
    "set_enabled",
    "snapshot",
    "up_down_counter",
    "use_meter_provider",
    "value",
]

METER_NAME = "dotmac.communications"

Attributes = Mapping[str, str | int | float | bool]
_AttrKey = tuple[tuple[str, str | int | float | bool], ...]
_Kind = Literal["counter", "up_down_counter", "histogram"]

_lock = threading.Lock()
_generation = 0
"""Bumped when cells or OTel instruments are replaced; bound instruments then re-resolve."""
_enabled = True


def _proxy_classes() -> frozenset[type]:
    # The OTel API's proxy instruments (what a meter gives before a provider is set, and keeps
    # giving after) only forward to ``_real_instrument`` when there is one. Bound instruments
    # go to it directly: no call at all while no provider is set, one frame less after.
    try:
        from opentelemetry.metrics._internal import instrument  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a future API layout: always call the proxy
        return frozenset()
    names = ("_ProxyCounter", "_ProxyUpDownCounter", "_ProxyHistogram")
    classes = [getattr(instrument, name, None) for name in names]
    if not all(isinstance(cls, type) for cls in classes):  # pragma: no cover - ditto
        return frozenset()
    return frozenset(classes)  # type: ignore[arg-type]


_PROXIES: frozenset[Any] = _proxy_classes()
_instruments: dict[str, _Instrument] = {}
# Library-local provider (``configure_telemetry(..., set_global=False)``); None: the global one.
_meter_provider: otel_metrics.MeterProvider | None = None

# Bucket boundaries advised for histograms in seconds (the OTel semantic conventions' values).
_SECONDS_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10
)  # fmt: skip


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
        # Histograms keep a mutable [count, sum, min, max] per attribute set: no allocation on
        # the hot path; snapshot() turns it into HistogramStats.
        self._values: dict[_AttrKey, Any] = {}

    def _otel_instrument(self) -> Any:
        # Created lazily: nothing touches the meter provider at import time, and the API's proxy
        # meter forwards to a provider configured later.
        otel = self._otel
        if otel is None:
            meter = otel_metrics.get_meter(METER_NAME, meter_provider=_meter_provider)
            if self.kind == "histogram":
                # The SDK's default buckets are sized for milliseconds; durations in seconds get
                # the buckets the OTel semantic conventions advise for them.
                otel = meter.create_histogram(
                    self.name,
                    unit=self.unit,
                    description=self.description,
                    explicit_bucket_boundaries_advisory=(
                        _SECONDS_BUCKETS if self.unit == "s" else None
                    ),
                )
            elif self.kind == "counter":
                otel = meter.create_counter(self.name, unit=self.unit, description=self.description)
            else:
                otel = meter.create_up_down_counter(
                    self.name, unit=self.unit, description=self.description
                )
            self._otel = otel
        return otel

    @staticmethod
    def _key(attributes: Attributes | None) -> _AttrKey:
        return tuple(sorted(attributes.items())) if attributes else ()

    def _cell(self, key: _AttrKey) -> Any:
        # A counter's running total is a _Cell, a histogram's a [count, sum, min, max] list:
        # mutable, so bound instruments update them without a dict lookup.
        cell = self._values.get(key)
        if cell is None:
            cell = self._values[key] = (
                [0, 0.0, math.inf, -math.inf] if self.kind == "histogram" else _Cell()
            )
        return cell

    def _add(self, amount: float, attributes: Attributes | None, key: _AttrKey) -> None:
        self._otel_instrument().add(amount, attributes)
        with _lock:
            self._cell(key).value += amount

    def _record(self, value: float, attributes: Attributes | None, key: _AttrKey) -> None:
        self._otel_instrument().record(value, attributes)
        with _lock:
            _fold(self._cell(key), value)


class _Cell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0


def _fold(stats: list[Any], value: float) -> None:
    stats[0] += 1
    stats[1] += value
    # Comparisons, not min()/max() calls: this runs once per message on hot paths.
    if value < stats[2]:  # noqa: PLR1730
        stats[2] = value
    if value > stats[3]:  # noqa: PLR1730
        stats[3] = value


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
        self._add(amount, attributes, self._key(attributes))

    def bind(self, attributes: Attributes | None = None) -> BoundCounter:
        """Return this counter with ``attributes`` fixed, for hot paths (no per-call keying).

        .. versionadded:: 0.1
        """
        return BoundCounter(self, attributes)


class UpDownCounter(_Instrument):
    """A counter that may go down (connections open, items in flight)."""

    __slots__ = ()

    def add(self, amount: float, attributes: Attributes | None = None) -> None:
        """Add ``amount`` (may be negative) for ``attributes``."""
        if not _enabled:
            return
        self._add(amount, attributes, self._key(attributes))

    def bind(self, attributes: Attributes | None = None) -> BoundCounter:
        """Return this counter with ``attributes`` fixed, for hot paths."""
        return BoundCounter(self, attributes, monotonic=False)


class Histogram(_Instrument):
    """A distribution of values (durations in seconds, sizes in bytes)."""

    __slots__ = ()

    def record(self, value: float, attributes: Attributes | None = None) -> None:
        """Record ``value`` for ``attributes``."""
        if not _enabled:
            return
        self._record(value, attributes, self._key(attributes))

    def bind(self, attributes: Attributes | None = None) -> BoundHistogram:
        """Return this histogram with ``attributes`` fixed, for hot paths."""
        return BoundHistogram(self, attributes)


class BoundCounter:
    """A counter (or up-down counter) with its attributes fixed; see :meth:`Counter.bind`.

    It keeps direct references to the OTel instrument and its own running total, refreshed
    when :func:`reset` or :func:`use_meter_provider` changes them: an ``add`` costs a lock and
    an addition, not a key lookup.
    """

    __slots__ = ("_attributes", "_cell", "_generation", "_instrument", "_key", "_monotonic",
                 "_otel")  # fmt: skip

    def __init__(
        self, instrument: _Instrument, attributes: Attributes | None, *, monotonic: bool = True
    ) -> None:
        self._instrument = instrument
        self._attributes = dict(attributes) if attributes else None
        self._key = _Instrument._key(attributes)
        self._monotonic = monotonic
        self._generation = -1
        self._otel: Any = None
        self._cell: Any = None

    def add(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0 for a counter)."""
        if not _enabled:
            return
        if self._monotonic and not 0 <= amount < math.inf:
            raise ValueError(
                f"counter {self._instrument.name!r}: amount must be finite and >= 0, got {amount}"
            )
        with _lock:  # the generation check and the write together: reset() may run between
            if self._generation != _generation:
                _resolve(self)
            otel = self._otel
            self._cell.value += amount
        if otel.__class__ in _PROXIES:
            otel = otel._real_instrument  # None until a meter provider is set
            if otel is None:
                return
        otel.add(amount, self._attributes)


class BoundHistogram:
    """A histogram with its attributes fixed; see :meth:`Histogram.bind`."""

    __slots__ = ("_attributes", "_cell", "_generation", "_instrument", "_key", "_otel")

    def __init__(self, instrument: _Instrument, attributes: Attributes | None) -> None:
        self._instrument = instrument
        self._attributes = dict(attributes) if attributes else None
        self._key = _Instrument._key(attributes)
        self._generation = -1
        self._otel: Any = None
        self._cell: Any = None

    def record(self, value: float) -> None:
        """Record ``value``."""
        if not _enabled:
            return
        with _lock:
            if self._generation != _generation:
                _resolve(self)
            otel = self._otel
            # _fold(), written out: this runs once per message on hot paths.
            stats = self._cell
            stats[0] += 1
            stats[1] += value
            if value < stats[2]:  # noqa: PLR1730
                stats[2] = value
            if value > stats[3]:  # noqa: PLR1730
                stats[3] = value
        if otel.__class__ in _PROXIES:
            otel = otel._real_instrument  # None until a meter provider is set
            if otel is None:
                return
        otel.record(value, self._attributes)


def _resolve(bound: BoundCounter | BoundHistogram) -> None:
    # Called with _lock held, so a concurrent reset() or use_meter_provider() cannot leave the
    # bound instrument on a stale cell or OTel instrument.
    instrument = bound._instrument
    bound._otel = instrument._otel_instrument()
    bound._cell = instrument._cell(bound._key)
    bound._generation = _generation


def _public(value: Any) -> float | HistogramStats:
    # Aggregates are mutable internally; callers get a frozen copy.
    if isinstance(value, list):
        return HistogramStats(value[0], value[1], value[2], value[3])
    total: float = value.value
    return total


def _get(kind: _Kind, cls: type[_Instrument], name: str, unit: str, description: str) -> Any:
    with _lock:
        inst = _instruments.get(name)
        if inst is None:
            inst = cls(kind, name, unit, description)
            _instruments[name] = inst
    if inst.kind != kind:
        raise ValueError(f"metric {name!r} is already registered as a {inst.kind}, not a {kind}")
    if inst.unit != unit:
        # One name, one unit: the OTel SDK and Prometheus would otherwise mix seconds and ms.
        raise ValueError(
            f"metric {name!r} is already registered with unit {inst.unit!r}, not {unit!r}"
        )
    return inst


def counter(name: str, *, unit: str = "1", description: str = "") -> Counter:
    """Return the counter called ``name``, creating it on first use.

    Raises:
        ValueError: ``name`` is already registered as another kind of instrument or with
            another unit.
    """
    result: Counter = _get("counter", Counter, name, unit, description)
    return result


def up_down_counter(name: str, *, unit: str = "1", description: str = "") -> UpDownCounter:
    """Return the up-down counter called ``name``, creating it on first use.

    Raises:
        ValueError: ``name`` is already registered as another kind of instrument or with
            another unit.
    """
    result: UpDownCounter = _get("up_down_counter", UpDownCounter, name, unit, description)
    return result


def histogram(name: str, *, unit: str = "s", description: str = "") -> Histogram:
    """Return the histogram called ``name``, creating it on first use.

    With ``unit="s"`` the OTel histogram advises the semantic conventions' bucket boundaries for
    seconds (5 ms to 10 s) instead of the SDK's millisecond-sized defaults; a view configured by
    the host still takes precedence.

    Raises:
        ValueError: ``name`` is already registered as another kind of instrument or with
            another unit.
    """
    result: Histogram = _get("histogram", Histogram, name, unit, description)
    return result


def snapshot() -> dict[str, list[tuple[dict[str, Any], float | HistogramStats]]]:
    """Return every recorded value: metric name → list of (attributes, value or stats)."""
    with _lock:
        return {
            name: [(dict(key), _public(val)) for key, val in inst._values.items()]
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
    global _generation  # noqa: PLW0603 -- bound instruments re-resolve their cells
    with _lock:
        for inst in _instruments.values():
            inst._values.clear()
        _generation += 1


def use_meter_provider(provider: otel_metrics.MeterProvider | None) -> None:
    """Send this library's measurements to ``provider`` instead of the global meter provider.

    Used by :func:`~dotmac.communications.observability.configure_telemetry` with
    ``set_global=False`` and by tests; the OTel global provider can be set only once per process.

    Args:
        provider: The provider to use; ``None`` returns to the global one.
    """
    global _meter_provider, _generation  # noqa: PLW0603 -- one process-wide binding
    with _lock:
        _meter_provider = provider
        for inst in _instruments.values():
            inst._otel = None
        _generation += 1


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Content type of :func:`render_prometheus` output (Prometheus text exposition format)."""

_PROM_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


def _prom_name(name: str, unit: str) -> str:
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    suffix = _PROM_UNITS.get(unit)
    if suffix and not base.endswith(f"_{suffix}"):
        base = f"{base}_{suffix}"
    return base


def _prom_labels(attrs: Mapping[str, Any]) -> str:
    parts = []
    for key, val in sorted(attrs.items()):
        label = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        text = str(val).lower() if isinstance(val, bool) else str(val)
        text = text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{label}="{text}"')
    return "{" + ",".join(parts) + "}" if parts else ""


def _prom_number(number: float) -> str:
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(float(number))


def render_prometheus() -> str:
    """Render the in-process snapshot in the Prometheus text exposition format.

    Names follow the OpenTelemetry-to-Prometheus mapping: dots become underscores, a unit
    suffix is added (``_seconds``), counters end in ``_total``. Histograms are exposed as
    summaries without quantiles (``_count`` and ``_sum``), since the snapshot keeps no buckets.

    Returns:
        The exposition text (serve it with :data:`PROMETHEUS_CONTENT_TYPE`).
    """
    with _lock:
        items = [
            (
                inst.kind,
                inst.name,
                inst.unit,
                inst.description,
                [(key, _public(val)) for key, val in inst._values.items()],
            )
            for inst in sorted(_instruments.values(), key=lambda i: i.name)
            if inst._values
        ]
    lines: list[str] = []
    for kind, name, unit, description, values in items:
        base = _prom_name(name, unit)
        if kind == "counter" and not base.endswith("_total"):
            base = f"{base}_total"
        prom_type = {"counter": "counter", "up_down_counter": "gauge", "histogram": "summary"}[kind]
        if description:
            # The exposition format escapes backslash and line feed in HELP text.
            help_text = description.replace("\\", "\\\\").replace("\n", "\\n")
            lines.append(f"# HELP {base} {help_text}")
        lines.append(f"# TYPE {base} {prom_type}")
        for key, val in values:
            attrs = dict(key)
            if isinstance(val, HistogramStats):
                lines.append(f"{base}_count{_prom_labels(attrs)} {val.count}")
                lines.append(f"{base}_sum{_prom_labels(attrs)} {_prom_number(val.sum)}")
            else:
                lines.append(f"{base}{_prom_labels(attrs)} {_prom_number(val)}")
    return "\n".join(lines) + "\n" if lines else ""
