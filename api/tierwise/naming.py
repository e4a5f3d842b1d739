"""Names and labels every component agrees on: the operator creates what the sidecar looks up."""

from __future__ import annotations

GROUP = "tierwise.dev"
FIELD_MANAGER = "tierwise-operator"
# Outside the chart (which pins the tag to its appVersion): images/Dockerfile's sidecar target.
DEFAULT_SIDECAR_IMAGE = "ghcr.io/tierwise/tierwise-sidecar:latest"

# Namespaces labelled `tierwise.dev/injection` get the Policy ConfigMap; with `enabled` every pod
# gets the sidecar (unless it opts out), with `opt-in` only pods labelled `tierwise.dev/inject=true`.
INJECTION_LABEL = f"{GROUP}/injection"
INJECTION_ENABLED = "enabled"
INJECTION_OPT_IN = "opt-in"
INJECTION_VALUES = frozenset({INJECTION_ENABLED, INJECTION_OPT_IN})
POLICY_CONFIGMAP = "tierwise-policy"
POLICY_KEY = "policy.json"
# Beside the Policy in the same ConfigMap: each budget's spend across the sidecars, and the SLO
# steering of its tiers (lowered weights, traffic promoted or sent down the chain).
BUDGETS_KEY = "budgets.json"
STEERING_KEY = "steering.json"
POLICY_HASH_ANNOTATION = f"{GROUP}/policy-hash"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "tierwise-operator"
TIER_LABEL = f"{GROUP}/tier"
BACKEND_LABEL = f"{GROUP}/backend"
COMPONENT_LABEL = "app.kubernetes.io/component"


def backend_key(tier: str, backend: str) -> str:
    return f"{tier}/{backend}"


def backend_service(tier: str, backend: str) -> str:
    """The load-balanced Service of a self-hosted backend (also its Deployment's and PDB's name).

    Tier and backend names are at most 28 characters, so this and the headless name stay within
    the 63 characters of a DNS label.
    """
    return f"{tier}-{backend}"


def headless_service(tier: str, backend: str) -> str:
    """The headless Service whose DNS name resolves to one address per ready replica."""
    return f"{tier}-{backend}-hl"


# With the sidecar in its ingress role the Services point at it, not at the model server.
INGRESS_PORT = 8480


def serving_port(model_port: int, ingress: bool) -> int:
    """The port clients reach a self-hosted replica on."""
    return INGRESS_PORT if ingress else model_port
