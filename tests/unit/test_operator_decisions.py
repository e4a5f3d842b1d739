"""The operator's decisions, without a cluster: children, drift, autoscaling, status, PromQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tierwise.api.tier import SLO, Autoscaling, InferenceTierSpec, ReplicaRange
from tierwise_operator import children, promql, scaling
from tierwise_operator.drift import covers, quantity
from tierwise_operator.status import (
    BackendState,
    Observed,
    SLOObservation,
    merge_patch,
    status_changed,
    tier_status,
    transitions,
    validity_status,
)

NOON = datetime(2026, 11, 18, 12, 0, tzinfo=UTC)  # a Wednesday


def spec(sidecar: bool = False, **extra: Any) -> InferenceTierSpec:
    return InferenceTierSpec.model_validate(
        {
            "backends": [
                {
                    "name": "llama",
                    "model": "llama",
                    "pricing": {"inputPerMillion": 0.05, "outputPerMillion": 0.15},
                    "deployment": {
                        "image": "vllm:1",
                        "replicas": {"min": 1, "max": 4},
                        "resources": {"limits": {"cpu": "2"}},
                        "sidecar": sidecar,
                    },
                },
                {
                    "name": "api",
                    "model": "gpt-4o-mini",
                    "url": "https://api.openai.com/v1",
                    "pricing": {"inputPerMillion": 0.15, "outputPerMillion": 0.6},
                },
            ],
            **extra,
        }
    )


def ref(s: InferenceTierSpec) -> children.TierRef:
    return children.TierRef("team", "silver", "uid-1", s)


SCOPES = {"llama": promql.Scope("silver", "llama", ("team", "apps"))}


def test_children_per_self_hosted_backend_with_owner_and_labels() -> None:
    objs = children.desired(ref(spec()), {"llama": 2}, children.Rendering(), SCOPES)
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("Deployment", "silver-llama"),
        ("Service", "silver-llama"),
        ("Service", "silver-llama-hl"),
        ("PodDisruptionBudget", "silver-llama"),
    ]
    dep = objs[0]
    assert dep["spec"]["replicas"] == 2
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert dep["spec"]["selector"]["matchLabels"] == {"tierwise.dev/tier": "silver", "tierwise.dev/backend": "llama"}
    assert objs[2]["spec"]["clusterIP"] == "None"


def test_hpa_and_keda_modes_leave_replicas_to_their_autoscaler() -> None:
    hpa_objs = children.desired(ref(spec(autoscaling={"mode": "HPA", "target": 4})), {}, children.Rendering(), SCOPES)
    dep = hpa_objs[0]
    assert "replicas" not in dep["spec"]
    hpa = hpa_objs[-1]
    assert hpa["kind"] == "HorizontalPodAutoscaler"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    metric = hpa["spec"]["metrics"][0]["external"]
    assert metric["metric"]["name"] == "tierwise_backend_in_flight_requests"
    assert metric["metric"]["selector"]["matchExpressions"][0]["values"] == ["apps", "team"]

    keda = spec(
        autoscaling={
            "mode": "KEDA",
            "scaleToZeroAfterIdleSeconds": 600,
            "schedules": [{"name": "nights", "start": "22:00", "end": "06:00", "days": ["Mon"], "minReplicas": 1}],
        }
    )
    r = children.Rendering(prometheus_url="http://prom:9090", keda_installed=True)
    so = children.desired(ref(keda), {}, r, SCOPES)[-1]
    assert so["kind"] == "ScaledObject" and so["spec"]["minReplicaCount"] == 0
    load, cron = so["spec"]["triggers"]
    assert 'tier="silver"' in load["metadata"]["query"] and load["metadata"]["serverAddress"] == "http://prom:9090"
    assert cron["metadata"]["start"] == "0 22 * * 1" and cron["metadata"]["desiredReplicas"] == "1"

    with pytest.raises(children.SpecError, match="KEDA's ScaledObject CRD is not installed"):
        children.desired(ref(keda), {}, children.Rendering(prometheus_url="http://p"), SCOPES)
    with pytest.raises(children.SpecError, match="SLOHeadroom needs Builtin or KEDA"):
        children.desired(
            ref(spec(autoscaling={"mode": "HPA", "signal": "SLOHeadroom"})), {}, children.Rendering(), SCOPES
        )


def test_ingress_sidecar_fronts_the_model_server() -> None:
    objs = children.desired(ref(spec(sidecar=True)), {"llama": 1}, children.Rendering(sidecar_image="tw:1"), SCOPES)
    pod = objs[0]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["model-server", "tierwise-sidecar"]
    assert "--ingress" in pod["containers"][1]["args"] and pod["volumes"][0]["configMap"]["name"] == "tierwise-policy"
    assert objs[1]["spec"]["ports"][0] == {"name": "http", "port": 8480, "targetPort": "api", "protocol": "TCP"}
    # Never given the app sidecar as well, even in a namespace labelled for injection.
    assert objs[0]["spec"]["template"]["metadata"]["labels"]["tierwise.dev/inject"] == "false"
    assert pod["containers"][1]["securityContext"]["runAsUser"] == 10001


def test_covers_is_semantic() -> None:
    want = {"spec": {"containers": [{"name": "a", "image": "x", "resources": {"limits": {"cpu": "1000m"}}}]}}
    live = {
        "spec": {
            "containers": [
                {"name": "injected", "image": "y"},
                {"name": "a", "image": "x", "imagePullPolicy": "IfNotPresent", "resources": {"limits": {"cpu": "1"}}},
            ]
        }
    }
    assert covers(live, want)
    live["spec"]["containers"][1]["image"] = "evil"
    assert not covers(live, want)
    assert covers({"env": [{"name": "A"}]}, {"env": [{"name": "A", "value": ""}]})
    assert not covers({"args": ["--a", "--b"]}, {"args": ["--a"]})
    assert quantity("2Gi") == quantity(str(2 * 1024**3)) and quantity("500m") == quantity("0.5")
    assert quantity("lots") is None


def auto(**kw: Any) -> Autoscaling:
    return Autoscaling.model_validate({"target": 2, "scaleDownStabilizationSeconds": 60, **kw})


def test_schedules_and_scale_to_zero_set_the_floor() -> None:
    r = ReplicaRange(min=1, max=4)
    nights = {"name": "nights", "start": "22:00", "end": "06:00", "minReplicas": 3, "days": ["Tue"]}
    a = auto(schedules=[nights])
    # 02:00 Wednesday belongs to Tuesday's overnight window.
    assert scaling.floor(a, r, datetime(2026, 11, 18, 2, 0, tzinfo=UTC), idle=False) == 3
    assert scaling.floor(a, r, datetime(2026, 11, 19, 2, 0, tzinfo=UTC), idle=False) == 1  # Thursday 02:00
    assert scaling.floor(a, r, NOON, idle=False) == 1
    paris = auto(schedules=[{**nights, "days": [], "timeZone": "Europe/Paris"}])
    assert scaling.floor(paris, r, datetime(2026, 11, 18, 21, 30, tzinfo=UTC), idle=False) == 3  # 22:30 in Paris
    batch = auto(scaleToZeroAfterIdleSeconds=600)
    assert scaling.floor(batch, r, NOON, idle=True) == 0
    assert scaling.floor(batch, r, NOON, idle=False) == 1
    zero = ReplicaRange(min=0, max=4)
    assert scaling.floor(auto(), zero, NOON, idle=False) == 1  # traffic wakes a tier at zero
    assert scaling.floor(auto(), zero, NOON, idle=True) == 0


def decide(a: Autoscaling, current: int, load: float | None, h: scaling.History, at: float) -> scaling.Decision:
    obs = scaling.Observation(load, 1.0 if load is not None else None, None if load is not None else "down")
    return scaling.decide(a, ReplicaRange(min=1, max=4), current, obs, h, now=NOON, clock=at)


def test_scale_up_at_once_scale_down_after_the_window_and_never_blind() -> None:
    a, h = auto(), scaling.History()
    assert decide(a, 1, 7.0, h, 0).replicas == 4  # ceil(7 / 2), capped at max 4
    assert decide(a, 4, 8.1, h, 1).replicas == 4  # within the 10% tolerance
    assert decide(a, 4, 0.0, h, 10).replicas == 4  # the window still remembers 4
    assert decide(a, 4, 0.0, h, 59).replicas == 4
    d = decide(a, 4, 0.0, h, 62)
    assert d.replicas == 1 and d.reason.startswith("scaling down")
    held = decide(a, 4, None, scaling.History(), 0)
    assert held.replicas == 4 and not held.metrics_available and "down" in held.reason


def test_slo_headroom_scales_on_latency_over_target() -> None:
    a = auto(signal="SLOHeadroom", target=0.8)
    assert scaling.recommend(a, 2, 1.2) == 3  # p95 at 120% of the SLO, aiming for 80%
    assert scaling.recommend(a, 2, 0.82) == 2


def observed(**kw: Any) -> Observed:
    base: dict[str, Any] = {
        "generation": 3,
        "backends": [BackendState("llama", True, desired=2, replicas=2, ready=2), BackendState("api", False)],
        "slo": SLOObservation(values={"errorRatePercent": 0.5}),
    }
    return Observed(**{**base, **kw})


def test_status_conditions_and_weights() -> None:
    s = spec()
    st = tier_status(s, observed(), {}, "T1")
    conds = {c["type"]: c for c in st["conditions"]}
    assert (conds["Ready"]["status"], conds["SLOMet"]["status"], conds["Degraded"]["status"]) == (
        "True",
        "True",
        "False",
    )
    assert all(c["observedGeneration"] == 3 for c in conds.values())
    assert st["routingWeights"] == {"llama": 1, "api": 1} and st["readyReplicas"] == 2

    down = tier_status(
        s, observed(backends=[BackendState("llama", True, 2, 2, 0), BackendState("api", False)]), st, "T2"
    )
    assert down["routingWeights"] == {"llama": 0, "api": 1}
    deg = next(c for c in down["conditions"] if c["type"] == "Degraded")
    assert (deg["status"], deg["reason"], deg["lastTransitionTime"]) == ("True", "ReplicasNotReady", "T2")
    ready = next(c for c in down["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "T1"  # unchanged status keeps its transition time
    assert transitions(st["conditions"], down["conditions"]) == [("Warning", "ReplicasNotReady", "llama 0/2 ready")]

    bad = tier_status(s, observed(problems=['spec.fallback.tier: tier "x" does not exist']), {}, "T")
    assert next(c for c in bad["conditions"] if c["type"] == "Ready")["reason"] == "InvalidSpec"
    blind = tier_status(s, observed(slo=SLOObservation(error="Prometheus at http://p unavailable")), {}, "T")
    slo = next(c for c in blind["conditions"] if c["type"] == "SLOMet")
    assert (slo["status"], slo["reason"]) == ("Unknown", "MetricsUnavailable")

    assert not status_changed(st, tier_status(s, observed(), st, "T9"))
    assert merge_patch({"routingWeights": {"a": 1, "b": 1}}, {"routingWeights": {"a": 1}}) == {
        "routingWeights": {"b": None}
    }


def test_slo_verdicts() -> None:
    s = spec(slo={"firstTokenP95Milliseconds": 800, "maxErrorRatePercent": 2})
    st = tier_status(s, observed(slo=SLOObservation(values={"firstTokenP95Milliseconds": 950})), {}, "T")
    assert st["sloState"] == "Missed" and st["observed"] == {"firstTokenP95Milliseconds": 950}
    near = tier_status(s, observed(slo=SLOObservation(values={"firstTokenP95Milliseconds": 750})), {}, "T")
    assert near["sloState"] == "AtRisk"
    idle = tier_status(s, observed(slo=SLOObservation(values={})), {}, "T")
    assert idle["sloState"] == "Unknown" and "observed" not in idle


def test_promql_selects_exactly_the_callers_of_a_tier() -> None:
    scope = promql.Scope("gold", "llama", ("team-b", "team-a"))
    assert promql.in_flight(scope) == (
        'sum(tierwise_backend_in_flight_requests{namespace=~"team-a|team-b",tier="gold",backend="llama"})'
    )
    assert 'namespace=~"-"' in promql.in_flight(promql.Scope("gold", "llama", ()))
    assert "[60s]" in (promql.slo_ratio(scope, SLO(firstTokenP95Milliseconds=500)) or "")


def test_a_budgets_ready_condition_says_whether_it_compiles_and_keeps_the_rest_of_its_status() -> None:
    old = {"spentUsd": 12.5, "conditions": [{"type": "Other", "status": "True"}]}
    bad = validity_status(old, ["spec.selector: counts the same traffic"], 3, "2026-11-30T10:00:00Z")
    assert bad["spentUsd"] == 12.5 and bad["observedGeneration"] == 3
    ready = {c["type"]: c for c in bad["conditions"]}
    assert ready["Other"] == {"type": "Other", "status": "True"}
    assert ready["Ready"]["status"] == "False" and ready["Ready"]["reason"] == "InvalidSpec"
    assert ready["Ready"]["message"] == "spec.selector: counts the same traffic"
    # Still invalid later: the transition time holds, so nothing would be written.
    again = validity_status(bad, ["spec.selector: counts the same traffic"], 3, "2026-11-30T11:00:00Z")
    assert again == bad
    fixed = {c["type"]: c for c in validity_status(bad, [], 4, "2026-11-30T12:00:00Z")["conditions"]}
    assert fixed["Ready"]["status"] == "True" and fixed["Ready"]["reason"] == "Valid"
    assert fixed["Ready"]["lastTransitionTime"] == "2026-11-30T12:00:00Z"
