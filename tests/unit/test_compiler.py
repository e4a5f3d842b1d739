"""compile(resources) -> Policy, and the cross-object problems it reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cases import budget, cache, tier
from tierwise.api import Namespace, parse_object
from tierwise.compiler import CompileError, compile
from tierwise.loader import load

ROOT = Path(__file__).resolve().parents[2]


def objs(*docs: dict[str, Any], namespace: str = "team-a") -> list[Any]:
    out = []
    for d in docs:
        d["metadata"].setdefault("namespace", namespace)
        parsed = parse_object(d)
        assert parsed is not None and not isinstance(parsed, Exception), parsed
        out.append(parsed)
    return out


def problems(*docs: dict[str, Any], **kw: Any) -> list[str]:
    with pytest.raises(CompileError) as e:
        compile(objs(*docs), **kw)
    return [str(p) for p in e.value.problems]


def test_quickstart_compiles() -> None:
    loaded = load(ROOT / "examples" / "quickstart")
    assert loaded.problems == []
    policy = compile(loaded.resources, namespaces=loaded.namespaces)
    assert policy.namespace == "default"
    assert sorted(policy.tiers) == ["bronze", "gold", "silver"]
    assert policy.default_tier == "bronze"
    assert policy.tiers["gold"].fallback_chain == ["silver", "bronze"]
    assert [b.name for b in policy.budgets] == ["team-monthly", "tenant-acme-daily"]
    assert [c.name for c in policy.cache_policies] == ["deterministic"]
    assert policy.hash.startswith("sha256:")


def test_hash_depends_on_content_only() -> None:
    a = compile(objs(tier("gold"), tier("silver")))
    b = compile(objs(tier("silver"), tier("gold")))
    assert a.hash == b.hash
    c = compile(objs(tier("gold", priority=11), tier("silver")))
    assert c.hash != a.hash


def test_unknown_fallback_tier() -> None:
    assert problems(tier("gold", fallback={"tier": "platinum"})) == [
        'InferenceTier team-a/gold: spec.fallback.tier: tier "platinum" does not exist in namespace team-a'
    ]


def test_fallback_cycle_reported_once() -> None:
    got = problems(
        tier("gold", fallback={"tier": "silver"}),
        tier("silver", fallback={"tier": "bronze"}),
        tier("bronze", fallback={"tier": "gold"}),
    )
    assert got == [
        "InferenceTier team-a/bronze: spec.fallback.tier: fallback cycle: bronze -> gold -> silver -> bronze"
    ]


def test_promotion_cycle() -> None:
    got = problems(tier("gold", promotion={"borrowFrom": "silver"}), tier("silver", promotion={"borrowFrom": "gold"}))
    assert got == ["InferenceTier team-a/gold: spec.promotion.borrowFrom: promotion cycle: gold -> silver -> gold"]


def test_chain_without_cycle_is_fine() -> None:
    p = compile(
        objs(tier("gold", fallback={"tier": "silver"}), tier("silver", fallback={"tier": "bronze"}), tier("bronze"))
    )
    assert p.tiers["gold"].fallback_chain == ["silver", "bronze"]
    assert p.tiers["bronze"].fallback_chain == []


def test_budget_and_cache_naming_unknown_tiers() -> None:
    got = problems(
        tier("gold"),
        budget(
            selector={"tiers": ["gold", "platinum"]},
            thresholds=[{"percent": 80, "action": "Downgrade", "downgradeTo": "tin"}],
        ),
        cache(selector={"tiers": ["copper"]}, similarity={"enabled": True, "embeddingsTier": "lead"}),
    )
    assert got == [
        'CostBudget team-a/monthly: spec.selector.tiers[1]: tier "platinum" does not exist in namespace team-a',
        'CostBudget team-a/monthly: spec.thresholds[0].downgradeTo: tier "tin" does not exist in namespace team-a',
        'CachePolicy team-a/cache: spec.selector.tiers[0]: tier "copper" does not exist in namespace team-a',
        'CachePolicy team-a/cache: spec.similarity.embeddingsTier: tier "lead" does not exist in namespace team-a',
    ]


def test_only_the_platform_namespace_governs_others() -> None:
    got = problems(
        tier("gold", access={"namespaces": {"names": ["team-b"]}}),
        budget(selector={"namespaces": {"selector": {}}}),
    )
    assert got == [
        "InferenceTier team-a/gold: spec.access.namespaces: only objects in the platform namespace tierwise-system "
        "may select other namespaces",
        "CostBudget team-a/monthly: spec.selector.namespaces: only objects in the platform namespace tierwise-system "
        "may select other namespaces",
    ]


def test_naming_its_own_namespace_is_not_reaching_out() -> None:
    compile(objs(tier("gold", access={"namespaces": {"names": ["team-a"]}, "defaultFor": {"names": ["team-a"]}})))


def test_two_default_tiers_conflict() -> None:
    got = problems(
        tier("gold", access={"defaultFor": {"names": ["team-a"]}}),
        tier("silver", access={"defaultFor": {"names": ["team-a"]}}),
    )
    assert got == [
        "InferenceTier team-a/gold: spec.access.defaultFor: "
        "namespace team-a has more than one default tier: gold, silver"
    ]


def test_duplicates_are_reported() -> None:
    assert problems(tier("gold"), tier("gold")) == ["InferenceTier team-a/gold: metadata.name: defined more than once"]


def test_platform_tiers_reach_selected_namespaces_only() -> None:
    shared = tier("shared", access={"namespaces": {"selector": {"matchLabels": {"llm": "on"}}}})
    shared["metadata"]["namespace"] = "tierwise-system"
    own = tier("own", fallback={"tier": "shared"})
    resources = objs(shared, own)
    labels = [Namespace("team-a", {"llm": "on"}), Namespace("team-b", {})]
    a = compile(resources, namespace="team-a", namespaces=labels)
    assert sorted(a.tiers) == ["own", "shared"] and a.tiers["shared"].namespace == "tierwise-system"
    b = compile(resources[:1], namespace="team-b", namespaces=labels)
    assert b.tiers == {}
    # A team whose namespace lacks the label cannot fall back to the shared tier.
    with pytest.raises(CompileError, match='tier "shared" does not exist in namespace team-a'):
        compile(resources, namespace="team-a", namespaces=[Namespace("team-a", {})])


def test_own_tier_shadows_platform_tier_of_same_name() -> None:
    shared = tier("gold", priority=1, access={"namespaces": {"names": ["team-a"]}})
    shared["metadata"]["namespace"] = "tierwise-system"
    p = compile(objs(shared, tier("gold", priority=7)), namespace="team-a")
    assert p.tiers["gold"].namespace == "team-a" and p.tiers["gold"].spec.priority == 7


def test_platform_budget_applies_to_selected_namespaces() -> None:
    b = budget("all", selector={"namespaces": {"names": ["team-a"]}})
    b["metadata"]["namespace"] = "tierwise-system"
    p = compile(objs(b, tier("gold")), namespace="team-a")
    assert [(x.namespace, x.name) for x in p.budgets] == [("tierwise-system", "all")]
    assert (
        compile(
            objs(
                b,
                tier(
                    "gold",
                ),
            ),
            namespace="team-c",
        ).budgets
        == []
    )


def test_budgets_that_contradict_each_other_over_the_same_scope() -> None:
    # Same namespace, tenants, tiers and period, different limits: which one holds is undecidable.
    assert problems(budget("a", limit={"usd": 100}), budget("b", limit={"usd": 50})) == [
        "CostBudget team-a/b: spec.selector: counts the same traffic over the same monthly period as "
        "CostBudget team-a/a with different limits or thresholds; merge them, narrow one's selector, "
        "or set dryRun on one"
    ]
    # Naming its own namespace is the same scope as not selecting at all.
    assert len(problems(budget("a"), budget("b", selector={"namespaces": {"names": ["team-a"]}}, limit={"usd": 9})))


@pytest.mark.parametrize(
    "second",
    [
        budget("b", period="Daily", limit={"usd": 5}),  # another period: nested limits
        budget("b", selector={"tenants": ["acme"]}, limit={"usd": 5}),  # narrower traffic
        budget("b", selector={"tiers": ["gold"]}, limit={"usd": 5}),
        budget("b", limit={"usd": 5}, dryRun=True),  # a budget being tried out never acts
        budget("b"),  # identical terms: the same answer twice, no contradiction
    ],
)
def test_budgets_that_do_not_contradict(second: dict[str, Any]) -> None:
    compile(objs(tier("gold"), budget("a"), second))


def test_what_the_cluster_adds_does_not_change_the_policy() -> None:
    """A GitOps diff of compiled Policies shows nothing when nothing changed: generations and uids
    (set by the API server, absent from Git) are not part of the Policy or its hash."""
    local = compile(objs(tier("gold"), budget(), cache()))
    served = [tier("gold"), budget(), cache()]
    for i, d in enumerate(served):
        d["metadata"].update(generation=7 + i, uid=f"uid-{i}")
    cluster = compile(objs(*served))
    assert cluster.wire() == local.wire() and cluster.hash == local.hash
    # A change of a cache policy's spec is seen (its revision is part of the cache key).
    changed = compile(objs(tier("gold"), budget(), cache(ttlSeconds=60)))
    assert changed.cache_policies[0].revision != local.cache_policies[0].revision


@pytest.mark.parametrize("bad", ["Mars/Olympus_Mons", "UTC+25"])
def test_time_zones_outside_the_iana_database_are_problems_wherever_they_appear(bad: str) -> None:
    schedule = {"name": "office", "start": "08:00", "end": "18:00", "minReplicas": 1, "timeZone": bad}
    found = problems(tier("gold", autoscaling={"schedules": [schedule]}), budget(timeZone=bad))
    assert [p.split(": ")[1] for p in found] == ["spec.autoscaling.schedules[0].timeZone", "spec.timeZone"]
    assert all("not an IANA time zone" in p for p in found)
