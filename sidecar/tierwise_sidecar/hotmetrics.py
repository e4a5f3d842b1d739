"""Counters, gauges and histograms for the request path, as prometheus_client custom collectors.

prometheus_client's own metrics take a lock on every update (they may be shared by threads); the
sidecar updates its per-request metrics from the event loop only, a dozen times per request, and
scrapes them from the same loop. Here an update is a dict operation on a tuple of label values;
prometheus_client still renders /metrics (its collector interface is the extension point meant
for this), so names, help, types and the text format are the library's.

A series is a mutable cell (a counter's one-element list, a histogram's Observed) that stays in
its family for the process's life, so a caller that updates the same series on every request
binds it once (`cell`, `series`) and updates it in place, without building and hashing a label
tuple each time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]
# A counter's or gauge's value, updated in place: `cell[0] += amount`.
Cell = list[float]


class _Family(Collector):
    def __init__(self, name: str, doc: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.doc = doc
        self.labels = list(labels)
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _Values(_Family):
    """A value per label set, rendered as the family `kind` makes."""

    kind: type[CounterMetricFamily] | type[GaugeMetricFamily]

    def __init__(self, name: str, doc: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        super().__init__(name, doc, labels, registry)
        self.values: dict[Labels, Cell] = {}

    def cell(self, labels: Labels) -> Cell:
        """The series of `labels` (created at 0), to update in place."""
        cell = self.values.get(labels)
        if cell is None:
            cell = self.values[labels] = [0.0]
        return cell

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        cell = self.values.get(labels)
        if cell is None:
            cell = self.values[labels] = [0.0]
        cell[0] += amount

    def set(self, labels: Labels, value: float) -> None:
        self.cell(labels)[0] = value

    def value(self, labels: Labels) -> float:
        cell = self.values.get(labels)
        return 0.0 if cell is None else cell[0]

    def collect(self) -> Iterator[Metric]:
        family = self.kind(self.name, self.doc, labels=self.labels)
        for labels, cell in list(self.values.items()):
            family.add_metric(list(labels), cell[0])
        yield family


class FastCounter(_Values):
    kind = CounterMetricFamily


class FastGauge(_Values):
    """`inc` with a negative amount takes away."""

    kind = GaugeMetricFamily


class Observed:
    """One histogram series: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class FastHistogram(_Family):
    def __init__(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, doc, labels, registry)
        self.bounds = tuple(buckets)
        self.values: dict[Labels, Observed] = {}

    def series(self, labels: Labels) -> Observed:
        """The series of `labels` (created empty), to observe into directly."""
        got = self.values.get(labels)
        if got is None:
            got = self.values[labels] = Observed(self.bounds)
        return got

    def observe(self, labels: Labels, value: float) -> None:
        got = self.values.get(labels)
        if got is None:
            got = self.values[labels] = Observed(self.bounds)
        got.counts[bisect_left(self.bounds, value)] += 1
        got.total += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        edges = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for labels, got in list(self.values.items()):
            cumulative, running = [], 0
            for edge, n in zip(edges, got.counts, strict=True):
                running += n
                cumulative.append((edge, running))
            family.add_metric(list(labels), cumulative, got.total)
        yield family
