"""The Policy: what one namespace's sidecars enforce, compiled from the custom resources."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tierwise.api.budget import CostBudgetSpec
from tierwise.api.cache import CachePolicySpec
from tierwise.api.tier import InferenceTierSpec


class _Frozen(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")


class Source(_Frozen):
    """An object the Policy was compiled from, to trace a decision back to Git."""

    kind: str
    namespace: str
    name: str


class PolicyTier(_Frozen):
    """A tier the namespace may use."""

    name: str
    namespace: str = Field(description="Where the InferenceTier lives (its own or the platform namespace).")
    spec: InferenceTierSpec
    fallback_chain: list[str] = Field(
        default_factory=list, description="Tiers tried after this one, in order (resolved, acyclic)."
    )


class PolicyBudget(_Frozen):
    """A budget that counts (some of) the namespace's traffic."""

    name: str
    namespace: str
    spec: CostBudgetSpec


class PolicyCache(_Frozen):
    """A cache policy that covers (some of) the namespace's requests."""

    name: str
    namespace: str
    revision: str = Field(
        default="",
        description="A digest of the spec: part of the cache key when invalidation.onPolicyChange. From the "
        "content, not metadata.generation, so the same files compile to the same Policy in Git and in the cluster.",
    )
    spec: CachePolicySpec


class Policy(_Frozen):
    """Immutable, validated, self-contained: a sidecar needs nothing else to serve the namespace."""

    api_version: Literal["tierwise.dev/v1alpha1"] = "tierwise.dev/v1alpha1"
    kind: Literal["Policy"] = "Policy"
    namespace: str
    platform_namespace: str
    default_tier: str | None = None
    tiers: dict[str, PolicyTier] = Field(default_factory=dict)
    unavailable_tiers: list[str] = Field(
        default_factory=list,
        description="Platform tiers the namespace is not granted: asking for one is forbidden, not unknown.",
    )
    refuse_unknown_models: bool | None = Field(
        default=None,
        description="Refuse a request naming a model no tier serves (namespace label tierwise.dev/unknown-model="
        "refuse) instead of serving it with the default tier.",
    )
    budgets: list[PolicyBudget] = Field(default_factory=list)
    cache_policies: list[PolicyCache] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    hash: str = Field(default="", description="sha256 of the content; unchanged input gives the same hash.")

    def content(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"hash"})

    def sealed(self) -> Policy:
        """The same Policy with its content hash filled in."""
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return self.model_copy(update={"hash": "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()})

    def wire(self) -> dict[str, Any]:
        return {**self.content(), "hash": self.hash}
