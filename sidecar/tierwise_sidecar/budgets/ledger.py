"""Where budget spend is counted: the ledger contract, and the ledger of one process.

A reservation holds a request's worst case against every budget that counts it, all or nothing;
it is a lease, freed when its request settles or, if its holder died, when the lease expires.
Settling adds the actual cost (settled spend is never given back) and releases the lease. Settle
never waits for I/O: the request's answer is out by then, and what a store owes is flushed by the
ledger itself (and on close).

MemoryLedger is the ledger of one process: on its own (with a SQLite journal) it is the standalone
gateway's ledger; beside Redis it is the local view a sidecar enforces while Redis is away.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tierwise.buckets import Bucket
from tierwise.budgetrules import OK, ZERO, Amount, BudgetRule, Judgement, judge
from tierwise.periods import Window
from tierwise.values import value


@value
class Line:
    """One budget's part of a reservation: the window it counts in, and the amount asked."""

    rule: BudgetRule
    window: Window
    ask: Amount


@dataclass(slots=True)
class Reservation:
    # The lease it is held under in this process's ledger, or in the shared store its own lease
    # there; SLICED when it is held under its budgets' slices (`leases` name it in full).
    id: str
    lines: tuple[Line, ...]
    expires: float
    # Held in the shared store (Redis), as opposed to this process's own ledger.
    remote: bool = False
    # In the shared store: per line, the lease its amount is held under (the request's own, or
    # the sidecar's allowance slice of that budget).
    leases: tuple[str, ...] = ()


@value
class Totals:
    """A budget's spend in its window: settled, and held by requests in flight."""

    spent: Amount = ZERO
    held: Amount = ZERO

    @property
    def committed(self) -> Amount:
        return self.spent + self.held


@value
class Verdict:
    line: Line
    judgement: Judgement
    # After the reservation when it was granted.
    totals: Totals

    @property
    def refused(self) -> bool:
        return self.judgement.outcome != OK

    @property
    def committed(self) -> Amount:
        return self.totals.committed


@value
class Booking:
    reservation: Reservation | None  # None: refused, nothing held
    verdicts: tuple[Verdict, ...]
    # Judged on this process's own view because the shared store was unreachable.
    degraded: bool = False
    # Per line, what the shared store granted beyond the ask for the sidecar's slice.
    extras: tuple[Amount, ...] = ()


class Ledger(Protocol):
    def reserve_now(self, lines: Sequence[Line], now: float, lease_seconds: float) -> Booking | None:
        """The reservation when it can be decided without waiting for a store, else None (then
        `reserve`): most requests are decided here, without a coroutine."""

    async def reserve(self, lines: Sequence[Line], now: float, lease_seconds: float) -> Booking: ...

    def settle(self, reservation: Reservation, actual: Amount, now: float) -> None:
        """Release the lease and count `actual` in every line's window; never blocks."""

    def totals(self, rule: BudgetRule, window: Window) -> Totals:
        """The last known spend of a budget, settled and in flight (for thresholds and metrics)."""

    def own(self, rule: BudgetRule, window: Window) -> Totals | None:
        """What this process alone counted, without what it counts for others (the operator adds
        these up across sidecars); None when the store is shared and counts every sidecar's."""

    @property
    def degraded(self) -> bool: ...

    def track(self, rules: Sequence[BudgetRule]) -> None:
        """The budgets of the Policy in force (a shared store keeps their totals current)."""


class Journal(Protocol):
    """Where a process ledger's settled spend survives a restart."""

    async def start(self) -> Iterable[tuple[str, Amount]]:
        """Open it; every spend key with its amount so far."""

    def record(self, key: str, amount: Amount) -> None:
        """Add to a spend key's amount (written behind, in order)."""

    async def close(self) -> None: ...


def spend_key(rule: BudgetRule, w: Window, at: float | None = None) -> str:
    """The name spend is counted under: the budget and its calendar period, or a rolling window's
    bucket (the one holding `at`, by default the window's newest)."""
    if not w.rolling:
        return rule.key + "@" + w.id
    bucket = w.last_bucket if at is None else w.bucket(at)
    return f"{rule.key}@{w.id}#{bucket}"


# Reservation ids: this process's random prefix and a counter (unique across sidecars sharing a
# store, and cheaper than a UUID per request).
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):x}"


# The id of a reservation taken from allowance slices: it has no lease of its own to name.
SLICED = ""


def judge_all(
    lines: Sequence[Line], totals: Callable[[Line], Totals], bucket: Callable[[Line], Bucket | None], now: float
) -> tuple[list[Verdict], bool]:
    """Each line judged on its committed spend; refused if any budget that enforces refuses."""
    verdicts = []
    refused = False
    for line in lines:
        before = totals(line)
        j = judge(line.rule, before.committed, line.ask, bucket(line), now)
        refused = refused or (j.outcome != OK and not line.rule.dry_run)
        verdicts.append(Verdict(line, j, before))
    return verdicts, refused


# Settled leases' entries the expiry heap may keep before it is rebuilt from the live ones.
COMPACT_SLACK = 1024


class MemoryLedger:
    """One process's ledger. `base`: spend this process does not hold itself but must count (the
    shared store's last known totals, while it is away)."""

    def __init__(self, journal: Journal | None = None, base: Callable[[BudgetRule, Window], Totals] | None = None):
        self.journal = journal
        self.base = base
        self._spent: dict[str, list[int]] = {}
        self._reserved: dict[str, list[int]] = {}
        self._leases: dict[str, Reservation] = {}
        # (expiry, id) of every lease, soonest first: a sweep looks at the expired ones only. A
        # settled lease's entry stays until it comes up or the heap is rebuilt from the leases left
        # (when it holds COMPACT_SLACK entries more than twice those): without that, every request
        # of the last lease length (90 s at a time) would sit here, for memory and the collector.
        self._expiry: list[tuple[float, str]] = []
        self._buckets: dict[str, Bucket] = {}

    @property
    def degraded(self) -> bool:
        return False

    def track(self, rules: Sequence[BudgetRule]) -> None:
        return None  # everything it counts is its own

    async def start(self) -> None:
        if self.journal is not None:
            for key, amount in await self.journal.start():
                self._add(key, amount, journal=False)

    async def close(self) -> None:
        if self.journal is not None:
            await self.journal.close()

    # ------------------------------------------------------------ reading

    def spent(self, rule: BudgetRule, w: Window) -> Amount:
        if not w.rolling:
            got = self._spent.get(spend_key(rule, w))
            return Amount(got[0], got[1]) if got else ZERO
        prefix = f"{rule.key}@{w.id}#"
        micros = tokens = 0
        for b in range(w.first_bucket, w.last_bucket + 1):
            got = self._spent.get(f"{prefix}{b}")
            if got:
                micros += got[0]
                tokens += got[1]
        return Amount(micros, tokens)

    def reserved(self, rule: BudgetRule) -> Amount:
        got = self._reserved.get(rule.key)
        return Amount(got[0], got[1]) if got else ZERO

    def totals(self, rule: BudgetRule, window: Window) -> Totals:
        spent, held = self.spent(rule, window), self.reserved(rule)
        if self.base is None:
            return Totals(spent, held)
        other = self.base(rule, window)
        return Totals(spent + other.spent, held + other.held)

    def own(self, rule: BudgetRule, window: Window) -> Totals | None:
        return Totals(self.spent(rule, window), self.reserved(rule))

    def leases(self) -> int:
        return len(self._leases)

    # ------------------------------------------------------------ writing

    def _add(self, key: str, amount: Amount, journal: bool = True) -> None:
        got = self._spent.get(key)
        if got is None:
            self._spent[key] = [amount.micros, amount.tokens]
        else:
            got[0] += amount.micros
            got[1] += amount.tokens
        if journal and self.journal is not None:
            self.journal.record(key, amount)

    def _hold(self, rule: BudgetRule, amount: Amount, sign: int) -> None:
        got = self._reserved.setdefault(rule.key, [0, 0])
        got[0] += sign * amount.micros
        got[1] += sign * amount.tokens

    def sweep(self, now: float) -> int:
        """Free the leases of requests that never settled (their holder died); how many."""
        freed = 0
        while self._expiry and self._expiry[0][0] <= now:  # (release may rebuild the heap)
            _, rid = heapq.heappop(self._expiry)
            r = self._leases.get(rid)
            if r is not None and self.release(r):
                freed += 1
        return freed

    def release(self, r: Reservation) -> bool:
        """Drop a reservation's hold (without counting any spend); False if it holds nothing here."""
        if self._leases.pop(r.id, None) is None:
            return False
        for line in r.lines:
            self._hold(line.rule, line.ask, -1)
        if len(self._expiry) > 2 * len(self._leases) + COMPACT_SLACK:
            self._expiry = [(lease.expires, lease.id) for lease in self._leases.values()]
            heapq.heapify(self._expiry)
        return True

    async def reserve(self, lines: Sequence[Line], now: float, lease_seconds: float) -> Booking:
        return self.reserve_now(lines, now, lease_seconds)

    def reserve_now(self, lines: Sequence[Line], now: float, lease_seconds: float) -> Booking:
        """Judge and hold at once: nothing else runs in between on the event loop."""
        self.sweep(now)
        verdicts, refused = judge_all(
            lines, lambda ln: self.totals(ln.rule, ln.window), lambda ln: self._buckets.get(ln.rule.key), now
        )
        if refused:
            return Booking(None, tuple(verdicts))
        reservation = Reservation(new_id(), tuple(lines), now + lease_seconds)
        self._leases[reservation.id] = reservation
        heapq.heappush(self._expiry, (reservation.expires, reservation.id))
        after = []
        for v in verdicts:
            self._hold(v.line.rule, v.line.ask, 1)
            if v.judgement.bucket is not None:
                self._buckets[v.line.rule.key] = v.judgement.bucket
            after.append(Verdict(v.line, v.judgement, Totals(v.totals.spent, v.totals.held + v.line.ask)))
        return Booking(reservation, tuple(after))

    def forget_spent(self) -> None:
        """Drop the spend counted here (it is in the shared store now); leases stay."""
        self._spent.clear()

    def settle(self, reservation: Reservation, actual: Amount, now: float) -> None:
        self.release(reservation)
        if actual == ZERO:
            return
        for line in reservation.lines:
            self._add(spend_key(line.rule, line.window), actual)
