"""CachePolicies: the cache observer reads from Prometheus what every sidecar's cache does (one
grouped query for the lookups of each layer over the last hour, one for the entries held in
memory); the cache controller, the one writer of a CachePolicy's status, writes whether the policy
compiles with the rest (Ready), the entries and the hit ratio of each layer.

Ratios are rounded to two decimals, so a status is written when what a layer does changes, not at
every scrape. With Prometheus away, the last figures stay and nothing is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tierwise.api.resources import Problem
from tierwise_operator.controllers.base import Key, Obj, Queued
from tierwise_operator.kube import CACHE
from tierwise_operator.manager import Derived, Manager, now_iso
from tierwise_operator.signals import PrometheusUnavailableError
from tierwise_operator.status import validity_status

log = logging.getLogger("tierwise.operator")
NAME = "cache"
SETTLE_SECONDS = 0.3
LAYERS = ("memory", "redis", "persistent")
LOOKUPS = (
    "sum by (cache_namespace, cache_policy, layer, result) "
    '(increase(tierwise_cache_lookups_total{result=~"hit|miss"}[1h]))'
)
ENTRIES = "sum by (cache_namespace, cache_policy) (tierwise_cache_entries)"


@dataclass(frozen=True)
class CacheStats:
    entries: int | None = None
    # Per layer: hits over lookups in the last hour; absent for a layer nobody looked up.
    hit_ratio: Mapping[str, float] = field(default_factory=dict)


def cache_stats(
    lookups: Iterable[tuple[Mapping[str, str], float]], entries: Iterable[tuple[Mapping[str, str], float]]
) -> dict[str, CacheStats]:
    """Per policy ("namespace/name"), from the two queries' series: pure."""
    counts: dict[str, dict[str, list[float]]] = {}
    for labels, value in lookups:
        key = f"{labels.get('cache_namespace', '')}/{labels.get('cache_policy', '')}"
        layer = labels.get("layer", "")
        if layer not in LAYERS:
            continue
        hit_miss = counts.setdefault(key, {}).setdefault(layer, [0.0, 0.0])
        hit_miss[0 if labels.get("result") == "hit" else 1] += value
    held = {f"{ls.get('cache_namespace', '')}/{ls.get('cache_policy', '')}": int(v) for ls, v in entries}
    out: dict[str, CacheStats] = {}
    for key in counts.keys() | held.keys():
        ratios = {
            layer: round(hits / (hits + misses), 2)
            for layer, (hits, misses) in counts.get(key, {}).items()
            if hits + misses > 0
        }
        out[key] = CacheStats(held.get(key), ratios)
    return out


def with_stats(status: Obj, stats: CacheStats | None) -> Obj:
    """The status with the observed figures (kept as they were when there are none)."""
    if stats is None:
        return status
    out = dict(status)
    if stats.entries is not None:
        out["entries"] = stats.entries
    if stats.hit_ratio:
        out["hitRatio"] = dict(stats.hit_ratio)
    return out


class CacheObserver:
    name = "cache-stats"

    def __init__(self, m: Manager) -> None:
        self.m = m
        self.interval = m.config.spend_interval
        self.wake = asyncio.Event()
        self.prom = m.prometheus(self.name)
        self.stats: dict[str, CacheStats] = {}

    async def observe(self) -> Iterable[Key]:
        if self.prom is None or not self.m.store.all("CachePolicy"):
            return ()
        try:
            lookups = await self.prom.query(LOOKUPS)
            entries = await self.prom.query(ENTRIES)
        except PrometheusUnavailableError as e:
            log.info("cache statistics not read (%s); the last ones stay", e)
            return ()
        fresh = cache_stats(lookups, entries)
        changed = [k for k in fresh.keys() | self.stats.keys() if fresh.get(k) != self.stats.get(k)]
        self.stats = fresh
        return [(NAME, *k.split("/", 1)) for k in changed]  # type: ignore[misc]


class CacheController:
    name = NAME

    def __init__(self, m: Manager, observer: CacheObserver) -> None:
        self.m = m
        self.observer = observer

    def keys_for(self, kind: str, obj: Obj, deleted: bool) -> Iterable[Queued]:
        if kind != "CachePolicy":
            return ()
        meta = obj.get("metadata") or {}
        return (((NAME, str(meta.get("namespace") or ""), str(meta.get("name", ""))), SETTLE_SECONDS),)

    def all_keys(self) -> Iterable[Key]:
        for obj in self.m.store.all("CachePolicy"):
            yield NAME, obj["metadata"]["namespace"], obj["metadata"]["name"]

    def moved(self, before: Derived, after: Derived) -> Iterable[Key]:
        for r in after.world.caches:
            if before.problems.get(r.ref) != after.problems.get(r.ref):
                yield NAME, r.namespace, r.name

    async def reconcile(self, namespace: str, name: str) -> None:
        obj = self.m.store.get("CachePolicy", namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        parsed = self.m.store.parsed("CachePolicy", obj)
        problems = [str(parsed)] if isinstance(parsed, Problem) else self.m.derived().problems.get(parsed.ref, [])
        generation = int(obj["metadata"].get("generation") or 0)
        status = validity_status(obj.get("status") or {}, problems, generation, now_iso())
        await self.m.patch_status(CACHE, obj, with_stats(status, self.observer.stats.get(f"{namespace}/{name}")))
