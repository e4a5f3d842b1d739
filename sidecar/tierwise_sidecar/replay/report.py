"""What a replay shows, from what each request got under each strategy: pure arithmetic.

A strategy (all traffic on the premium model, all on the cheapest, the Policy) replays the same
trace; each request's answer says what it cost, who served it and why (the gateway's headers).
The saving of the Policy is counted per request against the same request on the premium model,
and each request's saving goes to one cause, the first that applies in CAUSES' order, so the
parts add up to the total by construction. New causes (context fitting, batch discounts) join
that list as their stages land.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# The order in which a request's saving is attributed: what made it cheaper first.
CACHE, REFUSED, DOWNGRADE, DEGRADED, FALLBACK, ROUTING, TIER = (
    "cache hits", "not served (refused)", "budget downgrades", "degradation", "fallbacks", "cost-aware routing",
    "tier choice",
)  # fmt: skip
CAUSES = (CACHE, REFUSED, DOWNGRADE, DEGRADED, FALLBACK, ROUTING, TIER)


@dataclass(frozen=True, slots=True)
class Result:
    """One request of the trace as one strategy served it."""

    index: int
    t: float  # when it was sent, seconds since the trace start
    tier: str  # the tier the trace asked for
    status: int
    latency_s: float
    cost_usd: float = 0.0
    tenant: str | None = None
    label: str | None = None  # easy / medium / hard, when the trace says
    code: str | None = None  # the error code of a refusal
    served_tier: str | None = None
    model: str | None = None
    cached: bool = False
    degraded: bool = False
    downgraded_from: str | None = None
    fallback_from: str | None = None
    budget_state: str | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    """What the report needs of the Policy: prices and strength of models, each tier's SLO."""

    # model -> blended price (USD per million tokens, 3 input : 1 output) and strength (0-100)
    price: Mapping[str, float]
    strength: Mapping[str, int]
    # tier -> the models its backends serve; tier -> the total-latency objective in seconds, p95 or
    # else p99 (None: none, where answering is enough)
    tier_models: Mapping[str, Sequence[str]]
    slo_s: Mapping[str, float | None]
    strong_at: int = 80  # a model at least this strong counts as strong for the quality proxy


@dataclass
class Summary:
    """One strategy's figures."""

    requests: int = 0
    served: int = 0
    cost_usd: float = 0.0
    by_tier: dict[str, float] = field(default_factory=dict)
    by_tenant: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0
    cache_hits: int = 0
    degraded: int = 0
    downgraded: int = 0
    # tier -> (answered within its SLO, requests): a request refused or failed missed its SLO
    slo: dict[str, tuple[int, int]] = field(default_factory=dict)
    # hard requests served by a strong model, hard requests served
    hard_on_strong: tuple[int, int] = (0, 0)
    budget_states: dict[str, int] = field(default_factory=dict)

    def compliance(self, tier: str) -> float | None:
        ok, n = self.slo.get(tier, (0, 0))
        return ok / n if n else None


def summarize(results: Sequence[Result], catalog: Catalog) -> Summary:
    s = Summary(requests=len(results))
    by_tier: dict[str, float] = defaultdict(float)
    by_tenant: dict[str, float] = defaultdict(float)
    refusals: Counter[str] = Counter()
    slo: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    states: Counter[str] = Counter()
    hard = [0, 0]
    for r in results:
        s.cost_usd += r.cost_usd
        by_tier[r.served_tier or r.tier] += r.cost_usd
        by_tenant[r.tenant or "none"] += r.cost_usd
        counts = slo[r.tier]
        counts[1] += 1
        if r.status >= 400:
            refusals[r.code or str(r.status)] += 1
            continue
        objective = catalog.slo_s.get(r.tier)
        counts[0] += objective is None or r.latency_s <= objective
        s.served += 1
        s.fallbacks += r.fallback_from is not None
        s.cache_hits += r.cached
        s.degraded += r.degraded
        s.downgraded += r.downgraded_from is not None
        if r.budget_state:
            states[r.budget_state] += 1
        if r.label == "hard":
            hard[1] += 1
            hard[0] += r.model is not None and catalog.strength.get(r.model, 0) >= catalog.strong_at
    s.by_tier, s.by_tenant, s.refusals = dict(by_tier), dict(by_tenant), dict(refusals)
    s.slo = {k: (v[0], v[1]) for k, v in slo.items()}
    s.hard_on_strong = (hard[0], hard[1])
    s.budget_states = dict(states)
    return s


def cause(r: Result, catalog: Catalog) -> str:
    """Why one request cost less under the Policy than on the premium model."""
    if r.cached:
        return CACHE
    if r.status >= 400:
        return REFUSED
    if r.downgraded_from is not None:
        return DOWNGRADE
    if r.degraded:
        return DEGRADED
    if r.fallback_from is not None:
        return FALLBACK
    dearest = max((catalog.price.get(m, 0.0) for m in catalog.tier_models.get(r.tier, ())), default=0.0)
    if r.model is not None and catalog.price.get(r.model, 0.0) < dearest:
        return ROUTING  # the tier has a dearer model; routing picked a cheaper one
    return TIER


def savings(policy: Sequence[Result], premium: Sequence[Result], catalog: Catalog) -> dict[str, float]:
    """The Policy's saving against the premium model, per cause; the values add up to the total
    (premium cost minus Policy cost over the same requests). A request that cost more under the
    Policy (a fallback to a dearer tier, say) counts negative under its cause."""
    out = dict.fromkeys(CAUSES, 0.0)
    dear = {r.index: r.cost_usd for r in premium}
    for r in policy:
        out[cause(r, catalog)] += dear.get(r.index, 0.0) - r.cost_usd
    return out
