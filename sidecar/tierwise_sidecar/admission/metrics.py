"""Admission metrics in Prometheus conventions. Per backend (labels from the Policy): requests
waiting, which the operator's QueueDepth autoscaling signal sums; per target (a model at a host,
never a URL's path or credentials): its limit, slots in use and waiters; per tier: the wait,
refusals by reason and degraded requests by change; whether rate limits run on a local share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierwise_sidecar.hotmetrics import FastCounter, FastGauge, FastHistogram
from tierwise_sidecar.metrics import LATENCY_BUCKETS, METRICS
from tierwise_sidecar.state import Key, SharedState

# (target, limit, in flight, waiting, decreases, increases)
TargetLoad = Callable[[], Iterable[tuple[str, float, int, int, int, int]]]


class _Targets(Collector):
    def __init__(self) -> None:
        self.load: TargetLoad = lambda: ()

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily("tierwise_admission_limit", "Concurrency limit of an upstream target (adaptive "
                                  "or static).", labels=["target"])  # fmt: skip
        busy = GaugeMetricFamily("tierwise_admission_in_flight", "Slots of an upstream target in use.",
                                 labels=["target"])  # fmt: skip
        waiting = GaugeMetricFamily("tierwise_admission_waiting", "Requests waiting for a slot of an upstream target.",
                                    labels=["target"])  # fmt: skip
        changes = CounterMetricFamily("tierwise_admission_limit_changes", "Adaptive limit changes, by direction.",
                                      labels=["target", "direction"])  # fmt: skip
        for target, n, used, queued, down, up in self.load():
            limit.add_metric([target], n)
            busy.add_metric([target], used)
            waiting.add_metric([target], queued)
            changes.add_metric([target, "down"], down)
            changes.add_metric([target, "up"], up)
        yield from (limit, busy, waiting, changes)


class AdmissionMetrics:
    def __init__(self, state: SharedState) -> None:
        r = state.get(METRICS).registry
        self.waiting = FastGauge(
            "tierwise_queue_waiting_requests", "Requests waiting for a slot, by the backend they wait for.",
            ["namespace", "tier", "backend"], r,
        )  # fmt: skip
        self.wait = FastHistogram(
            "tierwise_queue_wait_seconds", "Time requests waited for a slot (0 when one was free).",
            ["namespace", "tier"], LATENCY_BUCKETS, r,
        )  # fmt: skip
        self.refusals = FastCounter(
            "tierwise_admission_refusals", "Requests admission refused, by reason (rate_requests, rate_tokens, "
            "saturated, wait, full, displaced, draining).", ["namespace", "tier", "reason"], r,
        )  # fmt: skip
        self.degraded = FastCounter(
            "tierwise_degraded_requests", "Requests served degraded under load, by change (max_tokens, temperature, "
            "cheapest_backend, no_stream).", ["namespace", "tier", "change"], r,
        )  # fmt: skip
        self.requeued = FastCounter(
            "tierwise_admission_requeued", "Tries a busy target turned away that waited for a slot again.",
            ["namespace", "tier"], r,
        )  # fmt: skip
        self.local_share = FastGauge(
            "tierwise_rate_limit_local_share", "1 while shared rate limits are enforced on this sidecar's share "
            "(Redis unreachable), else 0.", [], r,
        )  # fmt: skip
        self.peers = FastGauge(
            "tierwise_rate_limit_peers", "Sidecars sharing this namespace's rate limits, as last seen in Redis.", [], r
        )
        self.targets = _Targets()
        r.register(self.targets)


ADMISSION_METRICS = Key("admission-metrics", AdmissionMetrics)
