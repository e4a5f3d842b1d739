"""What the budget stage did to one request: what it holds, and what the caller is told."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from tierwise.budgetrules import ZERO, Amount, BudgetRule
from tierwise.money import micros_usd
from tierwise_sidecar.budgets.ledger import Reservation, Totals, Verdict

H_REMAINING_USD = "x-tierwise-budget-remaining-usd"
H_REMAINING_TOKENS = "x-tierwise-budget-remaining-tokens"
H_STATE = "x-tierwise-budget-state"
H_NOTICE = "x-tierwise-budget-notice"
H_DOWNGRADED = "x-tierwise-downgraded-from"
H_DEGRADED = "x-tierwise-budget-degraded"


# What a request is told about one budget (remaining USD, remaining tokens, state, the highest
# Notify percent passed) is a pure function of the rule and its committed spend. Requests served
# from an allowance slice all see the same snapshot of that spend (one Totals object) until the
# next refresh, so it is worked out once per snapshot instead of once per request: keyed by the
# rule's key and the snapshot's identity, and checked to be the same rule and the same Totals (the
# entry keeps it, so its id is not reused while cached; a reload may change a budget under the same
# key); cleared when full.
class Parts(NamedTuple):
    rule: BudgetRule
    totals: Totals
    usd: str | None
    tokens: str | None
    state: str
    notice: int | None
    # The headers of a request only this budget counted, nothing else to say: built once, shared
    # by every such request. A plain dict, read-only by its type: a dict's update from a dict is
    # a copy in C, from a mappingproxy a lookup per key.
    alone: Mapping[str, str]


_PARTS: dict[tuple[str, int], Parts] = {}
_PARTS_MAX = 1024


def budget_parts(rule: BudgetRule, totals: Totals) -> Parts:
    key = (rule.key, id(totals))
    hit = _PARTS.get(key)
    if hit is not None and hit.rule is rule and hit.totals is totals:
        return hit
    committed = totals.committed
    left = rule.remaining(committed)
    usd = f"{rule.key}={micros_usd(left.micros)}" if rule.has_usd else None
    tokens = f"{rule.key}={left.tokens}" if rule.has_tokens else None
    state = f"{rule.key}={rule.state(committed).value}"
    alone = {H_REMAINING_USD: usd} if usd is not None else {}
    if tokens is not None:
        alone[H_REMAINING_TOKENS] = tokens
    alone[H_STATE] = state
    notice = rule.notice(committed) if rule.notices else None
    parts = Parts(rule, totals, usd, tokens, state, notice, alone)
    if len(_PARTS) >= _PARTS_MAX:
        _PARTS.clear()
    _PARTS[key] = parts
    return parts


@dataclass(slots=True)
class BudgetNote:
    # Every budget that counted the request, as it stood once the request's worst case was held.
    verdicts: tuple[Verdict, ...] = ()
    notices: list[str] = field(default_factory=list)
    downgraded_from: str | None = None
    degraded: bool = False
    # What is held for the request: the first reservation, then any top-up (a costlier fallback).
    held: list[Reservation] = field(default_factory=list)
    holding: Amount = ZERO

    def write_headers(self, h: dict[str, str]) -> None:
        """Add what the caller is told to the answer's headers `h`."""
        verdicts = self.verdicts
        if len(verdicts) == 1 and not self.notices and self.downgraded_from is None and not self.degraded:
            v = verdicts[0]
            h.update(budget_parts(v.line.rule, v.totals).alone)
            return
        usd, tokens, states = [], [], []
        for v in verdicts:
            _, _, left_usd, left_tokens, state, _, _ = budget_parts(v.line.rule, v.totals)
            if left_usd is not None:
                usd.append(left_usd)
            if left_tokens is not None:
                tokens.append(left_tokens)
            states.append(state)
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
