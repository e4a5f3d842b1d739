"""What the budget stage did to one request: what it holds, and what the caller is told."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierwise.budgetrules import Amount
from tierwise.money import micros_usd
from tierwise_sidecar.budgets.ledger import Reservation, Verdict

H_REMAINING_USD = "x-tierwise-budget-remaining-usd"
H_REMAINING_TOKENS = "x-tierwise-budget-remaining-tokens"
H_STATE = "x-tierwise-budget-state"
H_NOTICE = "x-tierwise-budget-notice"
H_DOWNGRADED = "x-tierwise-downgraded-from"
H_DEGRADED = "x-tierwise-budget-degraded"


@dataclass(slots=True)
class BudgetNote:
    # Every budget that counted the request, as it stood once the request's worst case was held.
    verdicts: tuple[Verdict, ...] = ()
    notices: list[str] = field(default_factory=list)
    downgraded_from: str | None = None
    degraded: bool = False
    # What is held for the request: the first reservation, then any top-up (a costlier fallback).
    held: list[Reservation] = field(default_factory=list)
    holding: Amount = field(default_factory=Amount)

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        usd, tokens, states = [], [], []
        for v in self.verdicts:
            rule, committed = v.line.rule, v.committed
            left = rule.remaining(committed)
            if rule.has_usd:
                usd.append(f"{rule.key}={micros_usd(left.micros)}")
            if rule.has_tokens:
                tokens.append(f"{rule.key}={left.tokens}")
            states.append(f"{rule.key}={rule.state(committed).value}")
        if usd:
            h[H_REMAINING_USD] = ", ".join(usd)
        if tokens:
            h[H_REMAINING_TOKENS] = ", ".join(tokens)
        if states:
            h[H_STATE] = ", ".join(states)
        if self.notices:
            h[H_NOTICE] = "; ".join(self.notices)
        if self.downgraded_from is not None:
            h[H_DOWNGRADED] = self.downgraded_from
        if self.degraded:
            h[H_DEGRADED] = "true"
        return h
