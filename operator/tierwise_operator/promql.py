"""PromQL over the sidecars' metrics, per tier and backend (pure: strings in, strings out).

Sidecars label series with their own namespace (the caller), the tier name and the backend. A tier
name means different tiers in different namespaces (a team's own tier shadows a platform tier of
the same name), so a query selects exactly the caller namespaces whose Policy resolves the name to
this tier: the operator knows them from the compiler.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierwise.api.tier import SLO, ScalingSignal

# External metric names an HPA reads through a Prometheus metrics adapter (docs/operator.md).
HPA_METRICS = {
    ScalingSignal.IN_FLIGHT_PER_REPLICA: "tierwise_backend_in_flight_requests",
    ScalingSignal.TOKENS_PER_SECOND: "tierwise_backend_tokens_per_second",
    ScalingSignal.QUEUE_DEPTH: "tierwise_queue_waiting_requests",
}


@dataclass(frozen=True)
class Scope:
    tier: str
    backend: str | None
    callers: tuple[str, ...]

    def matchers(self, with_backend: bool = True) -> str:
        # Namespace names are DNS labels: nothing in them is special to a regular expression.
        # "-" is no namespace's name, so a tier nobody may call selects nothing.
        callers = "|".join(sorted(self.callers)) or "-"
        parts = [f'namespace=~"{callers}"', f'tier="{self.tier}"']
        if with_backend and self.backend is not None:
            parts.append(f'backend="{self.backend}"')
        return ",".join(parts)


def in_flight(scope: Scope) -> str:
    return f"sum(tierwise_backend_in_flight_requests{{{scope.matchers()}}})"


def tokens_per_second(scope: Scope) -> str:
    return f'sum(rate(tierwise_tokens_total{{{scope.matchers()},kind=~"input|output"}}[1m]))'


def queue_depth(scope: Scope) -> str:
    return f"sum(tierwise_queue_waiting_requests{{{scope.matchers(with_backend=False)}}})"


def quantile(q: float, metric: str, scope: Scope, window: int) -> str:
    return (
        f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{scope.matchers(with_backend=False)}}}"
        f"[{window}s])))"
    )


def slo_ratio(scope: Scope, slo: SLO) -> str | None:
    """Observed p95 over its target, for the tightest declared latency objective (1.0 = at the SLO)."""
    if slo.first_token_p95_milliseconds is not None:
        metric, target = "tierwise_time_to_first_byte_seconds", slo.first_token_p95_milliseconds
    elif slo.total_p95_milliseconds is not None:
        metric, target = "tierwise_request_duration_seconds", slo.total_p95_milliseconds
    else:
        return None
    return f"({quantile(0.95, metric, scope, 60)}) / {target / 1000:g}"


def requests(scope: Scope, window: int) -> str:
    """Requests that asked for the tier over the window, whichever backend (if any) served them."""
    return f"sum(increase(tierwise_requests_total{{{scope.matchers(with_backend=False)}}}[{window}s]))"


def load_query(signal: ScalingSignal, scope: Scope, slo: SLO) -> str:
    """The whole tier's load for a signal; desired replicas = load / per-replica target."""
    match signal:
        case ScalingSignal.IN_FLIGHT_PER_REPLICA:
            return in_flight(scope)
        case ScalingSignal.TOKENS_PER_SECOND:
            return tokens_per_second(scope)
        case ScalingSignal.QUEUE_DEPTH:
            return queue_depth(scope)
        case ScalingSignal.SLO_HEADROOM:
            ratio = slo_ratio(scope, slo)
            return ratio if ratio is not None else "vector(0)"
