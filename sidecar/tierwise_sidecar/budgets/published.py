"""What the operator publishes of each budget beside the Policy (`budgets.json` in the same
ConfigMap): the spend of the current period across every sidecar, as Redis or Prometheus last
showed it. A sidecar that keeps its own ledger (no Redis) counts it as the others' spend, so N
sidecars stop near the limit instead of spending it N times. Read off the request path
(watched.py); a spend change rebuilds nothing; no file: each sidecar counts alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierwise.budgetrules import ZERO, Amount, BudgetRule
from tierwise.periods import Window
from tierwise_sidecar.budgets.ledger import MemoryLedger, Totals
from tierwise_sidecar.state import Key, SharedState
from tierwise_sidecar.watched import WatchedJson


@dataclass(frozen=True, slots=True)
class Entry:
    window: str  # the period it counts (periods.Window.id): a new period starts from zero
    spent: Amount


def parse(data: Any) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for key, e in (data.get("budgets") or {}).items():
        out[str(key)] = Entry(str(e["window"]), Amount(int(e["spentMicros"]), int(e["spentTokens"])))
    return out


class Published(WatchedJson[Mapping[str, Entry]]):
    def __init__(self, path: Path | None, interval: float) -> None:
        super().__init__(path, interval, parse, {}, "the published budget spend")
        # Per budget: the entry it was computed from, and the others' part of it.
        self._others: dict[str, tuple[Entry, Amount]] = {}

    @property
    def entries(self) -> Mapping[str, Entry]:
        return self.value

    def base(self, ledger: MemoryLedger) -> Callable[[BudgetRule, Window], Totals]:
        """For `ledger`: the spend of the other sidecars in the budget's current window."""

        def others(rule: BudgetRule, w: Window) -> Totals:
            e = self.value.get(rule.key)
            if e is None or e.window != w.id:
                return Totals(ZERO, ZERO)
            got = self._others.get(rule.key)
            if got is None or got[0] is not e:
                # The publication holds this sidecar's own spend as Prometheus last scraped it;
                # what it holds now is at least that, so the others' part is not overstated.
                own = ledger.spent(rule, w)
                got = (e, Amount(max(e.spent.micros - own.micros, 0), max(e.spent.tokens - own.tokens, 0)))
                self._others[rule.key] = got
            return Totals(got[1], ZERO)

        return others


PUBLISHED = Key("budget-published", lambda s: Published(s.config.published_budgets, s.config.reload_interval))


def with_published(state: SharedState, ledger: MemoryLedger) -> MemoryLedger:
    ledger.base = state.get(PUBLISHED).base(ledger)
    return ledger
