"""compile(resources) -> Policy: the one place where the three resources become enforceable policy.

Everything here is pure: the operator feeds it objects from the API server, `tierwise compile` and
the standalone gateway feed it YAML files. Problems across objects (unknown tiers, cycles, reach
into other namespaces, budgets that contradict each other) are collected, never raised one at a
time, so a user sees them all at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tierwise.api.common import ApiModel, NamespaceSelection
from tierwise.api.resources import AnyResource, CachePolicy, CostBudget, InferenceTier, Namespace, Problem
from tierwise.periods import zone
from tierwise.policy import Policy, PolicyBudget, PolicyCache, PolicyTier, Source

DEFAULT_PLATFORM_NAMESPACE = "tierwise-system"
# A namespace's choice for requests naming a model none of its tiers serves: "refuse" (404), or
# anything else / absent: served by the default tier, with a header naming the substitution.
UNKNOWN_MODEL_LABEL = "tierwise.dev/unknown-model"


class CompileError(Exception):
    """The resources do not compile; `problems` lists every reason."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = list(problems)


@dataclass
class _World:
    """Resources indexed the ways the checks need them."""

    platform: str
    tiers: list[InferenceTier] = field(default_factory=list)
    budgets: list[CostBudget] = field(default_factory=list)
    caches: list[CachePolicy] = field(default_factory=list)
    labels: dict[str, Mapping[str, str]] = field(default_factory=dict)
    # Filled on first use: the world is read-only once built, and checks ask per object.
    _visible: dict[str, dict[str, InferenceTier]] = field(default_factory=dict)
    _by_namespace: dict[str, list[InferenceTier]] | None = None

    def namespaces(self) -> list[str]:
        names = {r.namespace for r in (*self.tiers, *self.budgets, *self.caches)} | set(self.labels)
        return sorted(names)

    def selection_matches(self, sel: NamespaceSelection, namespace: str) -> bool:
        return sel.matches(namespace, self.labels.get(namespace, {}))

    def visible_tiers(self, namespace: str) -> dict[str, InferenceTier]:
        """Tiers a namespace may use: its own, and the platform's that grant it access.

        A namespace's own tier shadows a platform tier of the same name, so a team can refine a
        shared tier without asking the platform team.
        """
        cached = self._visible.get(namespace)
        if cached is not None:
            return cached
        by_ns = self._tiers_by_namespace()
        out: dict[str, InferenceTier] = {}
        if namespace != self.platform:
            for t in by_ns.get(self.platform, ()):
                access = t.spec.access.namespaces
                if access is not None and self.selection_matches(access, namespace):
                    out.setdefault(t.name, t)
        for t in by_ns.get(namespace, ()):
            out[t.name] = t
        self._visible[namespace] = out
        return out

    def _tiers_by_namespace(self) -> dict[str, list[InferenceTier]]:
        # Indexed once: asked per namespace, a scan of every tier made the check quadratic.
        if self._by_namespace is None:
            self._by_namespace = {}
            for t in self.tiers:
                self._by_namespace.setdefault(t.namespace, []).append(t)
        return self._by_namespace

    def all_tier_names(self) -> set[str]:
        return {t.name for t in self.tiers}


def _check_reach(world: _World, obj: AnyResource, sel: NamespaceSelection | None, path: str) -> list[Problem]:
    if obj.namespace != world.platform and sel is not None and sel.reaches_beyond(obj.namespace):
        return [
            Problem(
                obj.ref,
                path,
                f"only objects in the platform namespace {world.platform} may select other namespaces",
                about="reach",
            )
        ]
    return []


def _tier_known(world: _World, obj: AnyResource, name: str) -> bool:
    # Objects in the platform namespace that select other namespaces may name any tier those
    # namespaces can see; everyone else names tiers visible in its own namespace.
    if obj.namespace == world.platform:
        return name in world.all_tier_names()
    return name in world.visible_tiers(obj.namespace)


def _unknown_tier(obj: AnyResource, path: str, name: str) -> Problem:
    return Problem(
        obj.ref, path, f'tier "{name}" does not exist in namespace {obj.namespace}', dangling=True, about="unknown tier"
    )


def _edges(world: _World, kind: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(namespace, tier) -> (namespace, next tier) along fallback or promotion, where resolvable."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for t in world.tiers:
        target = (
            t.spec.fallback.tier
            if kind == "fallback" and t.spec.fallback
            else t.spec.promotion.borrow_from
            if kind == "promotion" and t.spec.promotion
            else None
        )
        if target is None:
            continue
        resolved = world.visible_tiers(t.namespace).get(target)
        if resolved is not None:
            out[(t.namespace, t.name)] = (resolved.namespace, resolved.name)
    return out


def _cycles(edges: Mapping[tuple[str, str], tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Every cycle of a graph where each node has at most one successor, each reported once."""
    found: list[list[tuple[str, str]]] = []
    seen: set[tuple[str, str]] = set()
    for start in sorted(edges):
        path: list[tuple[str, str]] = []
        node: tuple[str, str] | None = start
        while node is not None and node not in seen and node not in path:
            path.append(node)
            node = edges.get(node)
        if node is not None and node in path:
            cycle = path[path.index(node) :]
            first = min(cycle)
            i = cycle.index(first)
            found.append(cycle[i:] + cycle[:i])
        seen.update(path)
    return found


def _check_graph(world: _World, kind: str, path: str, verb: str) -> list[Problem]:
    problems = []
    by_key = {(t.namespace, t.name): t for t in world.tiers}
    for cycle in _cycles(_edges(world, kind)):
        names = " -> ".join(n for _, n in [*cycle, cycle[0]])
        problems.append(Problem(by_key[cycle[0]].ref, path, f"{verb} cycle: {names}", about=f"{verb} cycle"))
    return problems


def _check_tier(world: _World, t: InferenceTier) -> list[Problem]:
    problems = _check_reach(world, t, t.spec.access.namespaces, "spec.access.namespaces")
    problems += _check_reach(world, t, t.spec.access.default_for, "spec.access.defaultFor")
    visible = world.visible_tiers(t.namespace)
    if t.spec.fallback and t.spec.fallback.tier not in visible:
        problems.append(_unknown_tier(t, "spec.fallback.tier", t.spec.fallback.tier))
    if t.spec.promotion and t.spec.promotion.borrow_from not in visible:
        problems.append(_unknown_tier(t, "spec.promotion.borrowFrom", t.spec.promotion.borrow_from))
    for i, s in enumerate(t.spec.autoscaling.schedules):
        problems += _check_zone(t, f"spec.autoscaling.schedules[{i}].timeZone", s.time_zone)
    return problems


def _check_zone(obj: AnyResource, field: str, name: str) -> list[Problem]:
    # CEL cannot know the zone list; the compiler (tierwise compile, the webhook, the operator) can.
    try:
        zone(name)
    except ValueError as e:
        return [Problem(obj.ref, field, str(e), about="time zone")]
    return []


def _check_selector(world: _World, obj: CostBudget | CachePolicy) -> list[Problem]:
    problems = _check_reach(world, obj, obj.spec.selector.namespaces, "spec.selector.namespaces")
    for i, name in enumerate(obj.spec.selector.tiers):
        if not _tier_known(world, obj, name):
            problems.append(_unknown_tier(obj, f"spec.selector.tiers[{i}]", name))
    return problems


def _check_cache(world: _World, c: CachePolicy) -> list[Problem]:
    problems = _check_selector(world, c)
    emb = c.spec.similarity.embeddings_tier
    if c.spec.similarity.enabled and emb is not None and not _tier_known(world, c, emb):
        problems.append(_unknown_tier(c, "spec.similarity.embeddingsTier", emb))
    return problems


def _check_budget(world: _World, b: CostBudget) -> list[Problem]:
    problems = _check_selector(world, b) + _check_zone(b, "spec.timeZone", b.spec.time_zone)
    for i, th in enumerate(b.spec.thresholds):
        if th.downgrade_to is not None and not _tier_known(world, b, th.downgrade_to):
            problems.append(_unknown_tier(b, f"spec.thresholds[{i}].downgradeTo", th.downgrade_to))
    return problems


def _budget_scope(b: CostBudget) -> tuple[object, ...]:
    """What a budget counts, normalised so two spellings of the same traffic compare equal.

    The budget's own namespace is part of it: a platform budget capping a team and the team's own
    budget stack (both apply), they do not contradict each other.
    """
    sel = b.spec.selector
    ns = sel.namespaces
    where: object = (
        (frozenset({b.namespace}), None)
        if ns is None or (ns.selector is None and set(ns.names) == {b.namespace})
        else (frozenset(ns.names), ns.selector.model_dump_json() if ns.selector else None)
    )
    return b.namespace, where, frozenset(sel.tenants), frozenset(sel.tiers), b.spec.period


def _budget_terms(b: CostBudget) -> tuple[object, ...]:
    s = b.spec
    return s.time_zone, s.limit, s.per_request_max, tuple(s.thresholds)


def _check_budget_conflicts(world: _World) -> list[Problem]:
    """Two enforcing budgets counting exactly the same traffic over the same period, with different
    limits or actions, contradict each other: each request would be judged twice, differently."""
    problems = []
    first: dict[tuple[object, ...], CostBudget] = {}
    for b in sorted(world.budgets, key=lambda b: (b.namespace, b.name)):
        if b.spec.dry_run:
            continue
        other = first.setdefault(_budget_scope(b), b)
        if other is not b and _budget_terms(other) != _budget_terms(b):
            problems.append(
                Problem(
                    b.ref,
                    "spec.selector",
                    f"counts the same traffic over the same {b.spec.period.value.lower()} period as "
                    f"{other.ref} with different limits or thresholds; merge them, narrow one's selector, "
                    "or set dryRun on one",
                    about="contradicting budgets",
                )
            )
    return problems


def _default_tiers(world: _World, namespace: str) -> list[InferenceTier]:
    return sorted(
        (
            t
            for t in world.visible_tiers(namespace).values()
            if (t.spec.access.default and t.namespace == namespace)
            or (t.spec.access.default_for is not None and world.selection_matches(t.spec.access.default_for, namespace))
        ),
        key=lambda t: t.name,
    )


def _check_defaults(world: _World) -> list[Problem]:
    problems = []
    for ns in world.namespaces():
        defaults = _default_tiers(world, ns)
        if len(defaults) > 1:
            names = ", ".join(t.name for t in defaults)
            problems.append(
                Problem(
                    defaults[0].ref,
                    "spec.access.defaultFor",
                    f"namespace {ns} has more than one default tier: {names}",
                    about=f"defaults of {ns}",
                )
            )
    return problems


def _check_duplicates(resources: Sequence[AnyResource]) -> list[Problem]:
    seen: set[str] = set()
    problems = []
    for r in resources:
        if r.ref in seen:
            problems.append(Problem(r.ref, "metadata.name", "defined more than once", about="duplicate"))
        seen.add(r.ref)
    return problems


def check(world: _World, resources: Sequence[AnyResource]) -> list[Problem]:
    """Every cross-object problem of a set of resources."""
    problems = _check_duplicates(resources)
    for t in world.tiers:
        problems += _check_tier(world, t)
    for b in world.budgets:
        problems += _check_budget(world, b)
    for c in world.caches:
        problems += _check_cache(world, c)
    problems += _check_graph(world, "fallback", "spec.fallback.tier", "fallback")
    problems += _check_graph(world, "promotion", "spec.promotion.borrowFrom", "promotion")
    problems += _check_defaults(world)
    problems += _check_budget_conflicts(world)
    return problems


def _fallback_chain(edges: Mapping[tuple[str, str], tuple[str, str]], tier: InferenceTier) -> list[str]:
    chain: list[str] = []
    node = edges.get((tier.namespace, tier.name))
    while node is not None and node[1] not in chain and node != (tier.namespace, tier.name):
        chain.append(node[1])
        node = edges.get(node)
    return chain


def _applies(world: _World, obj: CostBudget | CachePolicy, namespace: str) -> bool:
    if obj.namespace == namespace:
        return True
    sel = obj.spec.selector.namespaces
    return obj.namespace == world.platform and sel is not None and world.selection_matches(sel, namespace)


def build_world(
    resources: Iterable[AnyResource],
    namespaces: Iterable[Namespace] = (),
    platform_namespace: str = DEFAULT_PLATFORM_NAMESPACE,
) -> _World:
    world = _World(platform=platform_namespace, labels={n.name: n.labels for n in namespaces})
    for r in resources:
        if isinstance(r, InferenceTier):
            world.tiers.append(r)
        elif isinstance(r, CostBudget):
            world.budgets.append(r)
        else:
            world.caches.append(r)
    return world


def _revision(spec: ApiModel) -> str:
    canonical = json.dumps(spec.wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def compile_world(world: _World, namespace: str) -> Policy:
    """The Policy of one namespace of an already checked world."""
    tiers = world.visible_tiers(namespace)
    defaults = _default_tiers(world, namespace)
    budgets = sorted((b for b in world.budgets if _applies(world, b, namespace)), key=lambda b: (b.namespace, b.name))
    caches = sorted((c for c in world.caches if _applies(world, c, namespace)), key=lambda c: (c.namespace, c.name))
    fallback_edges = _edges(world, "fallback")
    used: list[AnyResource] = [*sorted(tiers.values(), key=lambda t: (t.namespace, t.name)), *budgets, *caches]
    return Policy(
        namespace=namespace,
        platform_namespace=world.platform,
        default_tier=defaults[0].name if defaults else None,
        tiers={
            name: PolicyTier(
                name=name, namespace=t.namespace, spec=t.spec, fallback_chain=_fallback_chain(fallback_edges, t)
            )
            for name, t in sorted(tiers.items())
        },
        unavailable_tiers=sorted({t.name for t in world.tiers if t.namespace == world.platform} - set(tiers)),
        refuse_unknown_models=world.labels.get(namespace, {}).get(UNKNOWN_MODEL_LABEL) == "refuse" or None,
        budgets=[PolicyBudget(name=b.name, namespace=b.namespace, spec=b.spec) for b in budgets],
        cache_policies=[
            PolicyCache(name=c.name, namespace=c.namespace, revision=_revision(c.spec), spec=c.spec) for c in caches
        ],
        sources=[Source(kind=r.kind_name, namespace=r.namespace, name=r.name) for r in used],
    ).sealed()


def compile(
    resources: Sequence[AnyResource],
    namespace: str | None = None,
    namespaces: Iterable[Namespace] = (),
    platform_namespace: str = DEFAULT_PLATFORM_NAMESPACE,
) -> Policy:
    """Compile the Policy of `namespace` (by default the one namespace the resources live in).

    Raises CompileError listing every cross-object problem of the whole set, not just of the
    objects that reach this namespace: a broken set is never partly deployed.
    """
    world = build_world(resources, namespaces, platform_namespace)
    problems = check(world, resources)
    if problems:
        raise CompileError(problems)
    if namespace is None:
        found = sorted({r.namespace for r in resources} - {platform_namespace}) or [platform_namespace]
        if len(found) > 1:
            raise ValueError(f"resources span namespaces {', '.join(found)}: say which namespace to compile")
        namespace = found[0]
    return compile_world(world, namespace)
