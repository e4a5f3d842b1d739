"""The three custom resources as whole Kubernetes objects, and how to read them from YAML."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from tierwise.api.budget import CostBudgetSpec, CostBudgetStatus
from tierwise.api.cache import CachePolicySpec, CachePolicyStatus
from tierwise.api.common import (
    API_VERSION,
    DNS_LABEL,
    NAME_MAX,
    ApiModel,
    Invariant,
    InvariantError,
)
from tierwise.api.tier import InferenceTierSpec, InferenceTierStatus


def object_ref(kind: object, namespace: object, name: object) -> str:
    """How messages name an object: `Kind namespace/name` (namespace `default` when unset)."""
    return f"{kind} {namespace or 'default'}/{name}"


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata tierwise reads."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0

    def crd(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


def _ready_column() -> PrinterColumn:
    return PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status', description="Ready condition.")


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", type="date")


class Resource(ApiModel):
    """Common envelope: apiVersion, kind, metadata, spec, status."""

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]]
    columns: ClassVar[tuple[PrinterColumn, ...]]
    description: ClassVar[str]
    # Rules on the whole object, for invariants that need metadata.name.
    root_invariants: ClassVar[tuple[Invariant, ...]] = ()

    api_version: Literal["tierwise.dev/v1alpha1"] = "tierwise.dev/v1alpha1"
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def ref(self) -> str:
        """How messages name the object: `Kind namespace/name`."""
        return object_ref(self.kind_name, self.namespace, self.name)

    def check_root(self) -> None:
        for inv in self.root_invariants:
            if not inv.holds(self):
                raise InvariantError(inv.field, inv.message)


class InferenceTier(Resource):
    kind_name = "InferenceTier"
    plural = "inferencetiers"
    short_names = ("itier", "tier")
    description = (
        "InferenceTier is one service tier of LLM traffic (e.g. gold, silver, bronze): its backends "
        "and their prices, SLOs, routing, fallback, limits, degradation and autoscaling."
    )
    columns = (
        PrinterColumn("Priority", ".spec.priority", type="integer", description="Scheduling priority."),
        PrinterColumn("Strategy", ".spec.routing.strategy", description="Routing strategy."),
        PrinterColumn("Fallback", ".spec.fallback.tier", description="Next tier on failure."),
        PrinterColumn("Backends", ".status.readyBackends", type="integer", description="Ready backends."),
        _ready_column(),
        PrinterColumn("SLO", ".status.sloState", description="Met, AtRisk, Missed or Unknown."),
        _AGE,
    )
    root_invariants = (
        Invariant(
            rule=f"self.metadata.name.size() <= {NAME_MAX} && self.metadata.name.matches('{DNS_LABEL}')",
            message=f"must be a DNS label of at most {NAME_MAX} characters (it names the tier's Services)",
            holds=lambda s: len(s.metadata.name) <= NAME_MAX and _is_dns_label(s.metadata.name),
            field=".metadata.name",
        ),
        Invariant(
            rule="!has(self.spec.fallback) || self.spec.fallback.tier != self.metadata.name",
            message="a tier must not fall back to itself",
            holds=lambda s: s.spec.fallback is None or s.spec.fallback.tier != s.metadata.name,
            field=".spec.fallback.tier",
        ),
        Invariant(
            rule="!has(self.spec.promotion) || self.spec.promotion.borrowFrom != self.metadata.name",
            message="a tier must not borrow capacity from itself",
            holds=lambda s: s.spec.promotion is None or s.spec.promotion.borrow_from != s.metadata.name,
            field=".spec.promotion.borrowFrom",
        ),
    )

    kind: Literal["InferenceTier"] = "InferenceTier"
    spec: InferenceTierSpec
    status: InferenceTierStatus | None = None


class CostBudget(Resource):
    kind_name = "CostBudget"
    plural = "costbudgets"
    short_names = ("budget", "cb")
    description = (
        "CostBudget is a spend limit per period for a namespace, tiers or tenants, with staged "
        "actions (notify, downgrade, throttle, reject) as spend reaches its thresholds."
    )
    columns = (
        PrinterColumn("Period", ".spec.period", description="Budget period."),
        PrinterColumn("Limit USD", ".spec.limit.usd", type="number", description="Spend limit."),
        PrinterColumn("Spent USD", ".status.spentUsd", type="number", description="Spent this period."),
        PrinterColumn("Remaining USD", ".status.remainingUsd", type="number", description="Left this period."),
        PrinterColumn("State", ".status.state", description="Ok, Warning, Downgraded, Throttled, Exceeded."),
        _ready_column(),
        _AGE,
    )

    kind: Literal["CostBudget"] = "CostBudget"
    spec: CostBudgetSpec
    status: CostBudgetStatus | None = None


class CachePolicy(Resource):
    kind_name = "CachePolicy"
    plural = "cachepolicies"
    short_names = ("cpol",)
    description = (
        "CachePolicy says which LLM requests may be answered from cache, who shares entries, "
        "and in which layers (memory, Redis, SQLite/PostgreSQL) for how long."
    )
    columns = (
        PrinterColumn("Scope", ".spec.scope", description="Tenant, Namespace or Global."),
        PrinterColumn("TTL", ".spec.ttlSeconds", type="integer", description="Entry lifetime in seconds."),
        PrinterColumn("Entries", ".status.entries", type="integer", description="Entries held in memory."),
        PrinterColumn("Hit L1", ".status.hitRatio.memory", type="number", description="L1 hit ratio, last hour."),
        PrinterColumn("Hit L2", ".status.hitRatio.redis", type="number", description="L2 hit ratio, last hour."),
        PrinterColumn("Hit L3", ".status.hitRatio.persistent", type="number", description="L3 hit ratio, last hour."),
        _ready_column(),
        _AGE,
    )

    kind: Literal["CachePolicy"] = "CachePolicy"
    spec: CachePolicySpec
    status: CachePolicyStatus | None = None


KINDS: dict[str, type[Resource]] = {k.kind_name: k for k in (InferenceTier, CostBudget, CachePolicy)}

AnyResource = InferenceTier | CostBudget | CachePolicy


def _is_dns_label(name: str) -> bool:
    return re.fullmatch(DNS_LABEL, name) is not None


@dataclass(frozen=True)
class Problem:
    """A reason an object, or a set of objects, cannot be compiled: the object, the field, why."""

    obj: str
    field: str
    reason: str
    source: str = ""
    # A reference to an object that does not exist (yet): applied in another order, the set may
    # still be fine, which the validating webhook may be told to tolerate.
    dangling: bool = False
    # What sort of problem this is, beyond its object and field ("fallback cycle", "defaults of
    # team-a"): a cycle reported on a field that already named a missing tier is a new problem,
    # while the same cycle through other tiers, or one default tier fewer, is the same one.
    about: str = ""

    @property
    def identity(self) -> tuple[str, str, str]:
        return self.obj, self.field, self.about

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        field = f"{self.field}: " if self.field else ""
        return f"{self.obj}{where}: {field}{self.reason}"


@dataclass(frozen=True)
class Namespace:
    """A namespace and its labels, for evaluating namespace selectors."""

    name: str
    labels: Mapping[str, str]


def _field_of(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_object(doc: Mapping[str, Any], source: str = "") -> AnyResource | Problem | None:
    """Turn one Kubernetes object into a typed resource, or a Problem naming the field at fault.

    Returns None for kinds tierwise does not own (Namespaces and the like are handled by callers).
    """
    kind = doc.get("kind")
    if kind not in KINDS:
        return None
    meta = doc.get("metadata") or {}
    ref = object_ref(kind, meta.get("namespace"), meta.get("name", "<unnamed>"))
    if doc.get("apiVersion") != API_VERSION:
        return Problem(ref, "apiVersion", f"must be {API_VERSION}, not {doc.get('apiVersion')!r}", source)
    try:
        # Strict, from JSON: what the API server refuses ("10" for an integer, "true" for a
        # boolean) must be refused here too, or a GitOps check passes what `kubectl apply` then
        # rejects. JSON is what kubectl sends; YAML's dates and the like become their text.
        obj = KINDS[kind].model_validate_json(json.dumps(doc, default=str), strict=True)
        obj.check_root()
    except InvariantError as e:
        return Problem(ref, (e.field or "").lstrip("."), e.reason, source)
    except ValidationError as e:
        err = e.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, InvariantError):
            path = _field_of(tuple(err["loc"]))
            field = path + (ctx_err.field or "")
            return Problem(ref, field, ctx_err.reason, source)
        return Problem(ref, _field_of(tuple(err["loc"])), err["msg"], source)
    return obj  # type: ignore[return-value]


def parse_objects(
    docs: Iterable[tuple[Mapping[str, Any], str]],
) -> tuple[list[AnyResource], list[Namespace], list[Problem]]:
    """Split documents into tierwise resources, Namespaces (for their labels) and problems."""
    resources: list[AnyResource] = []
    namespaces: list[Namespace] = []
    problems: list[Problem] = []
    for doc, source in docs:
        if doc.get("kind") == "Namespace" and doc.get("apiVersion") == "v1":
            meta = doc.get("metadata") or {}
            namespaces.append(Namespace(meta.get("name", ""), dict(meta.get("labels") or {})))
            continue
        parsed = parse_object(doc, source)
        if isinstance(parsed, Problem):
            problems.append(parsed)
        elif parsed is not None:
            resources.append(parsed)
    return resources, namespaces, problems
