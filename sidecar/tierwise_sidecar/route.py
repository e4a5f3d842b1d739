"""The choose-backend stage: in which order to try a tier's backends and replicas.

Weighted: a weighted random pick, the rest by weight. LeastLoaded: fewest in-flight requests per
unit of weight. CostAware: the difficulty score against the tier's thresholds picks the cheapest
(easy), the strongest (hard) or a weighted pick (in between). Backends whose breakers are all open
or whose context is too small are left out; the caller tells them apart to answer correctly.
The ordering is a pure function; the stage only feeds it the health the sidecar has learnt.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from tierwise.api.tier import RoutingStrategy
from tierwise.values import value
from tierwise_sidecar.difficulty import difficulty_of
from tierwise_sidecar.metrics import METRICS, Metrics
from tierwise_sidecar.runtime import HEALTH, BackendRoute, Health, TierRoute
from tierwise_sidecar.state import Key
from tierwise_sidecar.sticky import rendezvous

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.state import SharedState

CHEAP, STRONG, WEIGHTED, LEAST_LOADED, PINNED = "cheap", "strong", "weighted", "least_loaded", "pinned"


@value
class Decision:
    order: tuple[BackendRoute, ...]
    decision: str
    score: float | None


def _weighted(backends: Sequence[BackendRoute], rng: random.Random) -> tuple[BackendRoute, ...]:
    weighted = [b for b in backends if b.weight > 0]
    if not weighted:
        return tuple(backends)
    first = rng.choices(weighted, weights=[b.weight for b in weighted])[0]
    rest = sorted((b for b in backends if b is not first), key=lambda b: (-b.weight, b.price))
    return (first, *rest)


def order_backends(
    tier: TierRoute,
    score: float | None,
    in_flight: Mapping[str, int],
    usable: Callable[[BackendRoute], bool],
    rng: random.Random,
) -> Decision:
    """The usable backends of `tier`, best first, and why."""
    if tier.strategy is RoutingStrategy.COST_AWARE and score is not None:
        if score < tier.cheap_below:
            return Decision(tuple([b for b in tier.by_price if usable(b)]), CHEAP, score)
        if score >= tier.strong_at:
            return Decision(tuple([b for b in tier.by_strength if usable(b)]), STRONG, score)
        return Decision(_weighted([b for b in tier.by_price if usable(b)], rng), WEIGHTED, score)
    candidates = [b for b in tier.backends if usable(b)]
    if tier.strategy is RoutingStrategy.LEAST_LOADED:
        ranked = sorted(candidates, key=lambda b: (in_flight.get(b.key, 0) / max(b.weight, 1), b.price))
        return Decision(tuple(ranked), LEAST_LOADED, score)
    return Decision(_weighted(candidates, rng), WEIGHTED, score)


def pin_first(decision: Decision, backend: str) -> Decision:
    """Put a session's pinned backend first, if it is still usable."""
    pinned = [b for b in decision.order if b.name == backend]
    if not pinned:
        return decision
    return Decision((pinned[0], *(b for b in decision.order if b.name != backend)), PINNED, decision.score)


def order_endpoints(endpoints: Sequence[str], session: str | None, turn: int, pinned: str | None = None) -> list[str]:
    """Replicas to try: a session's by rendezvous hash (its pin first), others round-robin."""
    if session is not None:
        ordered = rendezvous(session, endpoints)
        if pinned in ordered:
            ordered.remove(pinned)
            ordered.insert(0, pinned)
        return ordered
    if not endpoints:
        return []
    start = turn % len(endpoints)
    return [*endpoints[start:], *endpoints[:start]]


def decide(
    tier: TierRoute, input_tokens: int, score: float | None, health: Health, *, rng: random.Random, now: float
) -> Decision:
    """The order of a tier's backends for a request, as the sidecar's health sees them now."""

    def usable(b: BackendRoute) -> bool:
        return input_tokens < b.max_context and health.usable(b, now)

    return order_backends(tier, score if tier.strategy is RoutingStrategy.COST_AWARE else None, health.in_flight,
                          usable, rng)  # fmt: skip


class RouteStage:
    name = "route"

    def __init__(
        self,
        health: Health,
        metrics: Metrics,
        rng: random.Random,
        now: Callable[[], float],
        steered: Callable[[TierRoute], TierRoute] | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.rng = rng
        self.now = now
        self.steered = steered

    async def enter(self, x: Exchange) -> Reply | None:
        tier = x.runtime.tiers[x.identity.tier]
        if self.steered is not None:
            tier = self.steered(tier)
        if tier.needs_score:
            x.score = difficulty_of(x.kind, x.body, x.input_tokens, x.identity.priority)
        x.decision = decide(tier, x.input_tokens, x.score, self.health, rng=self.rng, now=self.now())
        if x.decision.score is not None:
            self.metrics.route_score.observe((tier.name,), x.decision.score)
        return None

    async def leave(self, x: Exchange) -> None:
        return None


# One random source for routing and failover jitter, shared by every Policy's stages.
RNG = Key("rng", lambda state: random.Random())


def build(runtime: Runtime, state: SharedState) -> RouteStage:
    steered = None
    if state.config.steering_file is not None:
        from tierwise_sidecar.steer import STEERING  # the steer module builds on this one

        steered = state.get(STEERING).route
    return RouteStage(state.get(HEALTH), state.get(METRICS), state.get(RNG), time.monotonic, steered)
