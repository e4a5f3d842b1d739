"""The budget stage: every budget that counts a request holds its worst case before any backend is
called, and is settled to its actual cost afterwards, whatever happened.

On the way in: the budgets of the Policy whose selector matches the request (tenant, tier; the
compiler already kept those counting this namespace) are judged on where their spend stands.
Downgrade moves the request to a cheaper tier; a request no budget could ever take (above a
per-request maximum, or above a whole cap) is refused with a 400, since a retry will not help;
then the worst case is reserved against every budget at once, all or nothing, and a refusal is a
429 with a budget code, the budget named and Retry-After until relief (period end, or for a
rolling window the oldest bucket leaving it). A dry-run budget is judged and counted but never
acts. On the way out the reservation is settled to what the backends reported (or what was
counted of a stream that was cut or abandoned).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tierwise.budgetrules import OVER_LIMIT, ZERO, Amount, BudgetRule, judge, rule_of
from tierwise.money import micros_usd
from tierwise.periods import Window, seconds_to_relief
from tierwise_sidecar.budgets.ledger import Ledger, Line, MemoryLedger, Verdict
from tierwise_sidecar.budgets.metrics import BUDGET_METRICS, BudgetMetrics
from tierwise_sidecar.budgets.note import BudgetNote, budget_parts
from tierwise_sidecar.budgets.windows import COUNTING_MAX, Counted, Windows
from tierwise_sidecar.errors import INVALID_REQUEST, RATE_LIMIT, ApiError, retry_after
from tierwise_sidecar.estimate import enter_tier, reserve_amount
from tierwise_sidecar.state import Key, SharedState
from tierwise_sidecar.tokens import TOKENS, TokenCounter

if TYPE_CHECKING:
    from tierwise_sidecar.exchange import Exchange, Reply
    from tierwise_sidecar.runtime import Runtime

log = logging.getLogger("tierwise.budgets")

H_RESET = "x-tierwise-budget-reset"
# Retry-After when a budget is short only because of what requests in flight hold.
HELD_RETRY_SECONDS = 1


def make_ledger(state: SharedState) -> Ledger:
    """The configured store; its client library is imported only when it is the one in use."""
    store = state.config.budget_store
    if store.startswith(("redis://", "rediss://", "unix://")):
        from tierwise_sidecar.budgets.shared import SharedLedger

        return SharedLedger(store, clock=state.config.clock)
    if store.startswith("sqlite:"):
        from tierwise_sidecar.budgets.sqlite import SqliteJournal

        ledger = MemoryLedger(SqliteJournal(Path(store.removeprefix("sqlite:")).expanduser()))
    elif store == "memory":
        ledger = MemoryLedger()
    else:
        raise ValueError(f"budget store {store!r}: expected memory, sqlite:PATH or a redis:// URL")
    if state.config.published_budgets is not None:
        # No shared store: the others' spend comes from what the operator publishes.
        from tierwise_sidecar.budgets.published import with_published

        return with_published(state, ledger)
    return ledger


LEDGER: Key[Ledger] = Key("budget-ledger", make_ledger)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _refusal(v: Verdict, now: float) -> ApiError:
    rule, w = v.line.rule, v.line.window
    if v.judgement.outcome == OVER_LIMIT:
        committed = v.committed
        spent = (
            f"${micros_usd(committed.micros)} of ${micros_usd(rule.limit.micros)}"
            if rule.has_usd
            else f"{committed.tokens} of {rule.limit.tokens} tokens"
        )
        if judge(rule, v.totals.spent, v.line.ask, None, now).outcome != OVER_LIMIT:
            # Only what requests in flight hold is in the way: their holds give way to their
            # actual cost (usually less) within a request's time.
            relief, when = HELD_RETRY_SECONDS, "requests in flight settle"
        else:
            relief = seconds_to_relief(w, now)
            when = "the period resets" if not w.rolling else "older spend leaves the window"
        return ApiError(
            429,
            f"budget {rule.key} cannot take this request: {spent} spent or held by requests in flight, and this "
            f"request may cost up to ${micros_usd(v.line.ask.micros)}; {when} in {relief} s",
            RATE_LIMIT,
            "budget_exceeded",
            headers={"Retry-After": str(relief), H_RESET: _iso(now + relief)},
        )
    return ApiError(
        429,
        f"budget {rule.key} is throttled: its traffic is limited to {rule.throttle_rate(v.committed):g} request(s) "
        "per second",
        RATE_LIMIT,
        "budget_throttled",
        headers={"Retry-After": retry_after(v.judgement.retry_after)},
    )


class BudgetStage:
    name = "budget"

    def __init__(
        self,
        rules: Sequence[BudgetRule],
        ledger: Ledger,
        counter: TokenCounter,
        metrics: BudgetMetrics,
        *,
        clock: Callable[[], float],
        lease_margin: float = 30.0,
    ) -> None:
        self.rules = tuple(rules)
        self.ledger = ledger
        self.counter = counter
        self.metrics = metrics
        self.clock = clock
        self.lease_margin = lease_margin
        self.windows = Windows()
        # The rules that count a (tenant, tier): the same for every request of the pair under this
        # Policy, so the selectors are matched once. Bounded: tenants come from the Policy's keys,
        # but a cap keeps an unexpected spread of them from growing it.
        self._counting: dict[tuple[str | None, str], Counted] = {}
        # Whether any budget can run dry or notify: their loops over a request's verdicts are
        # skipped for a Policy that has neither.
        self._any_dry_run = any(r.dry_run for r in self.rules)
        self._any_notices = any(r.notices for r in self.rules)
        self._any_downgrades = any(r.downgrades for r in self.rules)
        # Bound once: set on every request a budget counts.
        self._extend_hook = self._extend

    def _counted(self, tenant: str | None, tier: str) -> Counted:
        c = Counted.of(tuple(r for r in self.rules if r.counts(tenant, tier)))
        if len(self._counting) >= COUNTING_MAX:
            self._counting.clear()
        self._counting[(tenant, tier)] = c
        return c

    def activate(self) -> None:
        """This Policy's budgets are the ones in force (called on the event loop, at the swap)."""
        self.metrics.watch(self.rules, self.ledger, self.windows, self.clock)
        self.ledger.track(self.rules)

    async def enter(self, x: Exchange) -> Reply | None:
        who = x.identity
        c = self._counting.get((who.tenant, who.tier)) or self._counted(who.tenant, who.tier)
        rules = c.rules
        if not rules:
            return None
        now = self.clock()
        windows = c.current(self.windows, now)
        note = x.budget = BudgetNote()
        if self._any_downgrades:
            self._downgrade(x, note, rules, windows)
        tier = x.runtime.tiers[x.identity.tier]
        est = reserve_amount(x, tier)
        ask = Amount(est.micros, est.tokens)
        if ask.micros > c.max_micros or ask.tokens > c.max_tokens:
            self._too_big(note, rules, ask)
        lease = tier.timeouts.total + self.lease_margin
        # One budget is the usual case: its line without a comprehension's frame.
        lines = (
            [Line(rules[0], windows[0], ask)]
            if len(rules) == 1
            else [Line(r, w, ask) for r, w in zip(rules, windows, strict=True)]
        )
        # Most requests are decided without waiting for a store (a slice, a local ledger).
        booking = self.ledger.reserve_now(lines, now, lease) or await self.ledger.reserve(lines, now, lease)
        note.verdicts, note.degraded = booking.verdicts, booking.degraded
        for v in booking.verdicts if self._any_dry_run else ():
            if v.refused and v.line.rule.dry_run:
                note.notices.append(f"{v.line.rule.key} (dry run) would refuse: {v.judgement.outcome}")
                self.metrics.action(v.line.rule, "dry_run_refusal")
        if booking.reservation is None:
            first = next(v for v in booking.verdicts if v.refused and not v.line.rule.dry_run)
            self.metrics.refused(first.line.rule, "limit" if first.judgement.outcome == OVER_LIMIT else "throttle")
            raise _refusal(first, now)
        note.held.append(booking.reservation)
        note.holding = ask
        for v in booking.verdicts if self._any_notices else ():
            # Worked out once per snapshot of the budget's spend, with its headers.
            pct = budget_parts(v.line.rule, v.totals).notice
            if pct is not None:
                note.notices.append(f"{v.line.rule.key} passed {pct}%")
                self.metrics.action(v.line.rule, "notify")
        x.extend = self._extend_hook
        x.held = (ask.micros, ask.tokens)
        return None

    def _too_big(self, note: BudgetNote, rules: tuple[BudgetRule, ...], ask: Amount) -> None:
        """Refuse an ask a budget can never take (noted only, for a dry-run budget)."""
        for rule in rules:
            why = rule.too_big(ask)
            if why is None:
                continue
            if rule.dry_run:
                note.notices.append(f"{rule.key} (dry run) would refuse: {why}")
                self.metrics.action(rule, "dry_run_refusal")
                continue
            self.metrics.refused(rule, "per_request")
            raise ApiError(
                400,
                f"budget {rule.key} refuses this request: {why}. A retry will not help: lower max_tokens (or "
                "max_completion_tokens) or shorten the prompt",
                INVALID_REQUEST,
                "request_over_budget",
                param="max_tokens",
            )

    def _downgrade(
        self, x: Exchange, note: BudgetNote, rules: tuple[BudgetRule, ...], windows: tuple[Window, ...]
    ) -> None:
        """The cheaper tier the first budget past a Downgrade threshold names, judged on the spend
        last seen (a threshold is a level, not a limit: being a request late is fine)."""
        who = x.identity
        for rule, w in zip(rules, windows, strict=True):
            if not rule.downgrades:
                continue
            to = rule.downgrade_to(self.ledger.totals(rule, w).committed)
            if to is None or to == who.tier:
                continue
            if to not in x.runtime.tiers:
                log.warning("budget %s: downgrade tier %s is not usable from namespace %s; not downgrading",
                            rule.key, to, who.namespace)  # fmt: skip
                continue
            if rule.dry_run:
                note.notices.append(f"{rule.key} (dry run) would downgrade {who.tier} to {to}")
                self.metrics.action(rule, "dry_run_downgrade")
                continue
            note.downgraded_from = who.tier
            x.identity = dataclasses.replace(who, tier=to)
            enter_tier(x, x.runtime.tiers[to], self.counter)
            self.metrics.action(rule, "downgrade")
            return

    async def _extend(self, x: Exchange, micros: int, tokens: int) -> bool:
        """Hold more when the request may now cost more than held (a costlier fallback tier, a
        resumed stream); False when a budget cannot take it."""
        note = x.budget
        if note is None or not note.held:
            return True
        more = Amount(max(micros - note.holding.micros, 0), max(tokens - note.holding.tokens, 0))
        if more == ZERO:
            return True
        first = note.held[0]
        lines = [Line(ln.rule, ln.window, more) for ln in first.lines]
        booking = await self.ledger.reserve(lines, self.clock(), first.expires - self.clock())
        if booking.reservation is None:
            return False
        note.held.append(booking.reservation)
        note.holding = note.holding + more
        x.held = (note.holding.micros, note.holding.tokens)
        return True

    async def leave(self, x: Exchange) -> None:
        note = x.budget
        if note is None or not note.held:
            return
        o = x.outcome
        actual = Amount(o.micros, o.tokens)
        now = self.clock()
        held = note.held
        self.ledger.settle(held[0], actual, now)
        if len(held) > 1:
            for extra in held[1:]:
                self.ledger.settle(extra, ZERO, now)


class NoBudgets:
    """A Policy without budgets after one with some: nothing to enforce, and the budgets that were
    are no longer reported or kept current."""

    name = "budget"

    def __init__(self, metrics: BudgetMetrics, ledger: Ledger | None, clock: Callable[[], float]) -> None:
        self.metrics, self.ledger, self.clock = metrics, ledger, clock

    def activate(self) -> None:
        if self.ledger is not None:
            self.metrics.watch((), self.ledger, Windows(), self.clock)
            self.ledger.track(())

    async def enter(self, x: Exchange) -> Reply | None:
        return None

    async def leave(self, x: Exchange) -> None:
        return None


def build(runtime: Runtime, state: SharedState) -> BudgetStage | NoBudgets | None:
    rules = [rule_of(b) for b in runtime.policy.budgets]
    if not rules:
        metrics = state.peek(BUDGET_METRICS)
        return NoBudgets(metrics, state.peek(LEDGER), state.config.clock) if metrics is not None else None
    cfg = state.config
    return BudgetStage(rules, state.get(LEDGER), state.get(TOKENS), state.get(BUDGET_METRICS), clock=cfg.clock,
                       lease_margin=cfg.lease_margin_seconds)  # fmt: skip
