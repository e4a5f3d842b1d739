"""The sidecar's ingress role: the front door of one replica of a self-hosted backend.

For a backend with `deployment.sidecar: true` the operator runs a second container in the model
server's pod, `tierwise sidecar --ingress <tier>/<backend> --upstream http://127.0.0.1:<port>/v1`,
and points the backend's Services at it. A request reaching it was already given its tier,
backend and replica by the caller's sidecar, which also owns fallback to other tiers. So the
namespace's Policy is narrowed to that one tier and backend, whose one endpoint is the model server
next door: a pure function of the Policy, applied again on every hot reload.

Per-replica concurrency and priority shedding are the admit stage's, as in any sidecar: here the
one target's limit is fixed at the backend's `maxConcurrencyPerReplica` (admission/rooms.py), and
a caller's `x-tierwise-priority: low` (passed on by its sidecar) ranks within the tier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from tierwise.api.tier import Backend
from tierwise.naming import backend_key
from tierwise.policy import Policy, PolicyTier
from tierwise_sidecar.app import Source
from tierwise_sidecar.policy_source import Loaded, PolicyLoadError

log = logging.getLogger("tierwise.sidecar")


class IngressError(PolicyLoadError):
    """The Policy has nothing this ingress can front; like any refused Policy, the one in force stays."""


def _fronted(policy: Policy, tier: str, backend: str) -> tuple[PolicyTier, Backend]:
    """The tier and backend an ingress fronts, or why the Policy has no such thing."""
    found = policy.tiers.get(tier)
    if found is None:
        have = ", ".join(sorted(policy.tiers)) or "none"
        raise IngressError(f"tier {tier!r} is not in the Policy of namespace {policy.namespace} (tiers: {have})")
    chosen = next((b for b in found.spec.backends if b.name == backend), None)
    if chosen is None:
        have = ", ".join(b.name for b in found.spec.backends)
        raise IngressError(f"tier {tier} has no backend {backend!r} (backends: {have})")
    if chosen.deployment is None:
        raise IngressError(f"backend {backend_key(tier, backend)} is an external API, not a self-hosted model server")
    return found, chosen


def _alone(tier: PolicyTier, backend: Backend) -> PolicyTier:
    """The tier with only `backend` and nothing that leads elsewhere."""
    # Fallback and promotion name other tiers, which the caller's sidecar reaches itself.
    # Stickiness chose this replica already; with one endpoint a pin has nothing left to choose.
    routing = tier.spec.routing
    routing = routing.model_copy(update={"stickiness": routing.stickiness.model_copy(update={"enabled": False})})
    spec = tier.spec.model_copy(update={"backends": [backend], "fallback": None, "promotion": None, "routing": routing})
    return tier.model_copy(update={"spec": spec, "fallback_chain": []})


def ingress_policy(policy: Policy, tier: str, backend: str) -> Policy:
    """The Policy narrowed to `tier` with only `backend`: the default (and only) tier, with no
    fallback, no budgets and no cache policies, sealed with its own hash."""
    found, chosen = _fronted(policy, tier, backend)
    sources = [s for s in policy.sources if (s.kind, s.namespace, s.name) == ("InferenceTier", found.namespace, tier)]
    # Budgets and caches are the caller's sidecar's: applied here too, spend would count twice.
    narrowed = policy.model_copy(
        update={
            "default_tier": tier,
            "tiers": {tier: _alone(found, chosen)},
            "unavailable_tiers": [],
            "budgets": [],
            "cache_policies": [],
            "sources": sources,
        }
    )
    return narrowed.sealed()


def parse_target(text: str) -> tuple[str, str]:
    """`<tier>/<backend>`, as the operator renders `--ingress`."""
    tier, sep, backend = text.partition("/")
    if not (sep and tier and backend) or "/" in backend:
        raise ValueError(f"expected <tier>/<backend>, got {text!r}")
    return tier, backend


def parse_upstream(text: str) -> str:
    """The model server's OpenAI base URL (`http://127.0.0.1:8000/v1`), as endpoints are stored."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) base URL such as http://127.0.0.1:8000/v1, got {text!r}")
    return text.rstrip("/")


@dataclass(frozen=True)
class Ingress:
    tier: str
    backend: str
    upstream: str

    def endpoints(self) -> dict[str, tuple[str, ...]]:
        """The endpoints table: the backend's one replica is the model server in this pod."""
        return {backend_key(self.tier, self.backend): (self.upstream,)}


class IngressSource:
    """A Policy source seen through `ingress_policy`: the first load and every reload are narrowed,
    and each carries the endpoints table (nothing else may fill it: no DNS discovery here)."""

    def __init__(self, source: Source, ingress: Ingress) -> None:
        self.source = source
        self.ingress = ingress

    def signature(self) -> object:
        return self.source.signature()

    def load(self) -> Loaded:
        policy = self.source.load().policy
        narrowed = ingress_policy(policy, self.ingress.tier, self.ingress.backend)
        # The narrowed Policy has its own hash; this line ties it to the ConfigMap's.
        log.info("Policy %s narrowed to ingress %s/%s as %s", policy.hash, self.ingress.tier, self.ingress.backend,
                 narrowed.hash)  # fmt: skip
        return Loaded(narrowed, self.ingress.endpoints())
