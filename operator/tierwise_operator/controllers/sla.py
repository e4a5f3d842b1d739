"""What each tier's service level is, from Prometheus, once per interval. An observer: the tier
controller writes what it sees into the tier's status."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from tierwise.api.resources import InferenceTier
from tierwise_operator import signals
from tierwise_operator.controllers.base import Key
from tierwise_operator.manager import Manager
from tierwise_operator.status import SLOObservation


class SLAObserver:
    name = "slo"

    def __init__(self, m: Manager) -> None:
        self.m = m
        self.interval = m.config.slo_interval
        self.wake = asyncio.Event()
        self.prom = signals.Prometheus(m.config.prometheus_url) if m.config.prometheus_url else None
        self.seen: dict[tuple[str, str], SLOObservation] = {}

    def forget(self, namespace: str, tier: str) -> None:
        self.seen.pop((namespace, tier), None)

    def observation(self, namespace: str, tier: str) -> SLOObservation:
        got = self.seen.get((namespace, tier))
        if got is not None:
            return got
        return SLOObservation(error=signals.NO_PROMETHEUS) if self.prom is None else SLOObservation()

    async def observe(self) -> Iterable[Key]:
        if self.prom is None:
            return ()
        store = self.m.store
        parsed = (store.parsed("InferenceTier", o) for o in store.all("InferenceTier"))
        tiers = [t for t in parsed if isinstance(t, InferenceTier)]
        try:
            active: set[tuple[str, str]] = set()
            for w in {t.spec.slo.window_seconds for t in tiers}:
                active |= await signals.active_tiers(self.prom, w)
        except signals.PrometheusUnavailableError as e:
            gone = SLOObservation(error=str(e))
            return [k for t in tiers if (k := self._set(t, gone))]
        changed: list[Key] = []
        for t in tiers:
            scope = self.m.scope(t, None)
            if not any((c, t.name) in active for c in scope.callers):
                obs = SLOObservation()
            else:
                obs = await signals.observe_slo(self.prom, t.spec.slo, scope)
            if k := self._set(t, obs):
                changed.append(k)
        return changed

    def _set(self, t: InferenceTier, obs: SLOObservation) -> Key | None:
        key = (t.namespace, t.name)
        if self.seen.get(key) == obs:
            return None
        self.seen[key] = obs
        return "tier", t.namespace, t.name
