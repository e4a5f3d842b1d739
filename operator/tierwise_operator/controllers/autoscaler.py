"""The built-in SLO-aware autoscaler, as an observer: each pass reads every Builtin tier's load
from Prometheus and decides its self-hosted backends' replicas (scaling.py, pure). The tier
controller applies them with the rest of the tier's children; this module writes nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from tierwise.api.resources import InferenceTier
from tierwise.api.tier import AutoscalingMode, ReplicaRange
from tierwise.naming import backend_service
from tierwise_operator import children, scaling, signals
from tierwise_operator.controllers.base import Key, Obj
from tierwise_operator.manager import Manager

log = logging.getLogger("tierwise.operator")
BackendKey = tuple[str, str, str]  # (namespace, tier, backend)


@dataclass
class BackendScaling:
    history: scaling.History = field(default_factory=scaling.History)
    decision: scaling.Decision | None = None


class Autoscaler:
    name = "autoscaler"

    def __init__(self, m: Manager) -> None:
        self.m = m
        self.interval = m.config.autoscale_interval
        # Set when a backend appears that has not been judged yet: its first decision (and the
        # status it implies) should not wait for the next tick.
        self.wake = asyncio.Event()
        self.prom = m.prometheus(self.name)
        self.backends: dict[BackendKey, BackendScaling] = {}

    def forget(self, namespace: str, tier: str) -> None:
        for k in [k for k in self.backends if k[:2] == (namespace, tier)]:
            del self.backends[k]

    def judged(self, namespace: str, tier: str, backend: str) -> bool:
        return (namespace, tier, backend) in self.backends

    def decisions(self, namespace: str, tier: str) -> dict[str, scaling.Decision]:
        return {k[2]: s.decision for k, s in self.backends.items() if k[:2] == (namespace, tier) and s.decision}

    def replicas_for(self, tier: InferenceTier) -> dict[str, int]:
        """The replicas to apply for each self-hosted backend (Builtin and None modes)."""
        a = tier.spec.autoscaling
        out: dict[str, int] = {}
        for b, d in children.self_hosted(tier.spec):
            if a.mode is AutoscalingMode.NONE:
                out[b.name] = d.replicas.min
                continue
            state = self.backends.get((tier.namespace, tier.name, b.name))
            if state is not None and state.decision is not None:
                out[b.name] = state.decision.replicas
                continue
            live = self.m.store.get("Deployment", tier.namespace, backend_service(tier.name, b.name))
            low = scaling.floor(a, d.replicas, self.m.clock(), idle=None)
            current = (live or {}).get("spec", {}).get("replicas")
            out[b.name] = low if current is None else min(max(int(current), low), d.replicas.max)
        return out

    async def observe(self) -> Iterable[Key]:
        """One pass over every Builtin tier's self-hosted backends."""
        now, clock = self.m.clock(), asyncio.get_running_loop().time()
        changed: list[Key] = []
        for tier in self.m.store.tiers():
            if tier.spec.autoscaling.mode is not AutoscalingMode.BUILTIN:
                continue
            for b, d in children.self_hosted(tier.spec):
                live = self.m.store.get("Deployment", tier.namespace, backend_service(tier.name, b.name))
                if live is not None and await self._scale(tier, b.name, d.replicas, live, now=now, clock=clock):
                    changed.append(("tier", tier.namespace, tier.name))
        return changed

    async def _scale(
        self, tier: InferenceTier, backend: str, bounds: ReplicaRange, live: Obj, *, now: datetime, clock: float
    ) -> bool:
        a = tier.spec.autoscaling
        current = int((live.get("spec") or {}).get("replicas") or 0)
        key = (tier.namespace, tier.name, backend)
        state = self.backends.get(key)
        if state is None:
            # First sight (or a restart): what runs now counts as a recommendation, so nothing
            # is scaled down before a whole stabilisation window of real observations.
            state = self.backends[key] = BackendScaling()
            state.history.add(clock, current, a.scale_down_stabilization_seconds)
        obs = await signals.observe_load(self.prom, a, tier.spec.slo, self.m.scope(tier, backend))
        decision = scaling.decide(a, bounds, current, obs, state.history, now=now, clock=clock)
        before, state.decision = state.decision, decision
        blind_changed = before is None or before.metrics_available != decision.metrics_available
        if decision.replicas != current:
            log.info("%s/%s %s: %d -> %d (%s)", *key, current, decision.replicas, decision.reason)
            self.m.metrics.scale_decisions.labels("up" if decision.replicas > current else "down").inc()
        return decision.replicas != current or blind_changed
