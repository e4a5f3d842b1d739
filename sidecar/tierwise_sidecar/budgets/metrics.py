"""Budget metrics in Prometheus conventions: limits, spend, holds and what is left, per budget
(labels from the Policy, so bounded), read at scrape time from the ledger; refusals and actions
as counters; whether the shared store is reachable."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierwise.api.budget import BudgetState
from tierwise.budgetrules import BudgetRule
from tierwise.money import MICROS_PER_USD
from tierwise.periods import Window
from tierwise_sidecar.metrics import METRICS
from tierwise_sidecar.state import Key, SharedState

if TYPE_CHECKING:
    from tierwise_sidecar.budgets.ledger import Ledger

LABELS = ["budget_namespace", "budget"]


def _labels(rule: BudgetRule) -> tuple[str, str]:
    namespace, _, name = rule.key.partition("/")
    return namespace, name


class BudgetMetrics(Collector):
    def __init__(self, state: SharedState) -> None:
        registry = state.get(METRICS).registry
        self.refusals = Counter(
            "tierwise_budget_refusals", "Requests a budget refused, by reason (limit, throttle, per_request).",
            [*LABELS, "reason"], registry=registry,
        )  # fmt: skip
        self.actions = Counter(
            "tierwise_budget_actions", "Budget thresholds acting on requests (notify, downgrade; dry_run_refusal and "
            "dry_run_downgrade: what a dry-run budget would have done).", [*LABELS, "action"], registry=registry,
        )  # fmt: skip
        self._rules: tuple[BudgetRule, ...] = ()
        self._ledger: Ledger | None = None
        self._windows: Callable[[BudgetRule, float], Window] | None = None
        self._clock: Callable[[], float] | None = None
        registry.register(self)

    def watch(
        self,
        rules: Sequence[BudgetRule],
        ledger: Ledger,
        windows: Callable[[BudgetRule, float], Window],
        clock: Callable[[], float],
    ) -> None:
        """Report these budgets (the Policy in force) from now on."""
        self._rules, self._ledger, self._windows, self._clock = tuple(rules), ledger, windows, clock

    def refused(self, rule: BudgetRule, reason: str) -> None:
        self.refusals.labels(*_labels(rule), reason).inc()

    def action(self, rule: BudgetRule, action: str) -> None:
        self.actions.labels(*_labels(rule), action).inc()

    def collect(self) -> Iterator[Metric]:
        ledger, windows, clock = self._ledger, self._windows, self._clock
        if ledger is None or windows is None or clock is None:
            return
        usd = {
            name: GaugeMetricFamily(f"tierwise_budget_{name}_usd", f"Budget {what} in USD this period.", labels=LABELS)
            for name, what in (("limit", "limit"), ("spent", "spend settled"), ("reserved", "held by requests in "
                               "flight"), ("remaining", "left"))
        }  # fmt: skip
        tokens = {
            name: GaugeMetricFamily(
                f"tierwise_budget_{name}_tokens", f"Budget {name} in tokens this period.", labels=LABELS
            )
            for name in ("limit", "spent", "reserved", "remaining")
        }
        # This sidecar's own part, where it keeps its own ledger (no shared store): the operator
        # sums max_over_time of these across sidecars, the ones gone included, for the period.
        own = {
            (name, unit): GaugeMetricFamily(
                f"tierwise_budget_own_{name}_{unit}",
                f"Budget {name} in {'USD' if unit == 'usd' else unit} this period by this sidecar alone.",
                labels=LABELS,
            )
            for name in ("spent", "reserved")
            for unit in ("usd", "tokens")
        }
        state = GaugeMetricFamily(
            "tierwise_budget_state", "The budget's state (1 for the current one).", labels=[*LABELS, "state"]
        )
        now = clock()
        for rule in self._rules:
            labels = list(_labels(rule))
            w = windows(rule, now)
            t = ledger.totals(rule, w)
            mine = ledger.own(rule, w)
            if mine is not None:
                for name, amount in (("spent", mine.spent), ("reserved", mine.held)):
                    own[(name, "usd")].add_metric(labels, amount.micros / MICROS_PER_USD)
                    own[(name, "tokens")].add_metric(labels, amount.tokens)
            left = rule.remaining(t.committed)
            if rule.has_usd:
                for name, micros in (("limit", rule.limit.micros), ("spent", t.spent.micros),
                                     ("reserved", t.held.micros), ("remaining", left.micros)):  # fmt: skip
                    usd[name].add_metric(labels, micros / MICROS_PER_USD)
            if rule.has_tokens:
                for name, n in (("limit", rule.limit.tokens), ("spent", t.spent.tokens),
                                ("reserved", t.held.tokens), ("remaining", left.tokens)):  # fmt: skip
                    tokens[name].add_metric(labels, n)
            current = rule.state(t.committed)
            for s in BudgetState:
                state.add_metric([*labels, s.value], 1 if s is current else 0)
        yield from usd.values()
        yield from tokens.values()
        yield from own.values()
        yield state
        yield GaugeMetricFamily(
            "tierwise_budget_store_degraded",
            "1 while the shared budget store is unreachable and this sidecar enforces on its own ledger.",
            value=1 if ledger.degraded else 0,
        )


BUDGET_METRICS = Key("budget-metrics", BudgetMetrics)
