"""What the mutating webhook does to a pod (pure): a JSON patch adding the sidecar, or nothing.

The sidecar is a native sidecar (an init container with `restartPolicy: Always`, Kubernetes 1.29+):
it starts before the application's containers, so the first LLM call finds it ready, and stops
after them, so the last call is not cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierwise.naming import INGRESS_PORT, POLICY_CONFIGMAP, POLICY_KEY

Obj = dict[str, Any]
SIDECAR = "tierwise-sidecar"
# "false" (label or annotation) opts a pod out; the label "true" opts a pod in where the namespace
# is labelled opt-in (the webhook configuration selects on labels only).
INJECT = "tierwise.dev/inject"
BASE_URL_ANNOTATION = "tierwise.dev/openai-base-url"  # "true": point OPENAI_BASE_URL at the sidecar
INJECTED_ANNOTATION = "tierwise.dev/injected"
# A label, unlike the annotation, can be selected on: the chart's PodMonitor scrapes injected sidecars by it.
SIDECAR_LABEL, SIDECAR_LABEL_VALUE = "tierwise.dev/sidecar", "injected"
SIDECAR_PORT = INGRESS_PORT  # the OpenAI API, on loopback: for the pod's own containers only
# Probes and metrics, on the pod IP: kubelet and Prometheus reach a pod there, not on its loopback.
SIDECAR_HEALTH_PORT = INGRESS_PORT + 1
POLICY_MOUNT = "/etc/tierwise/policy"
DEFAULT_RESOURCES: Obj = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
# The sidecar's container wherever it runs (injected, or in front of a self-hosted model server):
# the image's numeric user, nothing writable but an emptyDir on /tmp.
SECURITY_CONTEXT: Obj = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
TMP_VOLUME: Obj = {"name": "tierwise-tmp", "emptyDir": {"sizeLimit": "64Mi"}}
TMP_MOUNT: Obj = {"name": "tierwise-tmp", "mountPath": "/tmp"}
# The sidecar's budget ledger without Redis: an emptyDir outlives a restart of the container (a
# crash, an OOM kill), not the pod. A TIERWISE_REDIS_URL in the stores Secret takes precedence.
STATE_VOLUME: Obj = {"name": "tierwise-state", "emptyDir": {"sizeLimit": "64Mi"}}
STATE_MOUNT: Obj = {"name": "tierwise-state", "mountPath": "/var/lib/tierwise"}
LEDGER = "sqlite:/var/lib/tierwise/budgets.sqlite"
# The cache's L3 on SQLite (a CachePolicy's default sqlitePath is under it). Its maxBytes (1 GiB by
# default) bounds the file; the volume's limit leaves room for SQLite's write-ahead log above it.
CACHE_VOLUME: Obj = {"name": "tierwise-cache", "emptyDir": {"sizeLimit": "2Gi"}}
CACHE_MOUNT: Obj = {"name": "tierwise-cache", "mountPath": "/var/cache/tierwise"}


@dataclass(frozen=True)
class InjectionConfig:
    image: str
    resources: Obj = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    # A Secret (in the pod's namespace) whose keys become the sidecar's environment, e.g.
    # TIERWISE_REDIS_URL and TIERWISE_POSTGRES_DSN; optional, so pods start without it.
    stores_secret: str | None = None
    version: str = "v1"


def opted_out(pod: Obj) -> bool:
    meta = pod.get("metadata") or {}
    return "false" in ((meta.get("labels") or {}).get(INJECT), (meta.get("annotations") or {}).get(INJECT))


def skip_warning(pod: Obj) -> str | None:
    """Why a pod the configuration sent is admitted without the sidecar, worth telling its owner.

    A pod on the host's network would bind the sidecar's loopback API on the node itself: every
    process there could spend under this pod's identity, and a second such pod on the node would
    not start. Such pods are privileged already (the baseline Pod Security Standard forbids host
    networking); they are admitted as they are, with a warning, the way service meshes do.
    """
    if (pod.get("spec") or {}).get("hostNetwork") and not opted_out(pod) and not injected(pod):
        return (
            f"{SIDECAR} not injected: the pod uses the host's network, where the sidecar's loopback API "
            f"would serve the whole node; label it {INJECT}=false to silence this warning"
        )
    return None


def injected(pod: Obj) -> bool:
    spec = pod.get("spec") or {}
    return any(c.get("name") == SIDECAR for c in [*spec.get("initContainers", []), *spec.get("containers", [])])


def _field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def sidecar_container(cfg: InjectionConfig) -> Obj:
    c: Obj = {
        "name": SIDECAR,
        "image": cfg.image,
        "restartPolicy": "Always",
        "args": [
            "sidecar",
            f"--policy-file={POLICY_MOUNT}/{POLICY_KEY}",
            "--namespace=$(TIERWISE_POD_NAMESPACE)",
            "--discover-endpoints",
            "--host=127.0.0.1",
            f"--port={SIDECAR_PORT}",
            f"--health-port={SIDECAR_HEALTH_PORT}",
        ],
        "env": [
            # Identity comes from the pod itself, never from requests.
            _field_env("TIERWISE_POD_NAMESPACE", "metadata.namespace"),
            _field_env("TIERWISE_POD_NAME", "metadata.name"),
            _field_env("TIERWISE_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "TIERWISE_BUDGET_STORE", "value": LEDGER},
        ],
        "ports": [{"name": "tierwise", "containerPort": SIDECAR_HEALTH_PORT, "protocol": "TCP"}],
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": SIDECAR_HEALTH_PORT},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": SIDECAR_HEALTH_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": SIDECAR_HEALTH_PORT}, "periodSeconds": 10},
        "resources": cfg.resources,
        "securityContext": SECURITY_CONTEXT,
        "volumeMounts": [
            {"name": "tierwise-policy", "mountPath": POLICY_MOUNT, "readOnly": True},
            TMP_MOUNT,
            STATE_MOUNT,
            CACHE_MOUNT,
        ],
    }
    if cfg.stores_secret:
        c["envFrom"] = [{"secretRef": {"name": cfg.stores_secret, "optional": True}}]
    return c


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def patch(pod: Obj, cfg: InjectionConfig) -> list[Obj]:
    """JSON patch operations injecting the sidecar; empty when the pod is opted out or already has it."""
    if opted_out(pod) or injected(pod) or skip_warning(pod):
        return []
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    ops: list[Obj] = []
    sidecar = sidecar_container(cfg)
    if spec.get("initContainers"):
        # After the pod's own init containers: they may prepare what the application needs, and a
        # native sidecar only starts its successors once it is started itself.
        ops.append({"op": "add", "path": "/spec/initContainers/-", "value": sidecar})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    volumes = [
        # optional: the pod starts before the operator has written the Policy; the sidecar stays
        # unready until it appears.
        {"name": "tierwise-policy", "configMap": {"name": POLICY_CONFIGMAP, "optional": True}},
        TMP_VOLUME,
        STATE_VOLUME,
        CACHE_VOLUME,
    ]
    if spec.get("volumes"):
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    if (meta.get("annotations") or {}).get(BASE_URL_ANNOTATION) == "true":
        url = {"name": "OPENAI_BASE_URL", "value": f"http://127.0.0.1:{SIDECAR_PORT}/v1"}
        # A value in a container's own `env` is kept; one from `envFrom` is not looked into (env
        # wins over envFrom): the annotation is the pod owner's explicit request.
        for i, c in enumerate(spec.get("containers", [])):
            env = c.get("env")
            if env is None:
                ops.append({"op": "add", "path": f"/spec/containers/{i}/env", "value": [url]})
            elif not any(e.get("name") == "OPENAI_BASE_URL" for e in env):
                ops.append({"op": "add", "path": f"/spec/containers/{i}/env/-", "value": url})
    if meta.get("labels"):
        ops.append({"op": "add", "path": f"/metadata/labels/{_escape(SIDECAR_LABEL)}", "value": SIDECAR_LABEL_VALUE})
    else:
        ops.append({"op": "add", "path": "/metadata/labels", "value": {SIDECAR_LABEL: SIDECAR_LABEL_VALUE}})
    if meta.get("annotations"):
        ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(INJECTED_ANNOTATION)}", "value": cfg.version})
    else:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: cfg.version}})
    return ops
