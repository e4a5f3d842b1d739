"""Objects shared by unit and integration tests: a valid one of each kind, and invalid variants."""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]


def tier(name: str = "gold", **spec: Any) -> Obj:
    base: Obj = {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "InferenceTier",
        "metadata": {"name": name},
        "spec": {
            "priority": 10,
            "backends": [
                {
                    "name": "main",
                    "model": "gpt-4o-mini",
                    "url": "http://127.0.0.1:9/v1",
                    "pricing": {"inputPerMillion": 0.15, "outputPerMillion": 0.6},
                }
            ],
        },
    }
    base["spec"].update(spec)
    return base


def budget(name: str = "monthly", **spec: Any) -> Obj:
    base: Obj = {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "CostBudget",
        "metadata": {"name": name},
        "spec": {"period": "Monthly", "limit": {"usd": 100}},
    }
    base["spec"].update(spec)
    return base


def cache(name: str = "cache", **spec: Any) -> Obj:
    base: Obj = {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "CachePolicy",
        "metadata": {"name": name},
        "spec": {"scope": "Tenant"},
    }
    base["spec"].update(spec)
    return base


def _backend(**fields: Any) -> list[Obj]:
    b = copy.deepcopy(tier()["spec"]["backends"][0])
    b.update(fields)
    return [{k: v for k, v in b.items() if v is not None}]


_DEPLOY = {"image": "vllm/vllm-openai:v0.11.0"}

# (id, object, the field the error must name, words of the reason)
INVALID: list[tuple[str, Obj, str, str]] = [
    (
        "backend-url-and-deployment",
        tier(backends=_backend(deployment=_DEPLOY)),
        "spec.backends[0]",
        "exactly one of url and deployment",
    ),
    (
        "backend-neither-url-nor-deployment",
        tier(backends=_backend(url=None)),
        "spec.backends[0]",
        "exactly one of url and deployment",
    ),
    (
        "negative-price",
        tier(backends=_backend(pricing={"inputPerMillion": -1, "outputPerMillion": 1})),
        "spec.backends[0].pricing.inputPerMillion",
        "0",
    ),
    ("missing-pricing", tier(backends=_backend(pricing=None)), "spec.backends[0].pricing", "required"),
    (
        "replicas-min-above-max",
        tier(backends=_backend(url=None, deployment={**_DEPLOY, "replicas": {"min": 5, "max": 2}})),
        "spec.backends[0].deployment.replicas.min",
        "min must not exceed max",
    ),
    (
        "secret-without-url",
        tier(backends=_backend(url=None, deployment=_DEPLOY, apiKeySecretRef={"name": "k", "key": "v"})),
        "spec.backends[0].apiKeySecretRef",
        "only valid with url",
    ),
    ("duplicate-backend-names", tier(backends=_backend() + _backend()), "spec.backends", "duplicate"),
    ("fallback-to-itself", tier(fallback={"tier": "gold"}), "spec.fallback.tier", "must not fall back to itself"),
    (
        "promotion-from-itself",
        tier(promotion={"borrowFrom": "gold"}),
        "spec.promotion.borrowFrom",
        "must not borrow capacity from itself",
    ),
    (
        "slo-p95-above-p99",
        tier(slo={"totalP95Milliseconds": 900, "totalP99Milliseconds": 100}),
        "spec.slo.totalP95Milliseconds",
        "must not exceed totalP99Milliseconds",
    ),
    ("unknown-routing-strategy", tier(routing={"strategy": "Random"}), "spec.routing.strategy", "LeastLoaded"),
    ("priority-out-of-range", tier(priority=5000), "spec.priority", "1000"),
    (
        "cost-aware-thresholds-crossed",
        tier(routing={"costAware": {"cheapBelow": 0.9, "strongAtOrAbove": 0.2}}),
        "spec.routing.costAware.cheapBelow",
        "must not exceed strongAtOrAbove",
    ),
    (
        "degradation-steps-descending",
        tier(degradation={"steps": [{"atLoadPercent": 90}, {"atLoadPercent": 50}]}),
        "spec.degradation.steps",
        "strictly ascending",
    ),
    (
        "rate-limit-empty",
        tier(rateLimit={"scope": "Tenant"}),
        "spec.rateLimit",
        "at least one of requestsPerSecond and tokensPerMinute",
    ),
    (
        "schedule-start-equals-end",
        tier(autoscaling={"schedules": [{"name": "n", "start": "10:00", "end": "10:00", "minReplicas": 1}]}),
        "spec.autoscaling.schedules[0].end",
        "start and end must differ",
    ),
    (
        "schedule-bad-clock",
        tier(autoscaling={"schedules": [{"name": "n", "start": "25:00", "end": "10:00", "minReplicas": 1}]}),
        "spec.autoscaling.schedules[0].start",
        "should match",
    ),
    ("tier-name-too-long", tier(name="a" * 40), "metadata.name", "DNS label of at most 28"),
    ("tier-name-not-a-label", tier(name="gold.v2"), "metadata.name", "DNS label of at most 28"),
    (
        "tier-weighted-all-zero",
        tier(backends=_backend(weight=0)),
        "spec.backends",
        "at least one backend needs a weight above 0",
    ),
    (
        "slo-first-token-p95-above-total-p95",
        tier(slo={"firstTokenP95Milliseconds": 5000, "totalP95Milliseconds": 1000}),
        "spec.slo.firstTokenP95Milliseconds",
        "must not exceed totalP95Milliseconds",
    ),
    ("budget-usd-as-string", budget(limit={"usd": "100"}), "spec.limit.usd", ""),
    ("budget-dry-run-as-string", budget(dryRun="true"), "spec.dryRun", ""),
    ("tier-priority-as-string", tier(priority="10"), "spec.priority", ""),
    (
        "selector-in-without-values",
        tier(access={"namespaces": {"selector": {"matchExpressions": [{"key": "team", "operator": "In"}]}}}),
        "spec.access.namespaces.selector.matchExpressions[0].values",
        "values must be non-empty for In",
    ),
    (
        "budget-thresholds-not-ascending",
        budget(thresholds=[{"percent": 80, "action": "Notify"}, {"percent": 50, "action": "Reject"}]),
        "spec.thresholds",
        "strictly ascending",
    ),
    (
        "budget-downgrade-without-target",
        budget(thresholds=[{"percent": 80, "action": "Downgrade"}]),
        "spec.thresholds[0].downgradeTo",
        "downgradeTo is required with action Downgrade",
    ),
    (
        "budget-throttle-without-rate",
        budget(thresholds=[{"percent": 80, "action": "Throttle"}]),
        "spec.thresholds[0].requestsPerSecond",
        "requestsPerSecond is required with action Throttle",
    ),
    ("budget-limit-empty", budget(limit={}), "spec.limit", "at least one of usd and tokens"),
    (
        "budget-per-request-above-limit",
        budget(perRequestMax={"usd": 500}),
        "spec.perRequestMax",
        "must not exceed limit.usd",
    ),
    (
        "budget-per-request-tokens-above-limit",
        budget(limit={"usd": 100, "tokens": 1000}, perRequestMax={"tokens": 5000}),
        "spec.perRequestMax",
        "must not exceed limit.tokens",
    ),
    (
        "budget-rolling-with-time-zone",
        budget(period="Rolling24Hours", timeZone="Europe/Berlin"),
        "spec.timeZone",
        "a rolling window has no time zone",
    ),
    ("budget-unknown-period", budget(period="Hourly"), "spec.period", "Monthly"),
    ("budget-zero-percent", budget(thresholds=[{"percent": 0, "action": "Notify"}]), "spec.thresholds[0].percent", "1"),
    (
        "cache-postgres-without-secret",
        cache(layers={"persistent": {"enabled": True, "backend": "PostgreSQL"}}),
        "spec.layers.persistent.connectionSecretRef",
        "required for the PostgreSQL backend",
    ),
    (
        "cache-redis-without-secret",
        cache(layers={"redis": {"enabled": True}}),
        "spec.layers.redis.connectionSecretRef",
        "required when the Redis layer is enabled",
    ),
    (
        "cache-no-layer",
        cache(layers={"memory": {"enabled": False}}),
        "spec.layers",
        "at least one layer must be enabled",
    ),
    (
        "cache-similarity-too-loose",
        cache(similarity={"enabled": True, "threshold": 0.5}),
        "spec.similarity.threshold",
        "0.8",
    ),
    ("cache-unknown-scope", cache(scope="Everyone"), "spec.scope", "Namespace"),
]

# Valid objects that leave out as much as they can: each rule must hold on what is omitted.
VALID: list[tuple[str, Obj]] = [
    ("tier-minimal", tier()),
    ("tier-self-hosted", tier(backends=_backend(url=None, deployment=_DEPLOY))),
    (
        "tier-sparse-subobjects",
        tier(routing={}, degradation={}, autoscaling={"schedules": []}, slo={}, queue={}, access={}),
    ),
    ("tier-empty-routing-parts", tier(routing={"costAware": {}, "stickiness": {}})),
    ("tier-weight-zero-cost-aware", tier(routing={"strategy": "CostAware"}, backends=_backend(weight=0))),
    ("tier-rate-limit-tokens-only", tier(rateLimit={"tokensPerMinute": 1000})),
    ("tier-scale-to-zero", tier(backends=_backend(url=None, deployment={**_DEPLOY, "replicas": {"min": 0, "max": 3}}))),
    ("budget-minimal", budget()),
    ("budget-tokens-only", budget(limit={"tokens": 1000000})),
    ("budget-no-thresholds", budget(thresholds=[])),
    ("budget-rolling", budget(period="Rolling7Days")),
    ("cache-minimal", cache()),
    (
        "cache-redis-only",
        cache(
            layers={
                "memory": {"enabled": False},
                "redis": {"enabled": True, "connectionSecretRef": {"name": "r", "key": "url"}},
            }
        ),
    ),
    ("cache-sqlite-only", cache(layers={"memory": {"enabled": False}, "persistent": {"enabled": True}})),
    ("cache-empty-layers", cache(layers={})),
]
