"""The objects a tier should own, computed from its spec alone (pure: no I/O, no clock).

Per self-hosted backend: a Deployment, a Service, a headless Service (one DNS address per ready
replica, for stickiness) and a PodDisruptionBudget; with autoscaling mode HPA or KEDA also the
HorizontalPodAutoscaler or ScaledObject, and then the Deployment is rendered without
`spec.replicas` so that exactly one owner writes that field. External backends own nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tierwise.api.tier import AutoscalingMode, Backend, InferenceTierSpec, ScalingSchedule, SelfHostedDeployment
from tierwise.naming import (
    BACKEND_LABEL,
    COMPONENT_LABEL,
    DEFAULT_SIDECAR_IMAGE,
    INGRESS_PORT,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POLICY_CONFIGMAP,
    POLICY_KEY,
    TIER_LABEL,
    backend_service,
    headless_service,
    serving_port,
)
from tierwise_operator.injection import INJECT, SECURITY_CONTEXT, TMP_MOUNT, TMP_VOLUME
from tierwise_operator.kube import DEPLOYMENT, HPA, PDB, SCALED_OBJECT, SERVICE, Obj
from tierwise_operator.promql import HPA_METRICS, Scope, load_query

MODEL_CONTAINER = "model-server"
SIDECAR_CONTAINER = "tierwise-sidecar"
_DAYS = {"Sun": 0, "Mon": 1, "Tue": 2, "Wed": 3, "Thu": 4, "Fri": 5, "Sat": 6}


@dataclass(frozen=True)
class TierRef:
    """What the children need to know of the tier object itself."""

    namespace: str
    name: str
    uid: str
    spec: InferenceTierSpec


@dataclass(frozen=True)
class Rendering:
    """Cluster-wide settings that shape the children."""

    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    prometheus_url: str | None = None
    keda_installed: bool = False


def self_hosted(spec: InferenceTierSpec) -> list[tuple[Backend, SelfHostedDeployment]]:
    return [(b, b.deployment) for b in spec.backends if b.deployment is not None]


def selector_labels(tier: str, backend: str) -> dict[str, str]:
    return {TIER_LABEL: tier, BACKEND_LABEL: backend}


def owned_labels(tier: str, backend: str | None = None) -> dict[str, str]:
    labels = {MANAGED_BY_LABEL: MANAGED_BY, TIER_LABEL: tier}
    if backend is not None:
        labels[BACKEND_LABEL] = backend
    return labels


def _meta(t: TierRef, api: str, kind: str, name: str, *, backend: str, component: str) -> Obj:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": t.namespace,
            "labels": {**owned_labels(t.name, backend), COMPONENT_LABEL: component},
            "ownerReferences": [
                {
                    "apiVersion": "tierwise.dev/v1alpha1",
                    "kind": "InferenceTier",
                    "name": t.name,
                    "uid": t.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
    }


def _nonempty(d: dict[str, Any]) -> dict[str, Any]:
    """Drop empty values: the API server omits them on read, so writing them would look like drift."""
    return {k: v for k, v in d.items() if v not in (None, "", [], {})}


def _model_container(b: Backend, d: SelfHostedDeployment) -> Obj:
    probe = {"tcpSocket": {"port": "model"}, "periodSeconds": 10}
    return _nonempty(
        {
            "name": MODEL_CONTAINER,
            "image": d.image,
            "args": list(d.args),
            "env": [_nonempty({"name": e.name, "value": e.value}) for e in d.env],
            "ports": [{"name": "model", "containerPort": d.port, "protocol": "TCP"}],
            "resources": _nonempty({"requests": dict(d.resources.requests), "limits": dict(d.resources.limits)}),
            "readinessProbe": {**probe, "initialDelaySeconds": 5},
            "livenessProbe": {**probe, "initialDelaySeconds": 60, "failureThreshold": 6},
        }
    )


def _sidecar_container(t: TierRef, b: Backend, d: SelfHostedDeployment, r: Rendering) -> Obj:
    """The sidecar in its ingress role: the replica's own front door (concurrency, shedding)."""
    return {
        "name": SIDECAR_CONTAINER,
        "image": r.sidecar_image,
        "args": [
            "sidecar",
            "--ingress",
            f"{t.name}/{b.name}",
            "--upstream",
            f"http://127.0.0.1:{d.port}/v1",
            "--namespace",
            t.namespace,
            "--policy-file",
            f"/etc/tierwise/policy/{POLICY_KEY}",
            "--port",
            str(INGRESS_PORT),
        ],
        "ports": [{"name": "api", "containerPort": INGRESS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "api"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "api"}, "periodSeconds": 10},
        "securityContext": SECURITY_CONTEXT,
        "volumeMounts": [
            {"name": "tierwise-policy", "mountPath": "/etc/tierwise/policy", "readOnly": True},
            TMP_MOUNT,
        ],
    }


def deployment(t: TierRef, b: Backend, d: SelfHostedDeployment, replicas: int | None, r: Rendering) -> Obj:
    """`replicas` None leaves the field to another owner (an HPA or a ScaledObject)."""
    name = backend_service(t.name, b.name)
    obj = _meta(t, "apps/v1", "Deployment", name, backend=b.name, component="model-server")
    obj["metadata"]["annotations"] = {"tierwise.dev/model": b.model}
    containers = [_model_container(b, d)]
    pod_spec: Obj = {"containers": containers, "terminationGracePeriodSeconds": 60}
    if d.sidecar:
        containers.append(_sidecar_container(t, b, d, r))
        pod_spec["volumes"] = [{"name": "tierwise-policy", "configMap": {"name": POLICY_CONFIGMAP}}, TMP_VOLUME]
    spec: Obj = {
        "selector": {"matchLabels": selector_labels(t.name, b.name)},
        "template": {
            "metadata": {
                # A model server is not an LLM client: never inject the app sidecar into it, even
                # in a namespace labelled for injection (its ingress sidecar, if any, is its own).
                "labels": {**owned_labels(t.name, b.name), INJECT: "false"},
                "annotations": {"tierwise.dev/model": b.model},
            },
            "spec": pod_spec,
        },
    }
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    obj["spec"] = spec
    return obj


def services(t: TierRef, b: Backend, d: SelfHostedDeployment) -> list[Obj]:
    port = serving_port(d.port, d.sidecar)
    target = "api" if d.sidecar else "model"
    ports = [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]
    lb = _meta(t, "v1", "Service", backend_service(t.name, b.name), backend=b.name, component="service")
    lb["spec"] = {"selector": selector_labels(t.name, b.name), "ports": ports}
    hl = _meta(t, "v1", "Service", headless_service(t.name, b.name), backend=b.name, component="headless-service")
    hl["spec"] = {"clusterIP": "None", "selector": selector_labels(t.name, b.name), "ports": ports}
    return [lb, hl]


def disruption_budget(t: TierRef, b: Backend) -> Obj:
    # maxUnavailable, not minAvailable: a one-replica backend must still let a node drain.
    obj = _meta(
        t,
        "policy/v1",
        "PodDisruptionBudget",
        backend_service(t.name, b.name),
        backend=b.name,
        component="disruption-budget",
    )
    obj["spec"] = {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(t.name, b.name)}}
    return obj


def _behavior(spec: InferenceTierSpec) -> Obj:
    a = spec.autoscaling
    return {
        "scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds},
        "scaleUp": {"stabilizationWindowSeconds": a.scale_up_stabilization_seconds},
    }


def _target(value: float) -> str:
    return f"{value:g}"


def hpa(t: TierRef, b: Backend, d: SelfHostedDeployment, external_metric: str, scope: Scope) -> Obj:
    name = backend_service(t.name, b.name)
    obj = _meta(t, "autoscaling/v2", "HorizontalPodAutoscaler", name, backend=b.name, component="autoscaler")
    a = t.spec.autoscaling
    obj["spec"] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        # An HPA cannot go below one replica without the HPAScaleToZero feature gate.
        "minReplicas": max(1, d.replicas.min),
        "maxReplicas": d.replicas.max,
        "metrics": [
            {
                "type": "External",
                "external": {
                    "metric": {
                        "name": external_metric,
                        "selector": {
                            "matchLabels": {"tier": t.name, "backend": b.name},
                            "matchExpressions": [
                                {"key": "namespace", "operator": "In", "values": sorted(scope.callers) or ["-"]}
                            ],
                        },
                    },
                    "target": {"type": "AverageValue", "averageValue": _target(a.target)},
                },
            }
        ],
        "behavior": _behavior(t.spec),
    }
    return obj


def _cron(clock: str, days: list[str]) -> str:
    hh, mm = clock.split(":")
    dow = ",".join(str(_DAYS[d]) for d in days) if days else "*"
    return f"{int(mm)} {int(hh)} * * {dow}"


def _cron_trigger(s: ScalingSchedule) -> Obj:
    days = [str(d) for d in s.days]
    return {
        "type": "cron",
        "name": f"schedule-{s.name}",
        "metadata": {
            "timezone": s.time_zone,
            "start": _cron(s.start, days),
            "end": _cron(s.end, days),
            "desiredReplicas": str(s.min_replicas),
        },
    }


def scaled_object(t: TierRef, b: Backend, d: SelfHostedDeployment, scope: Scope, prometheus_url: str) -> Obj:
    name = backend_service(t.name, b.name)
    obj = _meta(t, "keda.sh/v1alpha1", "ScaledObject", name, backend=b.name, component="autoscaler")
    a = t.spec.autoscaling
    triggers: list[Obj] = [
        {
            "type": "prometheus",
            "name": "load",
            "metadata": {
                "serverAddress": prometheus_url,
                "query": load_query(a.signal, scope, t.spec.slo),
                "threshold": _target(a.target),
            },
        }
    ]
    triggers += [_cron_trigger(s) for s in a.schedules]
    spec: Obj = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicaCount": d.replicas.min,
        "maxReplicaCount": d.replicas.max,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(t.spec)}},
        "triggers": triggers,
    }
    if a.scale_to_zero_after_idle_seconds is not None:
        spec["minReplicaCount"] = 0
        spec["cooldownPeriod"] = a.scale_to_zero_after_idle_seconds
    obj["spec"] = spec
    return obj


class SpecError(Exception):
    """The tier cannot be realised as written; reported in its status, not retried until it changes."""


def desired(t: TierRef, replicas: dict[str, int], r: Rendering, scopes: dict[str, Scope]) -> list[Obj]:
    """Every object the tier should own. `replicas` has the count per backend for Builtin and None
    modes; `scopes` the Prometheus selection per backend for KEDA's query."""
    mode = t.spec.autoscaling.mode
    out: list[Obj] = []
    for b, d in self_hosted(t.spec):
        external = mode in (AutoscalingMode.HPA, AutoscalingMode.KEDA)
        out.append(deployment(t, b, d, None if external else replicas[b.name], r))
        out += services(t, b, d)
        out.append(disruption_budget(t, b))
        if mode is AutoscalingMode.HPA:
            out.append(hpa(t, b, d, hpa_metric(t.spec), scopes[b.name]))
        elif mode is AutoscalingMode.KEDA:
            if not r.keda_installed:
                raise SpecError("autoscaling.mode is KEDA but KEDA's ScaledObject CRD is not installed")
            if r.prometheus_url is None:
                raise SpecError("autoscaling.mode is KEDA but the operator has no --prometheus-url for its trigger")
            out.append(scaled_object(t, b, d, scopes[b.name], r.prometheus_url))
    return out


def hpa_metric(spec: InferenceTierSpec) -> str:
    metric = HPA_METRICS.get(spec.autoscaling.signal)
    if metric is None:
        raise SpecError(
            f"autoscaling.signal {spec.autoscaling.signal} needs Builtin or KEDA mode: "
            "an HPA scales on a per-replica external metric"
        )
    return metric


OWNED_KINDS = (DEPLOYMENT, SERVICE, PDB, HPA, SCALED_OBJECT)
