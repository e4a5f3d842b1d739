"""The steer stage: the operator's SLO steering, applied without a rebuild. While a tier misses its
SLO the operator publishes (steering.json beside the Policy) the weights its backends are routed
by, lowered for a backend that misses, and a share of its traffic to send to another tier: the
one its promotion borrows from, or its fallback. This stage sends that share (a random draw per
request) and says so in headers; the route stage routes by the steered weights.

It runs after the budget stage: budgets count the tier the request asked for, and serving on a
costlier tier asks them for the difference first, as a fallback does.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierwise_sidecar.metrics import METRICS, Metrics
from tierwise_sidecar.route import RNG
from tierwise_sidecar.runtime import TierRoute
from tierwise_sidecar.state import Key
from tierwise_sidecar.watched import WatchedJson

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.state import SharedState

PROMOTED, FALLBACK = "promoted", "fallback"


@dataclass(frozen=True, slots=True)
class TierSteering:
    weights: Mapping[str, int]
    to: str | None = None
    reason: str = ""
    percent: int = 0


def parse(data: Any) -> dict[str, TierSteering]:
    out: dict[str, TierSteering] = {}
    for name, t in (data.get("tiers") or {}).items():
        d = t.get("divert") or {}
        # Bounded whatever the file says: a negative weight would make routing's draw raise.
        out[str(name)] = TierSteering(
            {str(k): max(0, int(v)) for k, v in (t.get("weights") or {}).items()},
            str(d["to"]) if d else None,
            str(d.get("reason", "")) if d else "",
            min(100, max(0, int(d.get("percent", 0)))) if d else 0,
        )
    return out


class Steering(WatchedJson[Mapping[str, TierSteering]]):
    def __init__(self, path: Path | None, interval: float) -> None:
        super().__init__(path, interval, parse, {}, "the published SLO steering")
        self._routes: dict[str, tuple[TierRoute, int, TierRoute]] = {}

    def route(self, tier: TierRoute) -> TierRoute:
        """The tier routed by its steered weights; built once per tier and publication."""
        steer = self.value.get(tier.name)
        if steer is None or not steer.weights:
            return tier
        got = self._routes.get(tier.name)
        if got is not None and got[0] is tier and got[1] == self.version:
            return got[2]
        backends = tuple(dataclasses.replace(b, weight=steer.weights.get(b.name, b.weight)) for b in tier.backends)
        by = {b.name: b for b in backends}
        steered = dataclasses.replace(
            tier,
            backends=backends,
            by_price=tuple(by[b.name] for b in tier.by_price),
            by_strength=tuple(by[b.name] for b in tier.by_strength),
        )
        self._routes[tier.name] = (tier, self.version, steered)
        return steered


STEERING = Key("steering", lambda s: Steering(s.config.steering_file, s.config.reload_interval))


class SteerStage:
    name = "steer"

    def __init__(self, steering: Steering, metrics: Metrics, rng: random.Random) -> None:
        self.steering = steering
        self.metrics = metrics
        self.rng = rng

    async def enter(self, x: Exchange) -> Reply | None:
        steer = self.steering.value.get(x.identity.tier)
        if steer is None or steer.to is None or steer.to not in x.runtime.tiers:
            return None
        if self.rng.random() * 100 >= steer.percent:
            return None
        x.steered = (x.identity.tier, steer.reason)
        self.metrics.steered.inc((x.identity.namespace, x.identity.tier, steer.to, steer.reason))
        x.identity = dataclasses.replace(x.identity, tier=steer.to)
        return None

    async def leave(self, x: Exchange) -> None:
        return None


def build(runtime: Runtime, state: SharedState) -> SteerStage | None:
    if state.config.steering_file is None:
        return None
    return SteerStage(state.get(STEERING), state.get(METRICS), state.get(RNG))
