"""CostBudget: a spend limit for a namespace, team or tenant, with staged actions."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field

from tierwise.api.common import (
    DNS_LABEL,
    NAME_MAX,
    ApiModel,
    Invariant,
    NamespaceSelection,
    ObjectStatus,
    TierName,
    strictly_ascending,
)


class BudgetSelector(ApiModel):
    """Whose traffic the budget counts. Empty fields do not narrow; an empty selector counts the
    whole of the budget's own namespace."""

    namespaces: NamespaceSelection | None = Field(
        default=None,
        description="Namespaces counted; only budgets in the platform namespace may select other namespaces.",
    )
    tenants: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=256,
        description="End customers (x-tierwise-tenant) counted; empty counts all tenants.",
    )
    tiers: list[TierName] = Field(
        default_factory=list,
        max_length=32,
        description="Tiers counted; empty counts all tiers.",
    )


class Period(StrEnum):
    DAILY = "Daily"
    WEEKLY = "Weekly"
    MONTHLY = "Monthly"
    ROLLING_24_HOURS = "Rolling24Hours"
    ROLLING_7_DAYS = "Rolling7Days"
    ROLLING_30_DAYS = "Rolling30Days"


class Amount(ApiModel):
    """An amount of spend in USD, tokens, or both (whichever is reached first counts)."""

    usd: float | None = Field(default=None, gt=0, le=1e9, description="US dollars.")
    tokens: int | None = Field(default=None, ge=1, description="Prompt plus completion tokens.")

    invariants = (
        Invariant(
            rule="has(self.usd) || has(self.tokens)",
            message="at least one of usd and tokens must be set",
            holds=lambda s: s.usd is not None or s.tokens is not None,
        ),
    )


class ThresholdAction(StrEnum):
    NOTIFY = "Notify"
    DOWNGRADE = "Downgrade"
    THROTTLE = "Throttle"
    REJECT = "Reject"


class Threshold(ApiModel):
    """What happens once spend reaches a share of the limit."""

    percent: int = Field(ge=1, le=1000, description="Share of the limit, in percent, where the action starts.")
    action: ThresholdAction = Field(description="Notify, Downgrade, Throttle or Reject.")
    downgrade_to: str | None = Field(
        default=None,
        max_length=NAME_MAX,
        pattern=DNS_LABEL,
        description="Cheaper tier requests are moved to; required with Downgrade.",
    )
    requests_per_second: float | None = Field(
        default=None, gt=0, description="Rate allowed once throttled; required with Throttle."
    )

    invariants = (
        Invariant(
            rule="(self.action == 'Downgrade') == has(self.downgradeTo)",
            message="downgradeTo is required with action Downgrade and only valid with it",
            holds=lambda s: (s.action == ThresholdAction.DOWNGRADE) == (s.downgrade_to is not None),
            field=".downgradeTo",
        ),
        Invariant(
            rule="(self.action == 'Throttle') == has(self.requestsPerSecond)",
            message="requestsPerSecond is required with action Throttle and only valid with it",
            holds=lambda s: (s.action == ThresholdAction.THROTTLE) == (s.requests_per_second is not None),
            field=".requestsPerSecond",
        ),
    )


def _per_request_within(unit: str) -> Invariant:
    """perRequestMax.<unit> is no more than limit.<unit>, wherever both are set."""

    def holds(s: CostBudgetSpec) -> bool:
        pr, limit = s.per_request_max, getattr(s.limit, unit)
        return pr is None or getattr(pr, unit) is None or limit is None or getattr(pr, unit) <= limit

    return Invariant(
        rule=f"!has(self.perRequestMax) || !has(self.perRequestMax.{unit}) || !has(self.limit.{unit})"
        f" || self.perRequestMax.{unit} <= self.limit.{unit}",
        message=f"perRequestMax.{unit} must not exceed limit.{unit}",
        holds=holds,
        field=".perRequestMax",
    )


class CostBudgetSpec(ApiModel):
    """Desired state of a CostBudget. The operator never writes it: spec comes from Git."""

    selector: BudgetSelector = Field(default_factory=BudgetSelector, description="Whose traffic is counted.")
    period: Period = Field(
        default=Period.MONTHLY,
        description="Calendar periods Daily, Weekly (from Monday) or Monthly, starting at local midnight in "
        "timeZone; or a rolling window Rolling24Hours, Rolling7Days or Rolling30Days, in which spend ages out "
        "continuously.",
    )
    time_zone: str = Field(
        default="UTC",
        min_length=1,
        max_length=64,
        description="IANA time zone in which calendar periods start (a rolling window has none: leave it UTC).",
    )
    limit: Amount = Field(description="Spend allowed per period.")
    per_request_max: Amount | None = Field(
        default=None, description="Reject a single request whose estimated cost is above this."
    )
    thresholds: list[Threshold] = Field(
        default_factory=lambda: [Threshold(percent=100, action=ThresholdAction.REJECT)],
        max_length=10,
        description="Staged actions in strictly ascending order of percent.",
    )
    dry_run: bool = Field(
        default=False, description="Count and report, but never act on requests (to try a budget out)."
    )

    invariants = (
        strictly_ascending("thresholds", "percent"),
        Invariant(
            rule="!has(self.period) || !self.period.startsWith('Rolling')"
            " || !has(self.timeZone) || self.timeZone == 'UTC'",
            message="a rolling window has no time zone: leave timeZone UTC",
            holds=lambda s: not s.period.value.startswith("Rolling") or s.time_zone == "UTC",
            field=".timeZone",
        ),
        _per_request_within("tokens"),
        _per_request_within("usd"),
    )


class BudgetState(StrEnum):
    OK = "Ok"
    WARNING = "Warning"
    DOWNGRADED = "Downgraded"
    THROTTLED = "Throttled"
    EXCEEDED = "Exceeded"


class CostBudgetStatus(ObjectStatus):
    """Observed spend, written by the operator."""

    spent_usd: float | None = Field(default=None, description="USD spent this period, settled requests only.")
    reserved_usd: float | None = Field(default=None, description="USD reserved by requests in flight.")
    spent_tokens: int | None = Field(default=None, description="Tokens spent this period.")
    remaining_usd: float | None = Field(default=None, description="USD left this period.")
    remaining_tokens: int | None = Field(default=None, description="Tokens left this period.")
    projected_usd: float | None = Field(default=None, description="Projected spend at the end of the period.")
    state: BudgetState | None = Field(default=None, description="Ok, Warning, Downgraded, Throttled, Exceeded.")
    period_start: str | None = Field(default=None, description="Start of the current period (RFC 3339).")
    last_reset: str | None = Field(default=None, description="When spend was last reset (RFC 3339).")
    reserved_tokens: int | None = Field(default=None, description="Tokens reserved by requests in flight.")
    crossed_percent: int | None = Field(
        default=None, description="The highest threshold reached this period (percent of the limit)."
    )
