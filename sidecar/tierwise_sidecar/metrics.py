"""Prometheus metrics of the sidecar (DESIGN §4): `tierwise_` prefix, base units, `_total`
counters, histograms for latency.

Label values come from the Policy (namespace, tier, backend: bounded by what was declared) or from
fixed sets (outcome, decision, failure kind). The one caller-controlled label, tenant, is bounded:
the first `max_tenants` distinct tenants keep their name, later ones are counted as `other`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierwise.api.tier import SLO
from tierwise_sidecar.hotmetrics import FastCounter, FastGauge, FastHistogram
from tierwise_sidecar.state import Key, SharedState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
NO_TENANT = "none"
OTHER_TENANT = "other"


class TenantLabels:
    """Caps the number of distinct tenant label values."""

    def __init__(self, max_tenants: int = 100) -> None:
        self._seen: set[str] = set()
        self._max = max_tenants

    def __call__(self, tenant: str | None) -> str:
        if tenant is None:
            return NO_TENANT
        if tenant in self._seen:
            return tenant
        if len(self._seen) < self._max:
            self._seen.add(tenant)
            return tenant
        return OTHER_TENANT


# (namespace, tier, backend, attempts in flight)
BackendLoad = Callable[[], Iterable[tuple[str, str, str, int]]]


class BackendInFlight(Collector):
    """Attempts in flight per backend, read at scrape time from the counts routing already keeps.

    Every declared backend is exported, idle ones as 0: the operator's autoscaler tells "no load"
    (scale down) from "no data" (hold) by whether the series exists.
    """

    def __init__(self, load: BackendLoad) -> None:
        self._load = load

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "tierwise_backend_in_flight_requests",
            "Attempts in flight to a backend from this sidecar.",
            labels=["namespace", "tier", "backend"],
        )
        for namespace, tier, backend, n in self._load():
            g.add_metric([namespace, tier, backend], n)
        yield g


# (namespace, tier, its SLO)
Objectives = Callable[[], Iterable[tuple[str, str, SLO]]]
_LATENCY_OBJECTIVES = (
    ("first_byte", "0.95", "first_token_p95_milliseconds"),
    ("first_byte", "0.99", "first_token_p99_milliseconds"),
    ("total", "0.95", "total_p95_milliseconds"),
    ("total", "0.99", "total_p99_milliseconds"),
)


class TierObjectives(Collector):
    """Each tier's objectives from the Policy in force: the alert rules compare the error ratio with
    the error budget the availability objective leaves (burn rates), and the dashboard draws
    latency against its targets, whatever each tier declared."""

    def __init__(self, objectives: Objectives) -> None:
        self._objectives = objectives

    def collect(self) -> Iterator[Metric]:
        availability = GaugeMetricFamily(
            "tierwise_tier_availability_objective_ratio",
            "The tier's slo.availabilityPercent as a ratio (the Policy in force).",
            labels=["namespace", "tier"],
        )
        latency = GaugeMetricFamily(
            "tierwise_tier_latency_objective_seconds",
            "The tier's declared latency targets (the Policy in force), by measure and quantile.",
            labels=["namespace", "tier", "measure", "quantile"],
        )
        for namespace, tier, slo in self._objectives():
            availability.add_metric([namespace, tier], slo.availability_percent / 100)
            for measure, q, attr in _LATENCY_OBJECTIVES:
                ms = getattr(slo, attr)
                if ms is not None:
                    latency.add_metric([namespace, tier, measure, q], ms / 1000)
        yield availability
        yield latency


class Metrics:
    """The sidecar's metrics. Those updated on every request are hot-path families (a dict update,
    no lock: see hotmetrics); the rest are prometheus_client's own."""

    def __init__(self, registry: CollectorRegistry | None = None, max_tenants: int = 100) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.tenant = TenantLabels(max_tenants)
        who = ["namespace", "tenant", "tier"]
        self.requests = FastCounter(
            "tierwise_requests", "Requests answered, by served tier, backend and HTTP status.",
            [*who, "backend", "code"], r,
        )  # fmt: skip
        self.invalid = FastCounter(
            "tierwise_invalid_requests", "Requests refused before routing, by error code.", ["namespace", "code"], r
        )
        self.duration = FastHistogram(
            "tierwise_request_duration_seconds", "Time to the whole response, fallbacks included.",
            ["namespace", "tier"], LATENCY_BUCKETS, r,
        )  # fmt: skip
        self.first_byte = FastHistogram(
            "tierwise_time_to_first_byte_seconds", "Time to the first streamed byte sent to the caller.",
            ["namespace", "tier"], LATENCY_BUCKETS, r,
        )  # fmt: skip
        # Each backend's own latency, from the start of the try that answered (failovers before it
        # excluded): what the operator's SLA controller judges a backend on.
        self.backend_first_byte = FastHistogram(
            "tierwise_backend_first_byte_seconds", "Time from a successful try's start to the backend's first byte.",
            ["namespace", "tier", "backend"], LATENCY_BUCKETS, r,
        )  # fmt: skip
        self.backend_duration = FastHistogram(
            "tierwise_backend_duration_seconds", "Time from the answering try's start to the end of the response.",
            ["namespace", "tier", "backend"], LATENCY_BUCKETS, r,
        )  # fmt: skip
        self.tokens = FastCounter(
            "tierwise_tokens", "Tokens used, as reported by the provider (or counted when it does not say).",
            [*who, "backend", "kind"], r,
        )  # fmt: skip
        self.cost = FastCounter(
            "tierwise_cost_usd", "Actual cost in USD from the backend's pricing.", [*who, "backend"], r
        )
        self.estimated_cost = FastCounter(
            "tierwise_estimated_cost_usd", "Upper-bound cost estimated before the call.", who, r
        )
        self.attempts = FastCounter(
            "tierwise_upstream_attempts", "Attempts sent to backends, by result (ok, client_error or a failure kind).",
            ["namespace", "tier", "backend", "result"], r,
        )  # fmt: skip
        self.route = FastCounter(
            "tierwise_route_decisions", "Backend choices, by strategy decision.", ["tier", "decision", "backend"], r
        )
        self.route_score = FastHistogram(
            "tierwise_route_score", "Difficulty score of cost-aware routed requests (0 easy .. 1 hard).", ["tier"],
            SCORE_BUCKETS, r,
        )  # fmt: skip
        self.in_flight = FastGauge("tierwise_in_flight_requests", "Requests being served.", ["tier"], r)
        self.responses = FastCounter(
            "tierwise_http_responses", "Every HTTP response of the gateway, by endpoint and status, whatever answered.",
            ["endpoint", "code"], r,
        )  # fmt: skip
        self.steered = FastCounter(
            "tierwise_steered_requests", "Requests the operator's SLO steering sent to another tier, by reason "
            "(promoted, fallback).", ["namespace", "tier", "to", "reason"], r,
        )  # fmt: skip
        self.substituted = FastCounter(
            "tierwise_model_substitutions", "Requests naming a model the namespace does not serve, served by the "
            "default tier instead.", ["namespace", "tier"], r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "tierwise_fallbacks", "Requests moved to a fallback tier.", ["from_tier", "to_tier", "reason"], registry=r
        )
        self.resumes = Counter(
            "tierwise_stream_interruptions", "Streams cut mid-way, by how they ended (resumed or error_event).",
            ["tier", "outcome"], registry=r,
        )  # fmt: skip
        self.open_circuits = Gauge(
            "tierwise_circuit_open_targets", "Endpoints of a backend whose circuit breaker is open.",
            ["tier", "backend"], registry=r,
        )  # fmt: skip
        self.session_moves = Counter(
            "tierwise_session_moves", "Sticky sessions moved to another target because theirs failed.", ["tier"],
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "tierwise_policy_reloads", "Policy reloads, by result (applied or refused).", ["result"], registry=r
        )
        self.policy_info = Gauge(
            "tierwise_policy_info", "The Policy in force (value 1), by namespace and content hash.",
            ["namespace", "hash"], registry=r,
        )  # fmt: skip
        self.policy_loaded = Gauge(
            "tierwise_policy_loaded_timestamp_seconds", "When the Policy in force was loaded.", registry=r
        )

    def watch_backends(self, load: BackendLoad) -> None:
        self.registry.register(BackendInFlight(load))

    def watch_objectives(self, objectives: Objectives) -> None:
        self.registry.register(TierObjectives(objectives))


def _metrics(state: SharedState) -> Metrics:
    return Metrics(max_tenants=state.config.max_tenants)


METRICS = Key("metrics", _metrics)
