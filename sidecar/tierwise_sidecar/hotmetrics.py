"""Counters, gauges and histograms for the request path, as prometheus_client custom collectors.

prometheus_client's own metrics take a lock on every update (they may be shared by threads); the
sidecar updates its per-request metrics from the event loop only, a dozen times per request, and
scrapes them from the same loop. Here an update is a dict operation on a tuple of label values;
prometheus_client still renders /metrics (its collector interface is the extension point meant
for this), so names, help, types and the text format are the library's.
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
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        v = self.values
        v[labels] = v.get(labels, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        family = self.kind(self.name, self.doc, labels=self.labels)
        for labels, value in list(self.values.items()):
            family.add_metric(list(labels), value)
        yield family


class FastCounter(_Values):
    kind = CounterMetricFamily


class FastGauge(_Values):
    """`inc` with a negative amount takes away."""

    kind = GaugeMetricFamily


class FastHistogram(_Family):
    def __init__(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, doc, labels, registry)
        self.bounds = tuple(buckets)
        # Per label set: a count per bucket (the last is +Inf) and the sum.
        self.values: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        got = self.values.get(labels)
        if got is None:
            got = self.values[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        got[0][bisect_left(self.bounds, value)] += 1
        got[1][0] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        edges = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for labels, (counts, total) in list(self.values.items()):
            cumulative, running = [], 0
            for edge, n in zip(edges, counts, strict=True):
                running += n
                cumulative.append((edge, running))
            family.add_metric(list(labels), cumulative, total[0])
        yield family
