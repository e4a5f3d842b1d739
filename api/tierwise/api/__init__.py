"""The custom resources (group tierwise.dev, version v1alpha1) as typed models."""

from tierwise.api.budget import CostBudgetSpec, CostBudgetStatus
from tierwise.api.cache import CachePolicySpec, CachePolicyStatus
from tierwise.api.common import API_VERSION, GROUP, VERSION, Condition
from tierwise.api.resources import (
    KINDS,
    AnyResource,
    CachePolicy,
    CostBudget,
    InferenceTier,
    Namespace,
    Problem,
    parse_object,
    parse_objects,
)
from tierwise.api.tier import InferenceTierSpec, InferenceTierStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "AnyResource",
    "CachePolicy",
    "CachePolicySpec",
    "CachePolicyStatus",
    "Condition",
    "CostBudget",
    "CostBudgetSpec",
    "CostBudgetStatus",
    "InferenceTier",
    "InferenceTierSpec",
    "InferenceTierStatus",
    "Namespace",
    "Problem",
    "parse_object",
    "parse_objects",
]
