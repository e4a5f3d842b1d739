"""One tier: its children (a Deployment, Services and a PDB per self-hosted backend, autoscaling
objects) computed by pure functions and written only where the live object no longer covers them,
and its status, the one writer of it, from what the autoscaler and the SLA observer saw."""

from __future__ import annotations

from collections.abc import Iterable

from tierwise.api.resources import InferenceTier, Problem
from tierwise.api.tier import AutoscalingMode
from tierwise.naming import MANAGED_BY, MANAGED_BY_LABEL, TIER_LABEL, backend_service
from tierwise_operator import children
from tierwise_operator.controllers.autoscaler import Autoscaler
from tierwise_operator.controllers.base import Key, Obj, Queued
from tierwise_operator.controllers.sla import SLAObserver
from tierwise_operator.drift import covers
from tierwise_operator.kube import KINDS, SCALED_OBJECT, TIER, ApiError
from tierwise_operator.manager import Derived, Manager, now_iso
from tierwise_operator.status import BackendState, Observed, condition, merge_conditions, tier_status
from tierwise_operator.steering import DECLARED, TierSteer, describe

NAME = "tier"
OWNED = tuple(k.kind for k in children.OWNED_KINDS)
# A short settle time: `kubectl apply -f` of several tiers arrives as a burst, and a tier judged
# before the tier it falls back to has arrived would flap to invalid.
SETTLE_SECONDS = 0.3


class TierController:
    name = NAME

    def __init__(self, m: Manager, autoscaler: Autoscaler, sla: SLAObserver) -> None:
        self.m = m
        self.autoscaler = autoscaler
        self.sla = sla
        # The steering last written into each tier's status: a change posts an Event.
        self.reported: dict[tuple[str, str], TierSteer] = {}

    def keys_for(self, kind: str, obj: Obj, deleted: bool) -> Iterable[Queued]:
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name", ""))
        if kind == "InferenceTier":
            if deleted:
                self.autoscaler.forget(ns, name)
                self.sla.forget(ns, name)
                self.reported.pop((ns, name), None)
            return (((NAME, ns, name), SETTLE_SECONDS),)
        if kind in OWNED and (tier := (meta.get("labels") or {}).get(TIER_LABEL)):
            return (((NAME, ns, tier), 0.0),)
        return ()

    def all_keys(self) -> Iterable[Key]:
        for obj in self.m.store.all("InferenceTier"):
            yield NAME, obj["metadata"]["namespace"], obj["metadata"]["name"]

    def moved(self, before: Derived, after: Derived) -> Iterable[Key]:
        for t in after.world.tiers:
            ref, key = t.ref, (t.namespace, t.name)
            if before.problems.get(ref) != after.problems.get(ref) or before.callers.get(key) != after.callers.get(key):
                yield NAME, t.namespace, t.name

    async def reconcile(self, namespace: str, name: str) -> None:
        m = self.m
        obj = m.store.get("InferenceTier", namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return  # owner references let the garbage collector remove the children
        parsed = m.store.parsed("InferenceTier", obj)
        generation = int(obj["metadata"].get("generation") or 0)
        if isinstance(parsed, Problem):
            await self._write_status(obj, None, Observed(generation, [], problems=[str(parsed)]))
            return
        if not isinstance(parsed, InferenceTier):
            return
        tier = parsed
        problems = list(m.derived().problems.get(tier.ref, []))
        if tier.spec.autoscaling.mode is AutoscalingMode.KEDA and not m.keda_installed:
            m.keda_installed = await m.kube.serves(SCALED_OBJECT)  # installed since we started?
        rendering = children.Rendering(m.config.sidecar_image, m.config.prometheus_url, m.keda_installed)
        ref = children.TierRef(namespace, name, str(obj["metadata"]["uid"]), tier.spec)
        scopes = {b.name: m.scope(tier, b.name) for b, _ in children.self_hosted(tier.spec)}
        replicas = self.autoscaler.replicas_for(tier)
        try:
            wanted = children.desired(ref, replicas, rendering, scopes)
        except children.SpecError as e:
            problems.append(str(e))
        else:
            await self._converge(tier, obj, wanted)
            if tier.spec.autoscaling.mode is AutoscalingMode.BUILTIN and not all(
                self.autoscaler.judged(namespace, name, b) for b in scopes
            ):
                self.autoscaler.wake.set()
        seen = self._observed(tier, generation, problems, replicas)
        await self._write_status(obj, tier, seen)
        before = self.reported.get((namespace, name), DECLARED)
        for type_, change in describe(tier.spec, before, seen.steer):
            await m.event(obj, type_, "Steered", change)
        self.reported[(namespace, name)] = seen.steer

    async def _converge(self, tier: InferenceTier, owner: Obj, wanted: list[Obj]) -> None:
        m = self.m
        keep = set()
        for want in wanted:
            kind = want["kind"]
            name = want["metadata"]["name"]
            keep.add((kind, name))
            live = m.store.get(kind, tier.namespace, name)
            if live is not None and covers(live, want):
                continue
            new = await self._apply(want)
            m.store.put(kind, new)
            if live is None:
                await m.event(owner, "Normal", "Created", f"created {kind} {name}")
            else:
                old_n = (live.get("spec") or {}).get("replicas")
                new_n = want.get("spec", {}).get("replicas")
                if kind == "Deployment" and old_n != new_n and new_n is not None:
                    await m.event(owner, "Normal", "Scaled", f"scaled {name} from {old_n} to {new_n}")
                else:
                    await m.event(owner, "Normal", "Updated", f"put {kind} {name} back to its declared state")
        for kind in OWNED:
            for live in m.store.owned(kind, tier.namespace, tier.name):
                name = live["metadata"]["name"]
                managed = (live["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
                if managed and (kind, name) not in keep:
                    if await m.kube.delete(KINDS[kind], tier.namespace, name):
                        await m.event(owner, "Normal", "Deleted", f"deleted {kind} {name}: no longer declared")
                    m.store.remove(kind, live)

    async def _apply(self, want: Obj) -> Obj:
        try:
            new: Obj | None = await self.m.kube.apply(want)
        except ApiError as e:
            if e.status != 422:
                raise
            new = None
        if new is None or not covers(new, want):
            # Someone edited a list we own with a plain update (kubectl edit/patch): server-side
            # apply keeps their entry beside ours (e.g. two ports both named http, which is
            # invalid). A merge patch replaces lists wholesale, so the declared state wins.
            new = await self.m.kube.replace_fields(want)
        return new

    def _observed(self, tier: InferenceTier, generation: int, problems: list[str], wanted: dict[str, int]) -> Observed:
        backends = []
        for b in tier.spec.backends:
            if b.deployment is None:
                backends.append(BackendState(b.name, self_hosted=False))
                continue
            live = self.m.store.get("Deployment", tier.namespace, backend_service(tier.name, b.name)) or {}
            st = live.get("status") or {}
            desired = (live.get("spec") or {}).get("replicas", wanted.get(b.name, 0))
            backends.append(
                BackendState(
                    b.name, True, int(desired or 0), int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0)
                )
            )
        decisions = self.autoscaler.decisions(tier.namespace, tier.name)
        return Observed(
            generation=generation,
            backends=backends,
            problems=problems,
            slo=self.sla.observation(tier.namespace, tier.name),
            steer=self.sla.steering(tier.namespace, tier.name),
            scaling={b: dec.reason for b, dec in decisions.items()},
            # Without a Prometheus configured, holding replicas is the setup, not a degradation.
            scaling_blind=self.autoscaler.prom is not None
            and any(not dec.metrics_available for dec in decisions.values()),
        )

    async def _write_status(self, obj: Obj, tier: InferenceTier | None, seen: Observed) -> None:
        old = obj.get("status") or {}
        if tier is None:
            ready = condition("Ready", False, "InvalidSpec", "; ".join(seen.problems), seen.generation)
            conditions = merge_conditions(old.get("conditions", []), [ready], now_iso())
            new: Obj = {"observedGeneration": seen.generation, "conditions": conditions}
        else:
            new = tier_status(tier.spec, seen, old, now_iso())
        await self.m.patch_status(TIER, obj, new)
