"""The operator's own metrics, served on /metrics beside the health endpoints."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.writes = Counter(
            "tierwise_operator_api_writes", "Write requests sent to the API server, by verb and kind.",
            ["verb", "kind"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "tierwise_operator_reconcile_errors", "Failed reconciles, by key type and error.", ["key", "error"],
            registry=r,
        )  # fmt: skip
        self.reconcile_seconds = Histogram(
            "tierwise_operator_reconcile_duration_seconds", "Time of one reconcile, by key type.", ["key"],
            registry=r,
        )  # fmt: skip
        self.scale_decisions = Counter(
            "tierwise_operator_scale_decisions", "Replica changes decided by the built-in autoscaler.",
            ["direction"], registry=r,
        )  # fmt: skip
        self.policies_held = Gauge(
            "tierwise_operator_policy_held",
            "1 while a namespace keeps its last good Policy because an object it uses is invalid.",
            ["namespace"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("tierwise_operator_queue_depth", "Keys queued or being reconciled.", registry=r)
        self.observe_seconds = Histogram(
            "tierwise_operator_observe_duration_seconds", "Time of one observer pass (autoscaler, slo, spend).",
            ["observer"], registry=r,
        )  # fmt: skip
        self.prometheus_queries = Counter(
            "tierwise_operator_prometheus_queries", "Queries sent to Prometheus, by observer.", ["observer"],
            registry=r,
        )  # fmt: skip

    def count_write(self, verb: str, kind: str) -> None:
        self.writes.labels(verb, kind).inc()
