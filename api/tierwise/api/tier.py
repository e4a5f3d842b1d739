"""InferenceTier: one service tier (gold, silver, bronze, ...) with its models, SLOs and behaviour."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from tierwise.api.autoscaling import (
    Autoscaling,
    AutoscalingMode,
    ScalingSchedule,
    ScalingSignal,
    Weekday,
)
from tierwise.api.common import (
    DNS_LABEL,
    NAME_MAX,
    ApiModel,
    Invariant,
    NamespaceSelection,
    SecretKeyRef,
    ordered,
    strictly_ascending,
)
from tierwise.api.tierstatus import Diversion, InferenceTierStatus, ObservedLatency, SLOState

# Re-exported: the tier's spec and status are used from here by the compiler, operator and sidecar.
__all__ = [
    "Autoscaling",
    "AutoscalingMode",
    "Diversion",
    "InferenceTierStatus",
    "ObservedLatency",
    "SLOState",
    "ScalingSchedule",
    "ScalingSignal",
    "Weekday",
]


class Pricing(ApiModel):
    """Price of a backend in USD per million tokens. Required: an unpriced model is never free."""

    input_per_million: float = Field(ge=0, le=10000, description="USD per million prompt tokens.")
    output_per_million: float = Field(ge=0, le=10000, description="USD per million completion tokens.")
    cached_input_per_million: float | None = Field(
        default=None,
        ge=0,
        le=10000,
        description="USD per million prompt tokens served from the provider's prompt cache; "
        "defaults to the input price.",
    )


class Capabilities(ApiModel):
    """What a backend can do, used by routing and context fitting."""

    max_context_tokens: int = Field(
        default=8192, ge=256, le=10_000_000, description="Largest prompt plus completion the model accepts."
    )
    strength: int = Field(
        default=50,
        ge=0,
        le=100,
        description="Relative quality score (0-100). Cost-aware routing sends hard requests to the "
        "strongest backends and easy ones to the cheapest.",
    )


class ReplicaRange(ApiModel):
    """Bounds on the replicas of a self-hosted backend."""

    min: int = Field(default=1, ge=0, le=1000, description="Fewest replicas (0 allows scale to zero).")
    max: int = Field(default=1, ge=1, le=1000, description="Most replicas.")

    invariants = (ordered("min", "max"),)


class ResourceRequirements(ApiModel):
    """Container resources, as Kubernetes quantities (e.g. cpu: 500m, memory: 2Gi)."""

    requests: dict[str, str] = Field(default_factory=dict, description="Resources reserved for the container.")
    limits: dict[str, str] = Field(default_factory=dict, description="Resource limits of the container.")


class EnvVar(ApiModel):
    """An environment variable of the model-server container."""

    name: str = Field(min_length=1, max_length=256, description="Variable name.")
    value: str = Field(default="", max_length=32768, description="Variable value.")


class SelfHostedDeployment(ApiModel):
    """A model server the operator runs: it owns a Deployment, a Service and a headless Service."""

    image: str = Field(min_length=1, max_length=1024, description="Container image of the model server.")
    args: list[str] = Field(default_factory=list, max_length=128, description="Arguments of the container.")
    env: list[EnvVar] = Field(default_factory=list, max_length=128, description="Environment variables.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the OpenAI-compatible API listens on.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="CPU, memory and accelerator resources."
    )
    replicas: ReplicaRange = Field(default_factory=ReplicaRange, description="Replica bounds.")
    max_concurrency_per_replica: int = Field(
        default=16, ge=1, le=100_000, description="In-flight requests one replica serves at once."
    )
    sidecar: bool = Field(
        default=False,
        description="Put the tierwise sidecar in front of the model server to enforce per-replica "
        "concurrency and priority shedding.",
    )


class Backend(ApiModel):
    """One model endpoint of a tier: an external OpenAI-compatible API or a self-hosted server."""

    name: str = Field(
        min_length=1, max_length=NAME_MAX, pattern=DNS_LABEL, description="Name of the backend within the tier."
    )
    model: str = Field(min_length=1, max_length=256, description="Model name sent to the backend.")
    pricing: Pricing = Field(description="Price per million tokens.")
    weight: int = Field(default=1, ge=0, le=1000, description="Share of traffic under weighted routing.")
    capabilities: Capabilities = Field(default_factory=Capabilities, description="Context size and strength.")
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="Base URL of an external OpenAI-compatible API (e.g. https://api.openai.com/v1).",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key for `url`; never logged."
    )
    deployment: SelfHostedDeployment | None = Field(
        default=None, description="Self-hosted model server run by the operator."
    )

    invariants = (
        Invariant(
            rule="has(self.url) != has(self.deployment)",
            message="exactly one of url and deployment must be set",
            holds=lambda s: (s.url is None) != (s.deployment is None),
        ),
        Invariant(
            rule="!has(self.apiKeySecretRef) || has(self.url)",
            message="apiKeySecretRef is only valid with url",
            holds=lambda s: s.api_key_secret_ref is None or s.url is not None,
            field=".apiKeySecretRef",
        ),
    )


class SLO(ApiModel):
    """The service level the tier promises; the operator compares it with what Prometheus observes."""

    first_token_p95_milliseconds: int | None = Field(
        default=None, ge=1, le=3_600_000, description="95th percentile of time to first byte."
    )
    first_token_p99_milliseconds: int | None = Field(
        default=None, ge=1, le=3_600_000, description="99th percentile of time to first byte."
    )
    total_p95_milliseconds: int | None = Field(
        default=None, ge=1, le=3_600_000, description="95th percentile of time to the whole response."
    )
    total_p99_milliseconds: int | None = Field(
        default=None, ge=1, le=3_600_000, description="99th percentile of time to the whole response."
    )
    availability_percent: float = Field(
        default=99.0,
        gt=0,
        le=100,
        description="Share of requests the caller sees succeed (after retries and fallback).",
    )
    max_error_rate_percent: float = Field(
        default=5.0,
        ge=0,
        le=100,
        description="Error budget of backend attempts (before fallback hides them); above it the tier is Degraded.",
    )
    window_seconds: int = Field(default=300, ge=30, le=86400, description="Window the SLO is evaluated over.")

    invariants = (
        ordered("first_token_p95_milliseconds", "first_token_p99_milliseconds"),
        ordered("total_p95_milliseconds", "total_p99_milliseconds"),
        ordered("first_token_p99_milliseconds", "total_p99_milliseconds"),
        ordered("first_token_p95_milliseconds", "total_p95_milliseconds"),
    )


class RoutingStrategy(StrEnum):
    COST_AWARE = "CostAware"
    WEIGHTED = "Weighted"
    LEAST_LOADED = "LeastLoaded"


class Stickiness(ApiModel):
    """Keep a session on one backend and replica so it keeps provider and KV caches warm."""

    enabled: bool = Field(default=False, description="Pin sessions to a backend and replica.")
    ttl_seconds: int = Field(default=1800, ge=1, le=604800, description="How long an idle session stays pinned.")


class CostAwareRouting(ApiModel):
    """Thresholds on the difficulty score (0 easy .. 1 hard) of a request."""

    cheap_below: float = Field(default=0.35, ge=0, le=1, description="Scores below this go to the cheapest backend.")
    strong_at_or_above: float = Field(
        default=0.7, ge=0, le=1, description="Scores at or above this go to the strongest backend."
    )

    invariants = (ordered("cheap_below", "strong_at_or_above"),)


class Routing(ApiModel):
    """How a request picks a backend of the tier."""

    strategy: RoutingStrategy = Field(
        default=RoutingStrategy.WEIGHTED, description="CostAware, Weighted or LeastLoaded."
    )
    stickiness: Stickiness = Field(default_factory=Stickiness, description="Session stickiness.")
    cost_aware: CostAwareRouting = Field(
        default_factory=CostAwareRouting, description="Difficulty thresholds for CostAware routing."
    )


class FailureKind(StrEnum):
    SERVER_ERROR = "ServerError"
    TIMEOUT = "Timeout"
    CONNECTION_ERROR = "ConnectionError"
    RATE_LIMITED = "RateLimited"
    CIRCUIT_OPEN = "CircuitOpen"
    OVERLOADED = "Overloaded"


class Fallback(ApiModel):
    """Where a request goes when every backend of this tier failed."""

    tier: str = Field(min_length=1, max_length=NAME_MAX, pattern=DNS_LABEL, description="Next tier to try.")
    # Not `on`: YAML 1.1 (PyYAML, kubectl) reads that key as the boolean true.
    triggers: list[FailureKind] = Field(
        default_factory=lambda: [
            FailureKind.SERVER_ERROR,
            FailureKind.TIMEOUT,
            FailureKind.CONNECTION_ERROR,
            FailureKind.CIRCUIT_OPEN,
        ],
        min_length=1,
        max_length=6,
        description="Failures that trigger the fallback.",
    )


class Promotion(ApiModel):
    """When this tier misses its SLO, borrow capacity from another tier."""

    borrow_from: str = Field(
        min_length=1, max_length=NAME_MAX, pattern=DNS_LABEL, description="Tier whose backends may be borrowed."
    )
    max_borrow_percent: int = Field(
        default=20, ge=1, le=100, description="Most of this tier's traffic that may be sent there."
    )


class RateLimitScope(StrEnum):
    TENANT = "Tenant"
    NAMESPACE = "Namespace"
    POD = "Pod"


class RateLimit(ApiModel):
    """Token buckets on requests and tokens; shared across replicas when Redis is configured."""

    requests_per_second: float | None = Field(default=None, gt=0, le=1_000_000, description="Sustained request rate.")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Sustained token rate (prompt + completion).")
    burst: int | None = Field(
        default=None, ge=1, description="Bucket size in requests; defaults to one second of requestsPerSecond."
    )
    scope: RateLimitScope = Field(
        default=RateLimitScope.TENANT, description="Whose traffic shares a bucket: Tenant, Namespace or Pod."
    )

    invariants = (
        Invariant(
            rule="has(self.requestsPerSecond) || has(self.tokensPerMinute)",
            message="at least one of requestsPerSecond and tokensPerMinute must be set",
            holds=lambda s: s.requests_per_second is not None or s.tokens_per_minute is not None,
        ),
    )


class Concurrency(ApiModel):
    """How many requests one sidecar keeps in flight to each upstream target of the tier."""

    max_in_flight: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Most requests in flight to one target (a model at one URL or replica) from one sidecar: "
        "the ceiling of the adaptive limit, or the limit itself when adaptive is false.",
    )
    adaptive: bool = Field(
        default=True,
        description="Learn the limit from the target's latency against the SLO, its queueing and its 429s "
        "(below maxInFlight); false fixes it at maxInFlight.",
    )


class ShedPolicy(StrEnum):
    LOWEST_PRIORITY_FIRST = "LowestPriorityFirst"
    NEWEST_FIRST = "NewestFirst"
    OLDEST_FIRST = "OldestFirst"


class Queue(ApiModel):
    """Waiting room when the tier is at its concurrency bound."""

    max_wait_milliseconds: int = Field(
        default=5000, ge=0, le=600_000, description="Longest a request waits before a 429 with Retry-After."
    )
    max_length: int = Field(default=256, ge=0, le=100_000, description="Most requests waiting at once.")
    shed: ShedPolicy = Field(
        default=ShedPolicy.LOWEST_PRIORITY_FIRST, description="Which waiting request is refused when full."
    )


class DegradationStep(ApiModel):
    """What to change in requests from a load level on."""

    at_load_percent: int = Field(ge=1, le=100, description="Load (share of concurrency in use) where this step starts.")
    max_tokens: int | None = Field(default=None, ge=1, description="Cap on max_tokens.")
    max_temperature: float | None = Field(default=None, ge=0, le=2, description="Cap on temperature.")
    cheapest_backend: bool = Field(default=False, description="Route to the cheapest backend of the tier.")
    disable_streaming: bool = Field(default=False, description="Answer streamed requests in one piece.")


class Degradation(ApiModel):
    """Serve worse instead of failing when loaded; applied steps are signalled in a response header."""

    steps: list[DegradationStep] = Field(
        default_factory=list, max_length=8, description="Steps in strictly ascending order of atLoadPercent."
    )

    invariants = (strictly_ascending("steps", "at_load_percent"),)


class Batch(ApiModel):
    """Asynchronous OpenAI-Batch-style jobs on this tier, processed at low priority."""

    enabled: bool = Field(default=False, description="Accept batch jobs.")
    max_batch_size: int = Field(default=32, ge=1, le=10000, description="Requests sent together.")
    max_delay_seconds: int = Field(default=60, ge=0, le=86400, description="Longest a request waits for a batch.")
    completion_window_hours: int = Field(default=24, ge=1, le=168, description="Promised completion window.")


class Segmentation(StrEnum):
    KEEP_RECENT = "KeepRecent"
    BY_IMPORTANCE = "ByImportance"
    BY_TOPIC = "ByTopic"
    REJECT = "Reject"


class ContextPolicy(ApiModel):
    """How conversation history is fitted into the prompt budget."""

    max_prompt_tokens: int | None = Field(
        default=None, ge=64, description="Prompt budget; defaults to the smallest backend context."
    )
    segmentation: Segmentation = Field(
        default=Segmentation.KEEP_RECENT,
        description="KeepRecent, ByImportance, ByTopic, or Reject (413 instead of trimming).",
    )
    keep_system: bool = Field(default=True, description="Always keep system messages.")
    min_recent_messages: int = Field(default=2, ge=1, le=1000, description="Most recent messages always kept.")


class Access(ApiModel):
    """Which namespaces may use the tier; by default only its own."""

    namespaces: NamespaceSelection | None = Field(
        default=None,
        description="Namespaces allowed to use the tier besides its own. Only tiers in the platform "
        "namespace may reach other namespaces.",
    )
    default: bool = Field(
        default=False,
        description="Requests from the tier's own namespace without a tier header use this tier "
        "(a team's quickstart needs no namespace name).",
    )
    default_for: NamespaceSelection | None = Field(
        default=None, description="Namespaces whose requests without a tier header use this tier."
    )


class InferenceTierSpec(ApiModel):
    """Desired state of an InferenceTier."""

    priority: int = Field(
        default=0,
        ge=-1000,
        le=1000,
        description="Higher is served first under contention; 0 is standard; negative is sheddable.",
    )
    description: str | None = Field(default=None, max_length=1024, description="What the tier is for.")
    backends: list[Backend] = Field(
        min_length=1,
        max_length=16,
        description="Model endpoints of the tier.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    slo: SLO = Field(default_factory=SLO, description="Service level objectives.")
    routing: Routing = Field(default_factory=Routing, description="Backend choice.")
    fallback: Fallback | None = Field(default=None, description="Next tier on failure.")
    promotion: Promotion | None = Field(default=None, description="Capacity borrowing when the SLO is missed.")
    rate_limit: RateLimit | None = Field(default=None, description="Token-bucket limits.")
    concurrency: Concurrency = Field(default_factory=Concurrency, description="In-flight bound.")
    queue: Queue = Field(default_factory=Queue, description="Waiting room under contention.")
    degradation: Degradation = Field(default_factory=Degradation, description="Graceful degradation.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica management.")
    batch: Batch = Field(default_factory=Batch, description="Asynchronous batch jobs.")
    context: ContextPolicy = Field(default_factory=ContextPolicy, description="Prompt fitting.")
    access: Access = Field(default_factory=Access, description="Who may use the tier.")

    invariants = (
        Invariant(
            rule="self.backends.all(b, self.backends.exists_one(c, c.name == b.name))",
            message="duplicate backend name: backend names must be unique",
            holds=lambda s: len({b.name for b in s.backends}) == len(s.backends),
            field=".backends",
        ),
        Invariant(
            # The strategy defaults to Weighted, so an absent routing is Weighted too.
            rule="(has(self.routing) && has(self.routing.strategy) && self.routing.strategy != 'Weighted')"
            " || self.backends.exists(b, !has(b.weight) || b.weight > 0)",
            message="under Weighted routing at least one backend needs a weight above 0",
            holds=lambda s: s.routing.strategy is not RoutingStrategy.WEIGHTED or any(b.weight > 0 for b in s.backends),
            field=".backends",
        ),
    )
