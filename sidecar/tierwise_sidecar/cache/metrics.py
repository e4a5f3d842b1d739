"""Cache metrics in Prometheus conventions: per request what the cache did, per layer lookups,
fills, errors, evictions, entries and bytes, and the spend hits saved (by tenant and tier: what
the answers cost when they were paid for). Labels come from the Policy or fixed sets; tenants are
capped as everywhere else."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierwise_sidecar.hotmetrics import FastCounter
from tierwise_sidecar.metrics import METRICS
from tierwise_sidecar.state import Key, SharedState

POLICY = ["cache_namespace", "cache_policy"]

# (policy labels, layer, entries, bytes, evictions)
LayerSizes = Callable[[], Iterable[tuple[tuple[str, str], str, int, int, int]]]


class _Sizes(Collector):
    def __init__(self) -> None:
        self.sizes: LayerSizes = lambda: ()

    def collect(self) -> Iterator[Metric]:
        labels = [*POLICY, "layer"]
        entries = GaugeMetricFamily("tierwise_cache_entries", "Entries held by this sidecar's layer.", labels=labels)
        size = GaugeMetricFamily("tierwise_cache_bytes", "Bytes of answers held by this sidecar's layer.",
                                 labels=labels)  # fmt: skip
        evicted = CounterMetricFamily("tierwise_cache_evictions", "Entries a layer dropped to stay in its bounds.",
                                      labels=labels)  # fmt: skip
        for policy, layer, n, b, e in self.sizes():
            entries.add_metric([*policy, layer], n)
            size.add_metric([*policy, layer], b)
            evicted.add_metric([*policy, layer], e)
        yield entries
        yield size
        yield evicted


# (layer, entries, bytes, entries swept) of each persistent store, as its last sweep saw it.
StoreSizes = Callable[[], Iterable[tuple[str, int, int, int]]]


class PersistentSizes(Collector):
    """L3 as its sweeps see it: shared by every sidecar (and policy) using the store, so labelled
    by layer only; the store's address, which may hold a password, is never a label."""

    def __init__(self, sizes: StoreSizes) -> None:
        self.sizes = sizes

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily("tierwise_cache_store_entries", "Live entries in a persistent store at its last "
                                    "sweep.", labels=["layer"])  # fmt: skip
        size = GaugeMetricFamily("tierwise_cache_store_bytes", "Bytes of answers in a persistent store at its last "
                                 "sweep.", labels=["layer"])  # fmt: skip
        swept = CounterMetricFamily(
            "tierwise_cache_store_swept",
            "Entries this sidecar's sweeps dropped from a persistent store (expired, or past its size bound).",
            labels=["layer"],
        )
        totals: dict[str, list[int]] = {}
        for layer, n, b, s in self.sizes():
            t = totals.setdefault(layer, [0, 0, 0])
            t[0], t[1], t[2] = t[0] + n, t[1] + b, t[2] + s
        for layer, (n, b, s) in totals.items():
            entries.add_metric([layer], n)
            size.add_metric([layer], b)
            swept.add_metric([layer], s)
        yield entries
        yield size
        yield swept


class CacheMetrics:
    def __init__(self, state: SharedState) -> None:
        m = state.get(METRICS)
        r = m.registry
        self.tenant = m.tenant
        self.requests = FastCounter(
            "tierwise_cache_requests", "Requests a cache policy covered, by what the cache did (hit, miss, refresh, "
            "bypass).", ["namespace", "tier", "outcome"], r,
        )  # fmt: skip
        self.lookups = FastCounter(
            "tierwise_cache_lookups", "Lookups per layer, by result (hit, miss, error).", [*POLICY, "layer", "result"],
            r,
        )  # fmt: skip
        self.fills = FastCounter(
            "tierwise_cache_fills", "Answers stored per layer, by result (stored, dropped, error).",
            [*POLICY, "layer", "result"], r,
        )  # fmt: skip
        self.saved = FastCounter(
            "tierwise_cache_saved_usd", "What answers served from cache cost when they were paid for: spend saved.",
            ["namespace", "tenant", "tier"], r,
        )  # fmt: skip
        self.similar = FastCounter(
            "tierwise_cache_similar_lookups",
            "Near-duplicate lookups, by result (hit, miss, unavailable: no embedding).",
            [*POLICY, "result"], r,
        )  # fmt: skip
        self.embedding_cost = FastCounter(
            "tierwise_cache_embedding_cost_usd", "What embedding prompts for near-duplicate matching cost.", POLICY, r
        )
        self._sizes = _Sizes()
        r.register(self._sizes)

    def watch(self, sizes: LayerSizes) -> None:
        self._sizes.sizes = sizes


CACHE_METRICS: Key[CacheMetrics] = Key("cache-metrics", CacheMetrics)
