"""What happens to a replay besides its requests: the trace meta's provider outage and budget.

A trace cannot make a provider fail or give a tenant a budget; its meta (tracegen's, or one a
user writes) says so and the replay applies it. The outage hits a model, in every strategy that
sends to it, as an outage of a provider would; the budget is the Policy's own business (the
premium and cheapest strategies keep no budgets), so it joins the `policy` strategy only.
Pure functions here; the runner does the timing.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierwise.api.budget import Amount, BudgetSelector, CostBudgetSpec, Period, Threshold, ThresholdAction
from tierwise.policy import Policy, PolicyBudget
from tierwise_sidecar.replay.trace import TraceError
from tierwise_sidecar.replay.tracegen import TraceMeta

# The trace's budget is for the trace's length: a rolling day holds a whole replay whatever the
# wall clock, where a calendar day could reset in the middle of one.
TRACE_PERIOD = Period.ROLLING_24_HOURS
DEFAULT_THRESHOLDS = (Threshold(percent=80, action=ThresholdAction.NOTIFY),
                      Threshold(percent=100, action=ThresholdAction.REJECT))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outage:
    """The provider of `model` answers 503 to everything from start_s to end_s (trace clock)."""

    model: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class TraceBudget:
    """`tenant` may spend `usd` over the trace, with the Policy's thresholds."""

    tenant: str
    usd: float
    name: str
    thresholds: tuple[Threshold, ...]


@dataclass(frozen=True, slots=True)
class Events:
    outage: Outage | None = None
    budget: TraceBudget | None = None

    def describe(self) -> list[str]:
        out = []
        if self.outage is not None:
            o = self.outage
            out.append(f"{o.model} answers 503 from {o.start_s:g} s to {o.end_s:g} s (every strategy that uses it)")
        if self.budget is not None:
            b = self.budget
            steps = ", ".join(f"{t.action.value} at {t.percent} %" for t in b.thresholds)
            out.append(f"tenant {b.tenant!r} may spend {b.usd:g} USD (budget {b.name}: {steps}; the policy strategy)")
        return out


def events_of(meta: TraceMeta, policy: Policy) -> Events:
    """The meta's outage and budget in terms of `policy`: the model behind the outage tier (its
    first backend), and the thresholds of the Policy budget with the most steps (the team's staged
    plan: Notify, Downgrade, Throttle, Reject), or Notify at 80 % and Reject at 100 % without one."""
    tier = policy.tiers.get(meta.outage_tier)
    if tier is None:
        raise TraceError(f"the trace meta's outage tier {meta.outage_tier!r} is not a tier of the Policy "
                         f"(tiers: {', '.join(sorted(policy.tiers))})")  # fmt: skip
    outage = None
    if meta.outage.end_s > meta.outage.start_s:
        outage = Outage(tier.spec.backends[0].model, meta.outage.start_s, meta.outage.end_s)
    budget = None
    if meta.budget_usd > 0:
        staged = max(policy.budgets, key=lambda b: len(b.spec.thresholds), default=None)
        thresholds = tuple(staged.spec.thresholds) if staged and staged.spec.thresholds else DEFAULT_THRESHOLDS
        budget = TraceBudget(meta.budget_tenant, meta.budget_usd, f"trace-{meta.budget_tenant}", thresholds)
    return Events(outage, budget)


def with_budget(policy: Policy, budget: TraceBudget) -> Policy:
    """The Policy with the trace's budget stacked on its own (a tenant's budget counts alongside
    the namespace's, as two CostBudgets would)."""
    spec = CostBudgetSpec(
        selector=BudgetSelector(tenants=[budget.tenant]),
        period=TRACE_PERIOD,
        limit=Amount(usd=budget.usd),
        thresholds=list(budget.thresholds),
    )
    added = PolicyBudget(name=budget.name, namespace=policy.namespace, spec=spec)
    return policy.model_copy(update={"budgets": [*policy.budgets, added]}).sealed()


NO_EVENTS = Events()
