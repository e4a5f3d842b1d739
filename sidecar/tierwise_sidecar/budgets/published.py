"""What the operator publishes of each budget beside the Policy (`budgets.json` in the same
ConfigMap): the spend of the current period across every sidecar, as Redis or Prometheus last
showed it. A sidecar that keeps its own ledger (no Redis) counts it as the others' spend, so N
sidecars stop near the limit instead of spending it N times.

Read off the request path: a poll of the file's identity (the kubelet swaps the mount through a
symlink), parsed only when it changed; a spend change rebuilds nothing. A missing or broken file
is no publication (each sidecar then counts alone, as before the operator saw any spend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tierwise.budgetrules import ZERO, Amount, BudgetRule
from tierwise.periods import Window
from tierwise_sidecar.budgets.ledger import MemoryLedger, Totals
from tierwise_sidecar.state import Key, SharedState

log = logging.getLogger("tierwise.budgets")


@dataclass(frozen=True, slots=True)
class Entry:
    window: str  # the period it counts (periods.Window.id): a new period starts from zero
    spent: Amount


def parse(text: str) -> dict[str, Entry]:
    data = json.loads(text)
    out: dict[str, Entry] = {}
    for key, e in (data.get("budgets") or {}).items():
        out[str(key)] = Entry(str(e["window"]), Amount(int(e["spentMicros"]), int(e["spentTokens"])))
    return out


class Published:
    def __init__(self, path: Path | None, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.entries: dict[str, Entry] = {}
        # Per budget: the entry it was computed from, and the others' part of it.
        self._others: dict[str, tuple[Entry, Amount]] = {}
        self._signature: object = None
        self._task: asyncio.Task[None] | None = None

    def base(self, ledger: MemoryLedger) -> Callable[[BudgetRule, Window], Totals]:
        """For `ledger`: the spend of the other sidecars in the budget's current window."""

        def others(rule: BudgetRule, w: Window) -> Totals:
            e = self.entries.get(rule.key)
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

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            signature: object = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            signature = None
        if signature == self._signature:
            return
        self._signature = signature
        if signature is None:
            self.entries = {}
            return
        try:
            self.entries = parse(self.path.read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: cannot read the published budget spend (%s); keeping what was read before", self.path, e)
            return
        log.debug("published budget spend read: %d budget(s)", len(self.entries))

    async def start(self) -> None:
        self.refresh()
        if self.path is not None:
            self._task = asyncio.create_task(self._poll(), name="published-budgets")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.refresh()


PUBLISHED = Key("budget-published", lambda s: Published(s.config.published_budgets, s.config.reload_interval))


def with_published(state: SharedState, ledger: MemoryLedger) -> MemoryLedger:
    ledger.base = state.get(PUBLISHED).base(ledger)
    return ledger
