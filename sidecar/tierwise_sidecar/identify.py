"""The identify stage: who is calling, which tier, at what priority, in which session.

The namespace comes from the pod's own identity (the Policy is compiled for it), never from the
request. The tier comes from `x-tierwise-tier`, else from the request's `model`: a tier's name (so
an unchanged OpenAI client can pick one), or a model that a tier the namespace may use serves;
else the namespace's default tier serves it, and says so in a header (or, in a namespace labelled
`tierwise.dev/unknown-model=refuse`, the request is refused). A pinned TierAccess (the ingress
role, in front of one tier's replica) answers every request with its default tier, whatever the
request names.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from tierwise.values import value
from tierwise_sidecar.errors import NOT_FOUND, PERMISSION, ApiError, bad_request
from tierwise_sidecar.metrics import METRICS, Metrics

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime
    from tierwise_sidecar.state import SharedState

TIER_HEADER = "x-tierwise-tier"
PRIORITY_HEADER = "x-tierwise-priority"
SESSION_HEADER = "x-tierwise-session"
TENANT_HEADER = "x-tierwise-tenant"

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
MAX_SESSION = 256


class Priority(IntEnum):
    """A request's priority within its tier; the tier's own priority orders the tiers."""

    LOW = -1
    NORMAL = 0
    HIGH = 1


@value
class Identity:
    namespace: str
    tenant: str | None
    tier: str
    priority: Priority
    session: str | None
    # The model the request named when it named nothing the namespace serves and the default tier
    # took it instead.
    substituted: str | None = None


@dataclass(frozen=True, slots=True)
class TierAccess:
    """What identify needs to know of a Policy."""

    namespace: str
    tiers: Collection[str]
    unavailable: Collection[str]
    default: str | None
    # Every request is the default tier's: set in the ingress role, where the request is already
    # inside one of that tier's replicas and naming another tier cannot take it anywhere else.
    pinned: bool = False
    # A model some usable tier serves -> the tier a request naming it goes to.
    models: Mapping[str, str] = field(default_factory=dict)
    refuse_unknown_models: bool = False


def _tier(requested: str | None, model: Any, access: TierAccess) -> str:
    if access.pinned and access.default is not None:
        return access.default
    if requested is not None:
        if requested in access.tiers:
            return requested
        if requested in access.unavailable:
            raise ApiError(
                403,
                f"tier {requested!r} is not available to namespace {access.namespace}",
                PERMISSION,
                "tier_not_allowed",
                param=TIER_HEADER,
            )
        raise ApiError(404, f"tier {requested!r} does not exist", NOT_FOUND, "tier_not_found", param=TIER_HEADER)
    if isinstance(model, str):
        if model in access.tiers or model in access.unavailable:
            return _tier(model, None, access)
        served = access.models.get(model)
        if served is not None:
            return served
    if access.default is None:
        raise bad_request(
            f"no tier requested and namespace {access.namespace} has no default tier: set the {TIER_HEADER} header",
            "tier_required",
            TIER_HEADER,
        )
    return access.default


def _priority(value: str | None) -> Priority:
    if value is None:
        return Priority.NORMAL
    try:
        return Priority[value.strip().upper()]
    except KeyError:
        raise bad_request(
            f"{PRIORITY_HEADER} must be one of high, normal, low (got {value[:32]!r})",
            "invalid_priority",
            PRIORITY_HEADER,
        ) from None


def identify(headers: Mapping[str, str], body: Mapping[str, Any], access: TierAccess) -> Identity:
    tenant = headers.get(TENANT_HEADER)
    if tenant is not None and not _TENANT.match(tenant):
        raise bad_request(
            f"{TENANT_HEADER} must be 1-128 letters, digits or ._:@- starting with a letter or digit",
            "invalid_tenant",
            TENANT_HEADER,
        )
    session = headers.get(SESSION_HEADER) or body.get("user") or None
    if session is not None and (not isinstance(session, str) or len(session) > MAX_SESSION):
        raise bad_request(f"a session id is a string of at most {MAX_SESSION} characters", "invalid_session")
    requested = headers.get(TIER_HEADER)
    model = body.get("model")
    tier = _tier(requested, model, access)
    substituted = None
    if requested is None and isinstance(model, str) and not access.pinned and _unknown(model, access):
        if access.refuse_unknown_models:
            raise ApiError(
                404,
                f"model {model!r} is not served in namespace {access.namespace}: name a tier "
                f"({', '.join(sorted(access.tiers))}) or a model one of them serves",
                NOT_FOUND,
                "model_not_found",
                param="model",
            )
        substituted = model
    return Identity(
        namespace=access.namespace,
        tenant=tenant,
        tier=tier,
        priority=_priority(headers.get(PRIORITY_HEADER)),
        session=session,
        substituted=substituted,
    )


def _unknown(model: str, access: TierAccess) -> bool:
    return model not in access.tiers and model not in access.unavailable and model not in access.models


def model_routes(tiers: Mapping[str, tuple[int, Collection[str]]], default: str | None) -> dict[str, str]:
    """Which tier a request naming a model goes to: the default tier when it serves the model, else
    the least privileged (lowest priority, then name) of the tiers serving it. `tiers`: each tier's
    priority and models."""
    out: dict[str, str] = {}
    for name, (_, models) in sorted(tiers.items(), key=lambda kv: (kv[0] != default, kv[1][0], kv[0])):
        for model in models:
            out.setdefault(model, name)
    return out


class IdentifyStage:
    name = "identify"

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def enter(self, x: Exchange) -> Reply | None:
        x.identity = who = identify(x.headers, x.body, x.runtime.access)
        if who.substituted is not None:
            self.metrics.substituted.inc((who.namespace, who.tier))
        return None

    async def leave(self, x: Exchange) -> None:
        return None


def build(runtime: Runtime, state: SharedState) -> IdentifyStage:
    return IdentifyStage(state.get(METRICS))
