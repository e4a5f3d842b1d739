"""The account stage: what a request actually used and cost, as headers and metrics.

Usage comes from the provider's usage block; when a provider sends none (or a stream was cut
before it), prompt tokens are the estimate's count and completion tokens are counted from the
text with tiktoken. A request served in pieces (a stream resumed elsewhere) is one segment per
backend, each priced at its own backend's rates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tierwise_sidecar.estimate import Estimate, cost_usd
from tierwise_sidecar.identify import Identity
from tierwise_sidecar.metrics import Metrics
from tierwise_sidecar.runtime import BackendRoute

H_TIER = "x-tierwise-tier"
H_BACKEND = "x-tierwise-backend"
H_MODEL = "x-tierwise-model"
H_ROUTE = "x-tierwise-route"
H_SCORE = "x-tierwise-route-score"
H_ESTIMATE = "x-tierwise-estimated-cost-usd"
H_COST = "x-tierwise-cost-usd"
H_TOKENS = "x-tierwise-tokens"
H_ATTEMPTS = "x-tierwise-attempts"
H_FALLBACK = "x-tierwise-fallback-from"


@dataclass(frozen=True, slots=True)
class Segment:
    backend: BackendRoute
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    usd: float


def segment(backend: BackendRoute, usage: Mapping[str, Any] | None, input_tokens: int, counted_output: int) -> Segment:
    """A backend's share of a request, from its usage block or, without one, from our counts."""
    if isinstance(usage, Mapping) and isinstance(usage.get("prompt_tokens"), int):
        prompt = usage["prompt_tokens"]
        completion = _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    else:
        prompt, completion, cached = input_tokens, counted_output, 0
    return Segment(backend, prompt, completion, cached, cost_usd(backend.pricing, prompt, completion, cached))


def _count(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in as it goes."""

    identity: Identity
    estimate: Estimate | None = None
    route: str | None = None
    score: float | None = None
    tier: str | None = None
    backend: BackendRoute | None = None
    attempts: int = 0
    status: int = 0
    segments: list[Segment] = field(default_factory=list)

    @property
    def usd(self) -> float:
        return sum(s.usd for s in self.segments)


def usd(value: float) -> str:
    return f"{value:.8f}"


def served_headers(o: Outcome) -> dict[str, str]:
    """Headers known once a backend answered (all a stream can carry)."""
    h = {H_ATTEMPTS: str(o.attempts)}
    if o.tier is not None:
        h[H_TIER] = o.tier
        if o.tier != o.identity.tier:
            h[H_FALLBACK] = o.identity.tier
    if o.backend is not None:
        h[H_BACKEND] = o.backend.name
        h[H_MODEL] = o.backend.model
    if o.route is not None:
        h[H_ROUTE] = o.route
    if o.score is not None:
        h[H_SCORE] = f"{o.score:.3f}"
    if o.estimate is not None:
        h[H_ESTIMATE] = usd(o.estimate.usd)
    return h


def final_headers(o: Outcome) -> dict[str, str]:
    """Headers of a whole (non-streamed) answer, actual cost included."""
    h = served_headers(o)
    if o.segments:
        h[H_COST] = usd(o.usd)
        h[H_TOKENS] = f"{sum(s.input_tokens for s in o.segments)}/{sum(s.output_tokens for s in o.segments)}"
    return h


def record(metrics: Metrics, namespace: str, o: Outcome, duration: float) -> None:
    tenant = metrics.tenant(o.identity.tenant)
    tier = o.tier or o.identity.tier
    backend = o.backend.name if o.backend is not None else "none"
    metrics.child(metrics.requests, namespace, tenant, tier, backend, str(o.status)).inc()
    metrics.child(metrics.duration, namespace, tier).observe(duration)
    if o.route is not None and o.backend is not None:
        metrics.child(metrics.route, tier, o.route, backend).inc()
    if o.estimate is not None:
        metrics.child(metrics.estimated_cost, namespace, tenant, o.identity.tier).inc(o.estimate.usd)
    for s in o.segments:
        b = s.backend
        metrics.child(metrics.tokens, namespace, tenant, b.tier, b.name, "input").inc(s.input_tokens)
        metrics.child(metrics.tokens, namespace, tenant, b.tier, b.name, "output").inc(s.output_tokens)
        if s.cached_tokens:
            metrics.child(metrics.tokens, namespace, tenant, b.tier, b.name, "cached_input").inc(s.cached_tokens)
        metrics.child(metrics.cost, namespace, tenant, b.tier, b.name).inc(s.usd)
