"""Each tier's service level and the steering it calls for, from Prometheus, once per interval.

An observer: one fixed handful of queries per cycle and SLO window, grouped by caller namespace,
tier and backend (slomath.py), however many tiers there are; the numbers of each tier and backend
come from summing those answers over the tier's callers. The steering decisions are steering.py's.
The tier controller writes both into the tier's status; the policy controller publishes the
steering to the sidecars beside the Policy.

Prometheus unreachable: the last steering stays in force for `--steering-hold` seconds, then the
declared weights come back (steering blind is worse than not steering); the tier's SLOMet
condition says which.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from tierwise.api.resources import InferenceTier
from tierwise_operator import signals
from tierwise_operator.controllers.base import Key
from tierwise_operator.controllers.policies import KEY as POLICIES
from tierwise_operator.manager import Manager
from tierwise_operator.slomath import Grouped, backend_values, has_traffic, queries, tier_values
from tierwise_operator.status import SLOObservation
from tierwise_operator.steering import DECLARED, TierSteer, step

TierKey = tuple[str, str]


class SLAObserver:
    name = "slo"

    def __init__(self, m: Manager) -> None:
        self.m = m
        self.interval = m.config.slo_interval
        self.hold = m.config.steering_hold
        self.wake = asyncio.Event()
        self.prom = m.prometheus(self.name)
        self.seen: dict[TierKey, SLOObservation] = {}
        self.steer: dict[TierKey, TierSteer] = {}
        self.last_read: float | None = None  # monotonic time of the last cycle Prometheus answered

    def forget(self, namespace: str, tier: str) -> None:
        self.seen.pop((namespace, tier), None)
        self.steer.pop((namespace, tier), None)

    def observation(self, namespace: str, tier: str) -> SLOObservation:
        got = self.seen.get((namespace, tier))
        if got is not None:
            return got
        return SLOObservation(error=signals.NO_PROMETHEUS) if self.prom is None else SLOObservation()

    def steering(self, namespace: str, tier: str) -> TierSteer:
        return self.steer.get((namespace, tier), DECLARED)

    async def observe(self) -> Iterable[Key]:
        if self.prom is None:
            return ()
        tiers = self.m.store.tiers()
        now = time.monotonic()
        try:
            grouped = {w: await self._read(w) for w in {t.spec.slo.window_seconds for t in tiers}}
        except signals.PrometheusUnavailableError as e:
            return self._blind(tiers, str(e), now)
        self.last_read = now
        changed: list[Key] = []
        steering_moved = False
        callers_of = self.m.derived().callers
        for t in tiers:
            key = (t.namespace, t.name)
            g, callers = grouped[t.spec.slo.window_seconds], frozenset(callers_of.get(key, ()))
            if has_traffic(g, callers, t.name):
                values = tier_values(g, callers, t.name)
                backends = {b.name: backend_values(g, callers, t.name, b.name) for b in t.spec.backends}
                obs = SLOObservation(values=values, backends=backends)
            else:
                values, backends, obs = {}, {}, SLOObservation()
            before = self.steering(*key)
            after = step(t.spec, before, values, backends, now)
            self.steer[key] = after
            visible = (before.weights(t.spec), before.divert) != (after.weights(t.spec), after.divert)
            steering_moved = steering_moved or visible
            if self.seen.get(key) != obs or visible:
                self.seen[key] = obs
                changed.append(("tier", t.namespace, t.name))
        if steering_moved:
            changed.append(POLICIES)
        return changed

    async def _read(self, window: int) -> Grouped:
        assert self.prom is not None
        answers = {}
        for name, q in queries(window).items():
            answers[name] = await self.prom.query(q)
        return Grouped(answers)

    def _blind(self, tiers: list[InferenceTier], error: str, now: float) -> list[Key]:
        expired = self.last_read is None or now - self.last_read >= self.hold
        note = (
            "steering back to the declared weights"
            if expired
            else f"the last steering is kept for at most {self.hold:g}s, then the declared weights return"
        )
        changed: list[Key] = []
        moved = False
        for t in tiers:
            key = (t.namespace, t.name)
            reset = expired and self.steering(*key) != DECLARED
            if reset:
                self.steer[key] = DECLARED
                moved = True
            obs = SLOObservation(error=f"{error}; {note}")
            if self.seen.get(key) != obs or reset:
                self.seen[key] = obs
                changed.append(("tier", t.namespace, t.name))
        return [*changed, POLICIES] if moved else changed
