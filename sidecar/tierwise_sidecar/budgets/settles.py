"""Settles on their way to Redis, and the summing of those that take from the same leases.

A flush sends the settles of the requests one allowance slice served as one: their asks and their
actual costs summed, under one sequence number. What Redis does with the sum is what it does with
each in turn (increments, and a take from a lease that stops at what the lease holds), and each
settle sent alone would cost redis-py's encoding of some fifteen arguments and Redis a script step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tierwise.budgetkeys import applied_key, hold_keys, spend_key
from tierwise.budgetrules import Amount
from tierwise.periods import ROLLING_SECONDS, Window
from tierwise.values import value
from tierwise_sidecar.budgets.ledger import Line, Reservation

# Keys of a finished calendar period are kept a while for whoever reports on them, then expire.
KEEP_AFTER_PERIOD = 35 * 24 * 3600
APPLIED_TTL = 7 * 24 * 3600
# Entries of the per-(budget, window) key caches; cleared when full (windows moved on).
KEYS_CACHE_MAX = 256


@value
class Settle:
    """A settle to send: idempotent by (instance, seq). `requests` settles summed into one when
    they took from the same leases (`reservation` then holds the summed asks)."""

    seq: int
    reservation: Reservation
    actual: Amount
    requests: int = 1


@dataclass(slots=True)
class Summed:
    """Settles waiting for a flush that take from the same leases of the same budgets' windows."""

    first: Reservation
    asks: list[list[int]]  # per line: micros, tokens
    micros: int
    tokens: int
    requests: int = 1

    def add(self, r: Reservation, actual: Amount) -> None:
        asks = self.asks
        for i, line in enumerate(r.lines):
            total = asks[i]
            total[0] += line.ask.micros
            total[1] += line.ask.tokens
        self.micros += actual.micros
        self.tokens += actual.tokens
        self.requests += 1

    def settle(self, seq: int) -> Settle:
        r = self.first
        if self.requests == 1:
            return Settle(seq, r, Amount(self.micros, self.tokens))
        lines = tuple(Line(ln.rule, ln.window, Amount(u, t)) for ln, (u, t) in zip(r.lines, self.asks, strict=True))
        summed = Reservation(r.id, lines, r.expires, remote=r.remote, leases=r.leases)
        return Settle(seq, summed, Amount(self.micros, self.tokens), self.requests)


def same_leases(r: Reservation) -> tuple[object, ...]:
    """What settles must share to be summed: their leases, and each line's budget and the window
    it counts in (its bucket, for a rolling one)."""
    if len(r.lines) == 1:
        w = r.lines[0].window
        return r.leases, r.lines[0].rule.key, w.id, w.last_bucket
    return r.leases, *((ln.rule.key, ln.window.id, ln.window.last_bucket) for ln in r.lines)


def _ttl(w: Window) -> int:
    length = ROLLING_SECONDS.get(w.period)
    return int(length + 24 * 3600) if length else int(w.end - w.start) + KEEP_AFTER_PERIOD


class SettleOps:
    """A settle as the script takes it: keys and arguments, what depends on the budget's window
    formatted once per window."""

    def __init__(self, instance: str) -> None:
        self._applied = applied_key(instance)
        self._cache: dict[tuple[str, str], tuple[Window, tuple[str, str, str, str], str, int]] = {}

    def op(self, s: Settle) -> tuple[list[Any], list[Any]]:
        keys = [self._applied]
        r = s.reservation
        args: list[Any] = ["S", s.seq, APPLIED_TTL, len(r.lines), str(s.actual.micros), str(s.actual.tokens)]
        for i, line in enumerate(r.lines):
            budget_keys, bucket, ttl = self._keys(line.rule.key, line.window)
            keys += budget_keys
            args += [bucket, ttl, r.leases[i] if r.leases else "", str(line.ask.micros), str(line.ask.tokens)]
        return keys, args

    def _keys(self, budget: str, w: Window) -> tuple[tuple[str, str, str, str], str, int]:
        """A settle's keys, bucket field prefix and TTL for one budget in one window: the same for
        every request settled in that window, so they are formatted once (a dict lookup instead)."""
        cached = self._cache.get((budget, w.id))
        if cached is None or (cached[0] is not w and cached[0] != w):
            held, leases, lease, _ = hold_keys(budget)
            bucket = f"{w.last_bucket}:" if w.rolling else ""
            cached = w, (spend_key(budget, w), held, leases, lease), bucket, _ttl(w)
            if len(self._cache) >= KEYS_CACHE_MAX:
                self._cache.clear()  # windows moved on: the old ones are not asked for again
            self._cache[(budget, w.id)] = cached
        return cached[1], cached[2], cached[3]
