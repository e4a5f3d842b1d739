"""Service levels from the grouped answers of Prometheus (pure).

The SLA observer asks Prometheus a fixed handful of queries per cycle, grouped by caller
namespace, tier and backend (bucket rates of the latency histograms, attempt and request counts),
however many tiers there are. A tier's numbers are then summed here over exactly the caller
namespaces whose Policy resolves its name to it, and quantiles are taken from the summed buckets,
as Prometheus's histogram_quantile does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

Labels = Mapping[str, str]
Sample = tuple[Labels, float]

# (status key, SLO field) of the latency objectives, each compared lower-is-better in milliseconds.
LATENCY_TARGETS = (
    ("firstTokenP95Milliseconds", "first_token_p95_milliseconds"),
    ("firstTokenP99Milliseconds", "first_token_p99_milliseconds"),
    ("totalP95Milliseconds", "total_p95_milliseconds"),
    ("totalP99Milliseconds", "total_p99_milliseconds"),
)
# (status key, quantile, histogram) for a tier as its callers see it, and for one backend.
TIER_LATENCY = (
    ("firstTokenP95Milliseconds", 0.95, "tierwise_time_to_first_byte_seconds"),
    ("firstTokenP99Milliseconds", 0.99, "tierwise_time_to_first_byte_seconds"),
    ("totalP95Milliseconds", 0.95, "tierwise_request_duration_seconds"),
    ("totalP99Milliseconds", 0.99, "tierwise_request_duration_seconds"),
)
BACKEND_LATENCY = (
    ("firstTokenP95Milliseconds", 0.95, "tierwise_backend_first_byte_seconds"),
    ("firstTokenP99Milliseconds", 0.99, "tierwise_backend_first_byte_seconds"),
    ("totalP95Milliseconds", 0.95, "tierwise_backend_duration_seconds"),
    ("totalP99Milliseconds", 0.99, "tierwise_backend_duration_seconds"),
)
TIER_HISTOGRAMS = ("tierwise_time_to_first_byte_seconds", "tierwise_request_duration_seconds")
BACKEND_HISTOGRAMS = ("tierwise_backend_first_byte_seconds", "tierwise_backend_duration_seconds")


def queries(window: int) -> dict[str, str]:
    """Every query of one cycle for one SLO window, by name."""
    out = {m: f"sum by (namespace, tier, le) (rate({m}_bucket[{window}s]))" for m in TIER_HISTOGRAMS} | {
        m: f"sum by (namespace, tier, backend, le) (rate({m}_bucket[{window}s]))" for m in BACKEND_HISTOGRAMS
    }
    out["attempts"] = (
        f"sum by (namespace, tier, backend, result) (increase(tierwise_upstream_attempts_total[{window}s]))"
    )
    out["requests"] = f"sum by (namespace, tier, code) (increase(tierwise_requests_total[{window}s]))"
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile of cumulative bucket counts (upper bound -> count), interpolated linearly
    within its bucket as Prometheus does; None without observations."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound  # in the open-ended bucket: the highest finite bound
            if count == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = b, count
    return prev_bound


@dataclass
class Grouped:
    """One cycle's answers for one window, by query name, indexed once by (tier name, caller
    namespace): a tier's sums read the rows of its own callers, not every tier's (hundreds of tiers
    in dozens of namespaces make tens of thousands of rows, and a tier name recurs in each)."""

    answers: Mapping[str, Iterable[Sample]]
    _index: dict[str, dict[tuple[str, str], list[Sample]]] = field(default_factory=dict)

    def _rows(self, name: str, tier: str, callers: frozenset[str]) -> Iterator[Sample]:
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = {}
            for row in self.answers.get(name, ()):
                index.setdefault((row[0].get("tier", ""), row[0].get("namespace", "")), []).append(row)
        for ns in callers:
            yield from index.get((tier, ns), ())

    def _buckets(self, metric: str, callers: frozenset[str], tier: str, backend: str | None) -> dict[float, float]:
        out: dict[float, float] = {}
        for labels, value in self._rows(metric, tier, callers):
            if backend is not None and labels.get("backend") != backend:
                continue
            le = float(labels.get("le", "nan"))
            if not math.isnan(le):
                out[le] = out.get(le, 0.0) + value
        return out

    def latency(self, callers: frozenset[str], tier: str, backend: str | None) -> dict[str, float | None]:
        table = TIER_LATENCY if backend is None else BACKEND_LATENCY
        values: dict[str, float | None] = {}
        for key, q, metric in table:
            v = histogram_quantile(q, self._buckets(metric, callers, tier, backend))
            values[key] = None if v is None else round(v * 1000)
        return values

    def attempts(self, callers: frozenset[str], tier: str) -> dict[str, tuple[float, float]]:
        """Per backend: (failed, all) attempts in the window; client errors are not failures."""
        out: dict[str, list[float]] = {}
        for labels, value in self._rows("attempts", tier, callers):
            got = out.setdefault(labels.get("backend", ""), [0.0, 0.0])
            got[1] += value
            if labels.get("result") not in ("ok", "client_error"):
                got[0] += value
        return {k: (v[0], v[1]) for k, v in out.items()}

    def requests(self, callers: frozenset[str], tier: str) -> tuple[float, float]:
        """(answered with a 5xx, all) requests the tier served in the window."""
        failed = total = 0.0
        for labels, value in self._rows("requests", tier, callers):
            total += value
            if labels.get("code", "").startswith("5"):
                failed += value
        return failed, total


def percent(part: float, whole: float, digits: int) -> float | None:
    return None if whole <= 0 else round(100 * part / whole, digits)


def tier_values(g: Grouped, callers: frozenset[str], tier: str) -> dict[str, float | None]:
    """A tier's numbers as its callers see them (fallbacks included)."""
    values = g.latency(callers, tier, None)
    att = g.attempts(callers, tier)
    values["errorRatePercent"] = percent(sum(f for f, _ in att.values()), sum(a for _, a in att.values()), 2)
    failed, total = g.requests(callers, tier)
    values["availabilityPercent"] = None if total <= 0 else round(100 - 100 * failed / total, 3)
    return values


def backend_values(g: Grouped, callers: frozenset[str], tier: str, backend: str) -> dict[str, float | None]:
    values = g.latency(callers, tier, backend)
    failed, total = g.attempts(callers, tier).get(backend, (0.0, 0.0))
    values["errorRatePercent"] = percent(failed, total, 2)
    return values


def has_traffic(g: Grouped, callers: frozenset[str], tier: str) -> bool:
    return g.requests(callers, tier)[1] > 0
