"""Prometheus text exposition (format 0.0.4), written by hand: families, series, a registry.

Most of genworker's numbers are read from elsewhere (the workers' shared-memory
counters, the database) rather than counted in this process, so every metric can be
*set* from outside: `Counter.set_total`, `Gauge.set`/`Gauge.replace`,
`Histogram.set_counts`. That is the part prometheus_client makes awkward (it wants a
custom collector for it), and the format itself is a page of code, so no dependency.

Not thread-safe: one owner (the supervisor's event loop) updates and renders.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Number = int | float
LabelValues = tuple[str, ...]


def format_value(value: Number) -> str:
    """A sample value as Prometheus writes it: ints exact, +Inf/-Inf/NaN spelled out."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


# ------------------------------------------------------------------- children


class CounterValue:
    """One counter series. `inc` counts here; `set_total` takes a total counted elsewhere."""

    def __init__(self) -> None:
        self.value: Number = 0

    def inc(self, amount: Number = 1) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; got inc({amount})")
        self.value += amount

    def set_total(self, total: Number) -> None:
        """The total as read from its source. A lower total reads as a counter reset
        (the source restarted), which Prometheus' rate() handles."""
        if total < 0 or math.isnan(total):
            raise ValueError(f"a counter total must be >= 0; got {total}")
        self.value = total


class GaugeValue:
    def __init__(self) -> None:
        self.value: Number = 0

    def set(self, value: Number) -> None:
        self.value = value

    def inc(self, amount: Number = 1) -> None:
        self.value += amount

    def dec(self, amount: Number = 1) -> None:
        self.value -= amount


class HistogramValue:
    """One histogram series: per-bucket counts (the last is the +Inf overflow) and a sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bucket_index(self.bounds, value)] += 1
        self.sum += value

    def set_counts(self, counts: Sequence[int], total: float) -> None:
        """Counts per bucket as kept elsewhere (not cumulative; one more than the
        bounds, for +Inf), and the sum of the observed values."""
        if len(counts) != len(self.bounds) + 1:
            raise ValueError(f"expected {len(self.bounds) + 1} bucket counts, got {len(counts)}")
        if any(c < 0 for c in counts):
            raise ValueError("bucket counts must be >= 0")
        self.counts = list(counts)
        self.sum = total

    @property
    def count(self) -> int:
        return sum(self.counts)


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """Which bucket `value` falls in (le semantics); len(bounds) means +Inf only.

    Public so a writer of shared-memory bucket counters uses the same rule."""
    return bisect.bisect_left(bounds, value)


# ------------------------------------------------------------------- families

C = TypeVar("C", CounterValue, GaugeValue, HistogramValue)


class _Family(Generic[C]):
    kind: ClassVar[str]

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"bad label name {label!r} in {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names in {name}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[LabelValues, C] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()  # an unlabelled series shows 0 from the start

    def _new_child(self) -> C:
        raise NotImplementedError

    def labels(self, *values: object, **by_name: object) -> C:
        """The series for these label values (created on first use)."""
        if by_name:
            if values:
                raise TypeError("pass label values by position or by name, not both")
            if set(by_name) != set(self.labelnames):
                raise ValueError(
                    f"{self.name} takes labels {self.labelnames}, got {tuple(by_name)}"
                )
            values = tuple(by_name[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def remove(self, *values: object) -> None:
        self._children.pop(tuple(str(v) for v in values), None)

    def clear(self) -> None:
        """Forget every labelled series (for sets read afresh, e.g. from the database)."""
        if self.labelnames:
            self._children.clear()

    def _only(self) -> C:
        if self.labelnames:
            raise TypeError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self._children[()]

    def series(self) -> Iterator[tuple[LabelValues, C]]:
        yield from sorted(self._children.items())

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"
        for values, child in self.series():
            yield from self._sample_lines(values, child)

    def _sample_lines(self, values: LabelValues, child: C) -> Iterator[str]:
        raise NotImplementedError


S = TypeVar("S", CounterValue, GaugeValue)


class _ScalarFamily(_Family[S]):
    def _sample_lines(self, values: LabelValues, child: S) -> Iterator[str]:
        yield f"{self.name}{_labels_text(self.labelnames, values)} {format_value(child.value)}"


class Counter(_ScalarFamily[CounterValue]):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total: {name!r}")
        super().__init__(name, help, labelnames)

    def _new_child(self) -> CounterValue:
        return CounterValue()

    def inc(self, amount: Number = 1) -> None:
        self._only().inc(amount)

    def set_total(self, total: Number) -> None:
        self._only().set_total(total)

    @property
    def value(self) -> Number:
        return self._only().value


class Gauge(_ScalarFamily[GaugeValue]):
    kind = "gauge"

    def _new_child(self) -> GaugeValue:
        return GaugeValue()

    def set(self, value: Number) -> None:
        self._only().set(value)

    def inc(self, amount: Number = 1) -> None:
        self._only().inc(amount)

    def dec(self, amount: Number = 1) -> None:
        self._only().dec(amount)

    @property
    def value(self) -> Number:
        return self._only().value

    def replace(self, values: Mapping[tuple[object, ...], Number]) -> None:
        """Make these the only series, e.g. the rows of a GROUP BY: series missing from
        `values` disappear instead of showing a stale number."""
        self.clear()
        for key, value in values.items():
            self.labels(*key).set(value)


class Histogram(_Family[HistogramValue]):
    kind = "histogram"
    _RESERVED_SUFFIXES = ("_total", "_bucket", "_sum", "_count")

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        if name.endswith(self._RESERVED_SUFFIXES):
            raise ValueError(f"a histogram's name must not end in {name.rsplit('_', 1)[1]}")
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing and not empty")
        self.bounds = bounds
        super().__init__(name, help, labelnames)

    def _new_child(self) -> HistogramValue:
        return HistogramValue(self.bounds)

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def set_counts(self, counts: Sequence[int], total: float) -> None:
        self._only().set_counts(counts, total)

    def _sample_lines(self, values: LabelValues, child: HistogramValue) -> Iterator[str]:
        names = (*self.labelnames, "le")
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), child.counts, strict=True):
            cumulative += count
            le = _labels_text(names, (*values, format_value(bound)))
            yield f"{self.name}_bucket{le} {cumulative}"
        labels = _labels_text(self.labelnames, values)
        yield f"{self.name}_sum{labels} {format_value(child.sum)}"
        yield f"{self.name}_count{labels} {cumulative}"


class Registry:
    """Metric families in the order they were added; `render` is the /metrics body."""

    def __init__(self) -> None:
        self._families: dict[str, _Family[Any]] = {}

    def add(self, family: _Family[C]) -> _Family[C]:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is already registered")
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        family = Counter(name, help, labelnames)
        self.add(family)
        return family

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        family = Gauge(name, help, labelnames)
        self.add(family)
        return family

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> Histogram:
        family = Histogram(name, help, labelnames, buckets=buckets)
        self.add(family)
        return family

    def names(self) -> list[str]:
        return list(self._families)

    def render(self) -> str:
        lines = [line for family in self._families.values() for line in family.render()]
        return "\n".join(lines) + "\n" if lines else ""
