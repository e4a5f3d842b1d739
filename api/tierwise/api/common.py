"""Building blocks shared by the three resources: the model base, invariants, selectors, conditions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "tierwise.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes object names that also become Service and Deployment names must be DNS-1035 labels.
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# DNS-1123 subdomain, for references to Secrets and other objects named by users.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# Tier and backend names combine into Service names `<tier>-<backend>-hl`, which must stay
# within the 63 characters of a DNS label.
NAME_MAX = 28

TierName = Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=DNS_LABEL)]
NamespaceName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]


@dataclass(frozen=True)
class Invariant:
    """A rule inside one object, enforced twice from one declaration.

    `rule` is CEL that the API server evaluates (emitted as `x-kubernetes-validations`), `holds` is
    the same rule in Python so that compiling local YAML rejects exactly what the cluster would.
    `field` is the path, relative to the object carrying the rule, that the error names.

    Guard every field the rule reads with `has()` unless it is required: the API server checks
    rules against each `default: {}` before nested defaults apply, and omitted lists stay absent.
    """

    rule: str
    message: str
    holds: Callable[[Any], bool]
    field: str | None = None

    def cel(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field:
            out["fieldPath"] = self.field
            out["reason"] = "FieldValueInvalid"
        return out


def ordered(low: str, high: str) -> Invariant:
    """`low` <= `high` wherever both are set (snake_case attribute names)."""
    lo, hi = to_camel(low), to_camel(high)
    return Invariant(
        rule=f"!has(self.{lo}) || !has(self.{hi}) || self.{lo} <= self.{hi}",
        message=f"{lo} must not exceed {hi}",
        holds=lambda s: getattr(s, low) is None or getattr(s, high) is None or getattr(s, low) <= getattr(s, high),
        field=f".{lo}",
    )


def strictly_ascending(items: str, key: str) -> Invariant:
    """The list `items` is in strictly ascending order of each element's `key`."""
    it, k = to_camel(items), to_camel(key)
    return Invariant(
        rule=f"!has(self.{it}) || (self.{it}.map(x, x.{k}).isSorted()"
        f" && self.{it}.all(a, self.{it}.exists_one(b, b.{k} == a.{k})))",
        message=f"{it} must be in strictly ascending order of {k}",
        holds=lambda s: all(
            getattr(a, key) < getattr(b, key) for a, b in zip(getattr(s, items), getattr(s, items)[1:], strict=False)
        ),
        field=f".{it}",
    )


class InvariantError(ValueError):
    """Raised by a model whose invariant does not hold; carries the offending field."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field.lstrip('.')}: {message}" if field else message)
        self.field = field
        self.reason = message


class ApiModel(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields refused, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
        use_attribute_docstrings=False,
    )

    invariants: ClassVar[tuple[Invariant, ...]] = ()

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        for inv in type(self).invariants:
            if not inv.holds(self):
                raise InvariantError(inv.field, inv.message)
        return self

    def wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(BaseModel):
    """Base of status models: written by the operator, so tolerant of fields from newer versions."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """The latest observation of one aspect of the object's state (Kubernetes condition shape)."""

    type: str = Field(
        description="Type of the condition, e.g. Ready, SLOMet, Degraded.",
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="One CamelCase word saying why the condition is in this state.",
        max_length=1024,
        min_length=1,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = Field(default="", description="Human-readable details.", max_length=32768)
    last_transition_time: str = Field(
        description="When the status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition was computed for."
    )


class ObjectStatus(StatusModel):
    """What every tierwise status carries: the generation observed and the conditions."""

    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Latest observations of the object's state (Ready and kind-specific types).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(ApiModel):
    """One requirement of a label selector."""

    key: str = Field(description="The label key the requirement applies to.", min_length=1, max_length=317)
    operator: LabelSelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Values for In and NotIn (non-empty); must be empty for Exists and DoesNotExist.",
    )

    invariants = (
        Invariant(
            rule="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            message="values must be non-empty for In and NotIn and empty for Exists and DoesNotExist",
            holds=lambda s: (s.operator in (LabelSelectorOperator.IN, LabelSelectorOperator.NOT_IN)) == bool(s.values),
            field=".values",
        ),
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        match self.operator:
            case LabelSelectorOperator.IN:
                return present and labels[self.key] in self.values
            case LabelSelectorOperator.NOT_IN:
                return not present or labels[self.key] not in self.values
            case LabelSelectorOperator.EXISTS:
                return present
            case LabelSelectorOperator.DOES_NOT_EXIST:
                return not present


class LabelSelector(ApiModel):
    """A Kubernetes label selector; an empty selector matches everything."""

    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels that must all be present with these values."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=16, description="Requirements that must all hold."
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            e.matches(labels) for e in self.match_expressions
        )


class NamespaceSelection(ApiModel):
    """Namespaces chosen by name, by label, or both (a namespace matching either is selected)."""

    names: list[NamespaceName] = Field(default_factory=list, max_length=256, description="Namespaces selected by name.")
    selector: LabelSelector | None = Field(
        default=None, description="Namespaces selected by label; an empty selector selects all."
    )

    def matches(self, namespace: str, labels: Mapping[str, str]) -> bool:
        return namespace in self.names or (self.selector is not None and self.selector.matches(labels))

    def reaches_beyond(self, own: str) -> bool:
        """Whether this selection can select a namespace other than `own` (a label selector can)."""
        return self.selector is not None or any(n != own for n in self.names)


class SecretKeyRef(ApiModel):
    """A key of a Secret in the same namespace as the object that refers to it."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field(description="Key within the Secret.", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
