"""The reconcilers: level-triggered, keyed, idempotent. Each pass reads the cached world, computes
what should exist (pure functions), writes only the difference, and reports what it saw in status.

Keys: ("tier", namespace, name) for one tier's children and status; ("budget" | "cache", namespace,
name) for whether a CostBudget or CachePolicy compiles (its Ready condition); ("policies", "", "")
for the Policy ConfigMaps of every namespace that needs one. A failure in one key never blocks another;
transient API errors come back with backoff; a spec that cannot be realised is reported in the
tier's conditions and waits for the spec to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tierwise.api.resources import InferenceTier, Problem, object_ref
from tierwise.api.tier import AutoscalingMode, ReplicaRange
from tierwise.compiler import DEFAULT_PLATFORM_NAMESPACE, _World, build_world, check, compile_world
from tierwise.naming import (
    DEFAULT_SIDECAR_IMAGE,
    INJECTION_LABEL,
    INJECTION_VALUES,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POLICY_CONFIGMAP,
    POLICY_HASH_ANNOTATION,
    POLICY_KEY,
    TIER_LABEL,
    backend_service,
)
from tierwise_operator import children, scaling, signals
from tierwise_operator.drift import covers
from tierwise_operator.kube import BUDGET, CACHE, CONFIGMAP, KINDS, SCALED_OBJECT, TIER, ApiError, Kind, Kube, Obj
from tierwise_operator.metrics import OperatorMetrics
from tierwise_operator.promql import Scope
from tierwise_operator.status import (
    BackendState,
    Observed,
    SLOObservation,
    condition,
    merge_conditions,
    merge_patch,
    status_changed,
    tier_status,
    transitions,
    validity_status,
)
from tierwise_operator.store import Store
from tierwise_operator.workqueue import RetryLaterError, WorkQueue

log = logging.getLogger("tierwise.operator")
Key = tuple[str, str, str]
POLICIES: Key = ("policies", "", "")
OWNED = tuple(k.kind for k in children.OWNED_KINDS)
SETTLE_SECONDS = 0.3
# Kinds whose status says only whether they compile, and their work-queue key names.
RULES: dict[str, Kind] = {"budget": BUDGET, "cache": CACHE}
RULE_KEYS = {k.kind: name for name, k in RULES.items()}


@dataclass
class Config:
    platform_namespace: str = DEFAULT_PLATFORM_NAMESPACE
    prometheus_url: str | None = None
    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    autoscale_interval: float = 15.0
    slo_interval: float = 30.0
    workers: int = 4


@dataclass
class Derived:
    """What the whole world implies, computed once per store version."""

    version: int
    world: _World
    problems: dict[str, list[str]]  # object ref -> messages
    callers: dict[tuple[str, str], tuple[str, ...]]  # (tier ns, tier) -> namespaces resolving to it


@dataclass
class BackendScaling:
    history: scaling.History = field(default_factory=scaling.History)
    decision: scaling.Decision | None = None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    def __init__(self, kube: Kube, store: Store, config: Config, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.store = store
        self.config = config
        self.metrics = metrics
        self.prom = signals.Prometheus(config.prometheus_url) if config.prometheus_url else None
        self.queue: WorkQueue[Key] = WorkQueue(self._reconcile, workers=config.workers, on_error=self._failed)
        metrics.queue_depth.set_function(lambda: len(self.queue))
        self.keda_installed = False
        self._derived: Derived | None = None
        self._scaling: dict[tuple[str, str, str], BackendScaling] = {}
        self._slo: dict[tuple[str, str], SLOObservation] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Set when a backend appears that the autoscaler has not judged yet: its first decision
        # (and the status it implies) should not wait for the next tick.
        self._wake_autoscaler = asyncio.Event()
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    # ------------------------------------------------------------ wiring

    def observe(self, kind: str, obj: Obj, deleted: bool) -> None:
        """A watch event: update the cache, queue the keys it affects."""
        changed = self.store.remove(kind, obj) if deleted else self.store.put(kind, obj)
        if not changed:
            return
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name", ""))
        if kind == "InferenceTier":
            # A short settle time: `kubectl apply -f` of several tiers arrives as a burst, and a
            # tier judged before the tier it falls back to has arrived would flap to invalid.
            self.queue.add_after(("tier", ns, name), SETTLE_SECONDS)
            if deleted:
                self._forget(ns, name)
        elif kind in RULE_KEYS:
            self.queue.add_after((RULE_KEYS[kind], ns, name), SETTLE_SECONDS)
        elif kind in OWNED:
            tier = (meta.get("labels") or {}).get(TIER_LABEL)
            if tier:
                self.queue.add(("tier", ns, tier))
        if kind in ("InferenceTier", "CostBudget", "CachePolicy", "Namespace"):
            self.queue.add_after(POLICIES, SETTLE_SECONDS)
        elif kind == "ConfigMap":
            self.queue.add(POLICIES)

    def start(self) -> None:
        self.queue.start()
        self._tasks = [
            asyncio.create_task(self._autoscale_loop(), name="autoscaler"),
            asyncio.create_task(self._every(self.config.slo_interval, self.observe_slos), name="slo"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.stop()

    def requeue_all(self) -> None:
        for kind, key in (("InferenceTier", "tier"), *RULE_KEYS.items()):
            for obj in self.store.all(kind):
                self.queue.add((key, obj["metadata"]["namespace"], obj["metadata"]["name"]))
        self.queue.add(POLICIES)

    async def _every(self, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                log.exception("%s failed; trying again in %.0fs", getattr(job, "__name__", job), interval)

    async def _autoscale_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_autoscaler.wait(), self.config.autoscale_interval)
            self._wake_autoscaler.clear()
            try:
                await self.autoscale()
            except Exception:
                log.exception("autoscaler pass failed; trying again in %.0fs", self.config.autoscale_interval)

    def _failed(self, key: Key, e: BaseException) -> None:
        self.metrics.errors.labels(key[0], type(e).__name__).inc()
        if isinstance(e, (ApiError, RetryLaterError)):
            log.warning("%s: %s (retrying with backoff)", "/".join(k for k in key if k), e)
        else:
            log.error("%s failed", "/".join(k for k in key if k), exc_info=e)

    def _forget(self, ns: str, name: str) -> None:
        for k in [k for k in self._scaling if k[:2] == (ns, name)]:
            del self._scaling[k]
        self._slo.pop((ns, name), None)

    async def _reconcile(self, key: Key) -> None:
        with self.metrics.reconcile_seconds.labels(key[0]).time():
            try:
                if key == POLICIES:
                    await self.reconcile_policies()
                elif key[0] in RULES:
                    await self.reconcile_rule(RULES[key[0]], key[1], key[2])
                else:
                    await self.reconcile_tier(key[1], key[2])
            except ApiError as e:
                if e.transient:
                    raise RetryLaterError(str(e)) from e
                raise

    # ------------------------------------------------------------ the world

    def derived(self) -> Derived:
        d = self._derived
        if d is not None and d.version == self.store.version:
            return d
        resources, parse_problems = self.store.resources()
        world = build_world(resources, self.store.namespaces(), self.config.platform_namespace)
        problems: dict[str, list[str]] = {}
        for p in [*parse_problems, *check(world, resources)]:
            problems.setdefault(p.obj, []).append(f"{p.field}: {p.reason}" if p.field else p.reason)
        callers: dict[tuple[str, str], list[str]] = {}
        for ns in world.namespaces():  # every namespace with objects or labels known
            for name, t in world.visible_tiers(ns).items():
                callers.setdefault((t.namespace, name), []).append(ns)
        d = Derived(self.store.version, world, problems, {k: tuple(v) for k, v in callers.items()})
        before = self._derived
        self._derived = d
        if before is not None:
            # A tier's verdict can change without the tier changing (the tier it falls back to
            # just arrived or went away): revisit every tier whose problems or callers moved.
            for t in world.tiers:
                ref, key = t.ref, (t.namespace, t.name)
                if before.problems.get(ref) != problems.get(ref) or before.callers.get(key) != d.callers.get(key):
                    self.queue.add(("tier", t.namespace, t.name))
            for r in [*world.budgets, *world.caches]:
                if before.problems.get(r.ref) != problems.get(r.ref):
                    self.queue.add((RULE_KEYS[r.kind_name], r.namespace, r.name))
        return d

    def scope(self, tier: InferenceTier, backend: str | None) -> Scope:
        return Scope(tier.name, backend, self.derived().callers.get((tier.namespace, tier.name), ()))

    # ------------------------------------------------------------ tiers

    def replicas_for(self, tier: InferenceTier) -> dict[str, int]:
        """The replicas to apply for each self-hosted backend (Builtin and None modes)."""
        a = tier.spec.autoscaling
        out: dict[str, int] = {}
        for b, d in children.self_hosted(tier.spec):
            if a.mode is AutoscalingMode.NONE:
                out[b.name] = d.replicas.min
                continue
            state = self._scaling.get((tier.namespace, tier.name, b.name))
            if state is not None and state.decision is not None:
                out[b.name] = state.decision.replicas
                continue
            live = self.store.get("Deployment", tier.namespace, backend_service(tier.name, b.name))
            low = scaling.floor(a, d.replicas, self.clock(), idle=None)
            current = (live or {}).get("spec", {}).get("replicas")
            out[b.name] = low if current is None else min(max(int(current), low), d.replicas.max)
        return out

    async def reconcile_tier(self, ns: str, name: str) -> None:
        obj = self.store.get("InferenceTier", ns, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return  # owner references let the garbage collector remove the children
        parsed = self.store.parsed("InferenceTier", obj)
        generation = int(obj["metadata"].get("generation") or 0)
        if isinstance(parsed, Problem):
            await self._write_status(obj, None, Observed(generation, [], problems=[str(parsed)]))
            return
        if not isinstance(parsed, InferenceTier):
            return
        tier = parsed
        d = self.derived()
        problems = list(d.problems.get(tier.ref, []))
        if tier.spec.autoscaling.mode is AutoscalingMode.KEDA and not self.keda_installed:
            self.keda_installed = await self.kube.serves(SCALED_OBJECT)  # installed since we started?
        rendering = children.Rendering(self.config.sidecar_image, self.config.prometheus_url, self.keda_installed)
        ref = children.TierRef(ns, name, str(obj["metadata"]["uid"]), tier.spec)
        scopes = {b.name: self.scope(tier, b.name) for b, _ in children.self_hosted(tier.spec)}
        replicas = self.replicas_for(tier)
        try:
            wanted = children.desired(ref, replicas, rendering, scopes)
        except children.SpecError as e:
            problems.append(str(e))
            wanted = []
        else:
            await self._converge(tier, obj, wanted)
            if tier.spec.autoscaling.mode is AutoscalingMode.BUILTIN and any(
                (ns, name, b) not in self._scaling for b in scopes
            ):
                self._wake_autoscaler.set()
        await self._write_status(obj, tier, self._observed(tier, generation, problems, replicas))

    async def _converge(self, tier: InferenceTier, owner: Obj, wanted: list[Obj]) -> None:
        keep = set()
        for want in wanted:
            kind = want["kind"]
            name = want["metadata"]["name"]
            keep.add((kind, name))
            live = self.store.get(kind, tier.namespace, name)
            if live is not None and covers(live, want):
                continue
            new = await self._apply(want)
            self.store.put(kind, new)
            if live is None:
                await self.event(owner, "Normal", "Created", f"created {kind} {name}")
            else:
                old_n = (live.get("spec") or {}).get("replicas")
                new_n = want.get("spec", {}).get("replicas")
                if kind == "Deployment" and old_n != new_n and new_n is not None:
                    await self.event(owner, "Normal", "Scaled", f"scaled {name} from {old_n} to {new_n}")
                else:
                    await self.event(owner, "Normal", "Updated", f"put {kind} {name} back to its declared state")
        for kind in OWNED:
            for live in self.store.owned(kind, tier.namespace, tier.name):
                name = live["metadata"]["name"]
                managed = (live["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
                if managed and (kind, name) not in keep:
                    if await self.kube.delete(KINDS[kind], tier.namespace, name):
                        await self.event(owner, "Normal", "Deleted", f"deleted {kind} {name}: no longer declared")
                    self.store.remove(kind, live)

    async def _apply(self, want: Obj) -> Obj:
        try:
            new: Obj | None = await self.kube.apply(want)
        except ApiError as e:
            if e.status != 422:
                raise
            new = None
        if new is None or not covers(new, want):
            # Someone edited a list we own with a plain update (kubectl edit/patch): server-side
            # apply keeps their entry beside ours (e.g. two ports both named http, which is
            # invalid). A merge patch replaces lists wholesale, so the declared state wins.
            new = await self.kube.replace_fields(want)
        return new

    def _observed(self, tier: InferenceTier, generation: int, problems: list[str], wanted: dict[str, int]) -> Observed:
        backends = []
        for b in tier.spec.backends:
            if b.deployment is None:
                backends.append(BackendState(b.name, self_hosted=False))
                continue
            live = self.store.get("Deployment", tier.namespace, backend_service(tier.name, b.name)) or {}
            st = live.get("status") or {}
            desired = (live.get("spec") or {}).get("replicas", wanted.get(b.name, 0))
            backends.append(
                BackendState(
                    b.name, True, int(desired or 0), int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0)
                )
            )
        decisions = {
            k[2]: s.decision for k, s in self._scaling.items() if k[:2] == (tier.namespace, tier.name) and s.decision
        }
        slo = self._slo.get((tier.namespace, tier.name))
        if slo is None:
            slo = SLOObservation(error=signals.NO_PROMETHEUS) if self.prom is None else SLOObservation()
        return Observed(
            generation=generation,
            backends=backends,
            problems=problems,
            slo=slo,
            scaling={b: dec.reason for b, dec in decisions.items()},
            # Without a Prometheus configured, holding replicas is the setup, not a degradation.
            scaling_blind=self.prom is not None and any(not dec.metrics_available for dec in decisions.values()),
        )

    async def _write_status(self, obj: Obj, tier: InferenceTier | None, seen: Observed) -> None:
        old = obj.get("status") or {}
        if tier is None:
            ready = condition("Ready", False, "InvalidSpec", "; ".join(seen.problems), seen.generation)
            conditions = merge_conditions(old.get("conditions", []), [ready], now_iso())
            new: Obj = {"observedGeneration": seen.generation, "conditions": conditions}
        else:
            new = tier_status(tier.spec, seen, old, now_iso())
        await self._patch_status(TIER, obj, new)

    async def _patch_status(self, kind: Kind, obj: Obj, new: Obj) -> None:
        """Write `new` as the object's status when it differs, and post events for what turned."""
        old = obj.get("status") or {}
        if not status_changed(old, new):
            return
        meta = obj["metadata"]
        try:
            updated = await self.kube.patch_status(kind, meta["namespace"], meta["name"], merge_patch(old, new))
        except ApiError as e:
            if e.status == 404:
                return
            raise
        self.store.put(kind.kind, updated)
        for type_, reason, message in transitions(old.get("conditions", []), new.get("conditions", [])):
            await self.event(obj, type_, reason, message)

    # ------------------------------------------------------------ budgets and cache policies

    async def reconcile_rule(self, kind: Kind, ns: str, name: str) -> None:
        """Ready says whether the object compiles with the others: with the validating webhook down
        (failurePolicy Ignore) a contradicting budget is admitted, and this is where it shows."""
        obj = self.store.get(kind.kind, ns, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        parsed = self.store.parsed(kind.kind, obj)
        problems = [str(parsed)] if isinstance(parsed, Problem) else self.derived().problems.get(parsed.ref, [])
        generation = int(obj["metadata"].get("generation") or 0)
        await self._patch_status(kind, obj, validity_status(obj.get("status") or {}, problems, generation, now_iso()))

    async def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        try:
            await self.kube.event(obj, type_, reason, message)
        except ApiError as e:  # an event is a courtesy: never fail a reconcile over one
            log.warning("could not post event %s on %s: %s", reason, obj["metadata"].get("name"), e)

    # ------------------------------------------------------------ policies

    def policy_targets(self) -> set[str]:
        """Namespaces that get a Policy ConfigMap: labelled for injection, or an ingress sidecar runs there."""
        out = {
            str(o["metadata"]["name"])
            for o in self.store.all("Namespace")
            if (o["metadata"].get("labels") or {}).get(INJECTION_LABEL) in INJECTION_VALUES
            and not o["metadata"].get("deletionTimestamp")
        }
        for obj in self.store.all("InferenceTier"):
            t = self.store.parsed("InferenceTier", obj)
            if isinstance(t, InferenceTier) and any(d.sidecar for _, d in children.self_hosted(t.spec)):
                out.add(t.namespace)
        return out

    async def reconcile_policies(self) -> None:
        d = self.derived()
        targets = self.policy_targets()
        for ns in sorted(targets):
            policy = compile_world(d.world, ns)
            if any(object_ref(s.kind, s.namespace, s.name) in d.problems for s in policy.sources):
                # Last known good stays in force: a broken object never half-deploys.
                self.metrics.policies_held.labels(ns).set(1)
                continue
            self.metrics.policies_held.labels(ns).set(0)
            text = json.dumps(policy.wire(), sort_keys=True, separators=(",", ":"))
            live = self.store.get("ConfigMap", ns, POLICY_CONFIGMAP)
            if live is not None and (live.get("data") or {}).get(POLICY_KEY) == text:
                ann = (live["metadata"].get("annotations") or {}).get(POLICY_HASH_ANNOTATION)
                if ann == policy.hash:
                    continue
            cm = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": POLICY_CONFIGMAP,
                    "namespace": ns,
                    "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                    "annotations": {POLICY_HASH_ANNOTATION: policy.hash},
                },
                "data": {POLICY_KEY: text},
            }
            try:
                self.store.put("ConfigMap", await self.kube.apply(cm))
            except ApiError as e:
                if e.status == 404 or "being terminated" in e.message:
                    continue  # the namespace is going away
                raise
            log.info("namespace %s: Policy %s written", ns, policy.hash[:19])
        for live in self.store.all("ConfigMap"):
            meta = live["metadata"]
            ours = (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
            if meta["name"] == POLICY_CONFIGMAP and meta.get("namespace") not in targets and ours:
                await self.kube.delete(CONFIGMAP, meta["namespace"], POLICY_CONFIGMAP)
                self.store.remove("ConfigMap", live)

    # ------------------------------------------------------------ autoscaling and SLOs

    async def autoscale(self) -> None:
        """One pass of the built-in autoscaler over every Builtin tier's self-hosted backends."""
        now, clock = self.clock(), asyncio.get_running_loop().time()
        for obj in self.store.all("InferenceTier"):
            tier = self.store.parsed("InferenceTier", obj)
            if not isinstance(tier, InferenceTier) or tier.spec.autoscaling.mode is not AutoscalingMode.BUILTIN:
                continue
            for b, d in children.self_hosted(tier.spec):
                live = self.store.get("Deployment", tier.namespace, backend_service(tier.name, b.name))
                if live is not None:
                    await self._scale_backend(tier, b.name, d.replicas, live, now=now, clock=clock)

    async def _scale_backend(
        self, tier: InferenceTier, backend: str, bounds: ReplicaRange, live: Obj, *, now: datetime, clock: float
    ) -> None:
        a = tier.spec.autoscaling
        current = int((live.get("spec") or {}).get("replicas") or 0)
        key = (tier.namespace, tier.name, backend)
        state = self._scaling.get(key)
        if state is None:
            # First sight (or a restart): what runs now counts as a recommendation, so nothing
            # is scaled down before a whole stabilisation window of real observations.
            state = self._scaling[key] = BackendScaling()
            state.history.add(clock, current, a.scale_down_stabilization_seconds)
        obs = await signals.observe_load(self.prom, a, tier.spec.slo, self.scope(tier, backend))
        decision = scaling.decide(a, bounds, current, obs, state.history, now=now, clock=clock)
        before, state.decision = state.decision, decision
        blind_changed = before is None or before.metrics_available != decision.metrics_available
        if decision.replicas != current:
            log.info("%s/%s %s: %d -> %d (%s)", *key, current, decision.replicas, decision.reason)
            self.metrics.scale_decisions.labels("up" if decision.replicas > current else "down").inc()
        if decision.replicas != current or blind_changed:
            self.queue.add(("tier", tier.namespace, tier.name))

    async def observe_slos(self) -> None:
        if self.prom is None:
            return
        tiers = [
            t
            for o in self.store.all("InferenceTier")
            if isinstance(t := self.store.parsed("InferenceTier", o), InferenceTier)
        ]
        windows = {t.spec.slo.window_seconds for t in tiers}
        try:
            active = (
                set().union(*[await signals.active_tiers(self.prom, w) or set() for w in windows]) if windows else set()
            )
        except signals.PrometheusUnavailableError as e:
            gone = SLOObservation(error=str(e))
            for t in tiers:
                self._set_slo(t, gone)
            return
        for t in tiers:
            scope = self.scope(t, None)
            if not any((c, t.name) in active for c in scope.callers):
                self._set_slo(t, SLOObservation())
                continue
            self._set_slo(t, await signals.observe_slo(self.prom, t.spec.slo, scope))

    def _set_slo(self, t: InferenceTier, obs: SLOObservation) -> None:
        key = (t.namespace, t.name)
        if self._slo.get(key) != obs:
            self._slo[key] = obs
            self.queue.add(("tier", t.namespace, t.name))
