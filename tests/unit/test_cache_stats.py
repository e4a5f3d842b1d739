"""The cache observer's arithmetic: per policy, the hit ratio of each layer and the entries held."""

from __future__ import annotations

from tierwise_operator.controllers.caches import CacheStats, cache_stats, with_stats


def _l(layer: str, result: str, policy: str = "answers") -> dict[str, str]:
    return {"cache_namespace": "apps", "cache_policy": policy, "layer": layer, "result": result}


def test_hit_ratio_per_layer_and_entries_per_policy() -> None:
    got = cache_stats(
        [(_l("memory", "hit"), 30.0), (_l("memory", "miss"), 10.0), (_l("redis", "hit"), 2.0),
         (_l("redis", "miss"), 0.0), (_l("persistent", "miss"), 0.0), (_l("bogus", "hit"), 5.0),
         (_l("memory", "hit", "other"), 1.0)],
        [({"cache_namespace": "apps", "cache_policy": "answers"}, 12.0)],
    )  # fmt: skip
    assert got["apps/answers"] == CacheStats(12, {"memory": 0.75, "redis": 1.0})
    assert got["apps/other"] == CacheStats(None, {"memory": 1.0})


def test_the_status_keeps_what_was_not_observed() -> None:
    status = {"observedGeneration": 2, "entries": 3}
    assert with_stats(status, None) == status
    assert with_stats(status, CacheStats(None, {"memory": 0.5})) == {**status, "hitRatio": {"memory": 0.5}}
    assert with_stats(status, CacheStats(7, {}))["entries"] == 7
